"""Run one sync in this process and SIGKILL it at a chosen point (used by test_reliability).

    python -m crm_assets_tests._crash_child extract|normalize|load

The kill is the real thing: no cleanup, no exception handlers, no atexit.
"""

from __future__ import annotations

import os
import signal
import sys

KILL_POINTS = ("extract", "normalize", "load")


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(owner: type, name: str, after: int, only_if=lambda *a, **k: True) -> None:
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        if only_if(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= after:
                _die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def main(point: str) -> None:
    if point == "extract":  # after a few pages have been received
        from crm_assets.sources.crm.http import CrmSession

        _kill_on_call(CrmSession, "send", after=3)
    elif point == "normalize":  # extraction finished, normalizing the first package
        from dlt.normalize.normalize import Normalize

        _kill_on_call(Normalize, "spool_files", after=1)
    elif point == "load":  # in the middle of the merge: some statements ran, others did not
        from dlt.destinations.impl.duckdb.sql_client import DuckDbSqlClient

        def is_merge_statement(_self, sql, *args, **kwargs) -> bool:
            text = sql if isinstance(sql, str) else str(sql)
            return "INSERT INTO" in text.upper() and '"crm"' in text and "_staging" in text
        _kill_on_call(DuckDbSqlClient, "execute_sql", after=2, only_if=is_merge_statement)
    else:
        raise SystemExit(f"unknown kill point {point!r}; one of {KILL_POINTS}")

    from crm_assets_tests.conftest import run_sync

    run_sync()
    print("the sync finished without reaching the kill point", flush=True)
    sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1])
