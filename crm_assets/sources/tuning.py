"""Process tuning for the duration of one sync, undone when it ends.

Importing the project changes nothing in the process: other code locations, tests and dlt
pipelines may share it. A sync (`with sync_tuning(): pipeline.run(...)`) applies what measurably
pays (figures in benchmarks/README.md), each only where the user has not configured it, and puts
everything back when the block ends, also on failure:

- the garbage collector runs less often (STEP_GC_THRESHOLDS): a sync allocates millions of
  short-lived dicts that reference counting frees anyway;
- dlt settings, through dlt's own environment variables, set only while unset and removed
  afterwards: DuckDB capped at 128 MB and one thread per query (a sync of 1,000,000 records stays
  under 500 MB);
- pyarrow allocates through the C library's malloc, whose freed page memory goes back to the
  system before the load step (mimalloc, its default, keeps it); Arrow's C++ side picks its pool
  once, at its first allocation, so in a process whose first sync comes first it stays malloc.

Syncs overlapping in one process share one application: the first to start applies, the last to
end restores.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Optional

import dlt

# dlt setting -> the environment variable dlt reads it from, and its value during a sync
DLT_SETTINGS: dict[str, tuple[str, str]] = {
    "destination.duckdb.credentials.global_config": (
        "DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG",
        '{"memory_limit": "128MB", "threads": 1}',
    ),
}
# Python's default (700, 10, 10) starts a full collection, walking every object of the process,
# every ~70,000 allocations while the heap grows.
STEP_GC_THRESHOLDS = (50_000, 20, 100)

_lock = threading.Lock()
_active = 0
_undo: Optional[ExitStack] = None


@contextmanager
def sync_tuning() -> Iterator[None]:
    """The tuning above for the duration of the block."""
    global _active, _undo
    with _lock:
        if _active == 0:
            _undo = ExitStack()
            try:
                _apply(_undo)
            except BaseException:
                _undo.close()
                raise
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _undo is not None:
                undo, _undo = _undo, None
                undo.close()


def _apply(undo: ExitStack) -> None:
    undo.callback(gc.set_threshold, *gc.get_threshold())
    gc.set_threshold(*STEP_GC_THRESHOLDS)
    for key, (variable, value) in DLT_SETTINGS.items():
        if variable not in os.environ and _configured(key) is None:
            os.environ[variable] = value
            undo.callback(os.environ.pop, variable, None)
    _use_system_allocator_for_arrow(undo)


def _configured(key: str) -> Any:
    """The value the user configured for a dlt setting (config or secrets), or None."""
    provider = dlt.secrets if ".credentials." in key else dlt.config
    try:
        return provider.get(key)
    except Exception:  # a value dlt cannot parse: leave it to dlt to complain about
        return True


def _use_system_allocator_for_arrow(undo: ExitStack) -> None:
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:  # the user's choice wins
        return
    # Arrow's C++ code (the parquet writer and reader among it) reads this variable once, when it
    # first allocates: in a process whose first Arrow allocation is a sync's, that pool stays
    # malloc. pyarrow's own default pool is set, and put back, here.
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
    undo.callback(os.environ.pop, "ARROW_DEFAULT_MEMORY_POOL", None)
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    undo.callback(pa.set_memory_pool, previous)
