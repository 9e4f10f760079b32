"""`make dev`: the CRM simulator plus `dagster dev` (webserver and daemon) against it.

The UI (http://127.0.0.1:3000 unless DAGSTER_PORT says otherwise) shows the assets ready to
materialize; the instance lives in .dagster_home/ with the repository's dagster.yaml, so the
schedule, sensors and run retries work as configured. Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import API_KEY, DATABASE, ROOT, prepare_instance  # noqa: E402

from crm_assets.simulator.process import start_simulator, stop_group  # noqa: E402

# `dagster dev` and its webserver, daemon and code servers: gently, then firmly
STOP_DAGSTER = ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


def say_what_the_warehouse_holds(database: Path) -> None:
    if database.exists():
        print(f"The warehouse {database.name} keeps what earlier runs loaded, while the simulator "
              "starts again from its seed: row counts and checks may differ from the API's by the "
              "records changed before. A full refresh (or `make demo`, or `make clean`) starts over.",
              flush=True)


def main() -> int:
    home = prepare_instance()
    say_what_the_warehouse_holds(DATABASE)
    try:
        simulator, url = start_simulator(home / "simulator.url", "--page-cap", "250",
                                         api_key=API_KEY, cwd=ROOT)
    except RuntimeError as exc:  # the simulator's own error is on the terminal above
        print(f"make dev failed: {exc}", file=sys.stderr)
        return 1
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "SOURCES__CRM__BASE_URL": os.environ.get("SOURCES__CRM__BASE_URL", url),
        "SOURCES__CRM__API_KEY": os.environ.get("SOURCES__CRM__API_KEY", API_KEY),
        "DESTINATION__DUCKDB__CREDENTIALS": os.environ.get(
            "DESTINATION__DUCKDB__CREDENTIALS", str(DATABASE)
        ),
    }
    port = os.environ.get("DAGSTER_PORT", "3000")
    print(f"CRM simulator at {url} (change data: curl -X POST {url}/_admin/mutate "
          "-d '{\"resource\": \"jobs\", \"edit\": 5}')", flush=True)
    dagster = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(ROOT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", port],
        cwd=ROOT, env=env,
        start_new_session=True,  # its own process group: stopped as a whole below
    )
    # a SIGTERM (e.g. from a process manager) stops everything as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return dagster.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_group(dagster, STOP_DAGSTER)
        stop_group(simulator)


if __name__ == "__main__":
    sys.exit(main())
