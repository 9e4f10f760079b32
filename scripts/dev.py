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
from demo import (  # noqa: E402
    API_KEY,
    DATABASE,
    ROOT,
    prepare_instance,
    start_simulator,
)


def say_what_the_warehouse_holds(database: Path) -> None:
    if database.exists():
        print(f"The warehouse {database.name} keeps what earlier runs loaded, while the simulator "
              "starts again from its seed: row counts and checks may differ from the API's by the "
              "records changed before. A full refresh (or `make demo`, or `make clean`) starts over.",
              flush=True)


def _stop_group(process: subprocess.Popen) -> None:
    """Stop `dagster dev` and its webserver, daemon and code servers: gently, then firmly."""
    for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            os.killpg(process.pid, signal.SIGTERM)  # children left behind by the leader
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def main() -> int:
    home = prepare_instance()
    say_what_the_warehouse_holds(DATABASE)
    simulator, url = start_simulator(home, "--page-cap", "250")
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
        _stop_group(dagster)
        simulator.terminate()
        simulator.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
