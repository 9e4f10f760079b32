"""`make dev`: the CRM simulator plus `dg dev` (webserver and daemon) against it.

The UI (http://127.0.0.1:3000 unless --port or DAGSTER_PORT says otherwise) shows the assets ready
to materialize; the instance lives in .dagster_home/ (or --home) with the repository's dagster.yaml,
so the schedule, sensors and run retries work as configured.

Whatever stops it stops everything it started: Ctrl-C, SIGTERM or SIGHUP to it or to its process
group (as a service manager or `kill -TERM -<pgid>` does), also when it was started with SIGINT
ignored (`make dev &` from a script, nohup); and should it be killed outright, the kernel stops the
simulator and `dg dev` (Linux), which stops its webserver and daemon.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import API_KEY, DATABASE, ROOT, prepare_instance  # noqa: E402

from crm_assets.simulator.process import start_process, start_simulator, stop_group  # noqa: E402

# `dg dev` and its webserver, daemon and code servers: gently, then firmly
STOP_DAGSTER = ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))
# the signals that stop us; SIGINT and SIGHUP only when not ignored (nohup, a script's `&`)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def say_what_the_warehouse_holds(database: Path) -> None:
    if database.exists():
        print(f"The warehouse {database.name} keeps what earlier runs loaded, while the simulator "
              "starts again from its seed: row counts and checks may differ from the API's by the "
              "records changed before. A full refresh (or `make demo`, or `make clean`) starts over.",
              flush=True)


_stopping: list[int] = []


def _stop(signum: int, _frame: object) -> None:
    """The first stop signal ends the wait; any later one (make forwards SIGTERM to us after the
    group's own, a service manager may repeat it) must not cut the cleanup short."""
    if not _stopping:
        _stopping.append(signum)
        raise SystemExit(128 + signum)


def handle_stop_signals() -> list[int]:
    handled = []
    for sig in STOP_SIGNALS:
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _stop)
            handled.append(sig)
    return handled


def warehouse_setting() -> str:
    """The DuckDB file: the repository's by default; a relative path given in the environment is
    taken from here, not from DAGSTER_HOME where `dg dev` runs."""
    configured = os.environ.get("DESTINATION__DUCKDB__CREDENTIALS")
    if not configured:
        return str(DATABASE)
    if ":" in configured or os.path.isabs(configured):  # absolute, or no file (md:, :memory:)
        return configured
    return os.path.abspath(configured)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make dev", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("DAGSTER_PORT", "3000")),
                        help="the UI's port on 127.0.0.1 (default: $DAGSTER_PORT or 3000)")
    parser.add_argument("--home", type=Path, default=ROOT / ".dagster_home",
                        help="DAGSTER_HOME: Dagster's state and dagster.yaml (default: .dagster_home)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handled = handle_stop_signals()
    home = prepare_instance(args.home.resolve())
    database = warehouse_setting()
    say_what_the_warehouse_holds(Path(database))
    started: list[tuple[subprocess.Popen, tuple]] = []
    try:
        try:
            simulator, url = start_simulator(home / "simulator.url", "--page-cap", "250",
                                             api_key=API_KEY, cwd=ROOT)
        except RuntimeError as exc:  # the simulator's own error is on the terminal above
            print(f"make dev failed: {exc}", file=sys.stderr)
            return 1
        started.append((simulator, ()))
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            # `dg dev` runs in DAGSTER_HOME (where its dagster.yaml is); dlt still reads the
            # repository's .dlt/ and the default warehouse stays in the repository
            "DLT_PROJECT_DIR": os.environ.get("DLT_PROJECT_DIR", str(ROOT)),
            "SOURCES__CRM__BASE_URL": os.environ.get("SOURCES__CRM__BASE_URL", url),
            "SOURCES__CRM__API_KEY": os.environ.get("SOURCES__CRM__API_KEY", API_KEY),
            "DESTINATION__DUCKDB__CREDENTIALS": database,
        }
        print(f"CRM simulator at {url} (change data: curl -X POST {url}/_admin/mutate "
              "-d '{\"resource\": \"jobs\", \"edit\": 5}')", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # started and recorded, or neither
        try:
            dagster = start_process(
                [str(Path(sys.executable).parent / "dg"), "dev", "-w", str(ROOT / "workspace.yaml"),
                 "-h", "127.0.0.1", "-p", str(args.port)],
                cwd=home, env=env,
            )
            started.append((dagster, STOP_DAGSTER))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        return dagster.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        _stopping.append(0)  # from here on, signals are ignored (see _stop)
        for process, steps in reversed(started):
            stop_group(process, *([steps] if steps else []))


if __name__ == "__main__":
    sys.exit(main())
