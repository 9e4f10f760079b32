"""What one small sync costs in CPU: the fixed part of a run, which dominates the test suite and a
deployment syncing many small accounts.

    .venv/bin/python benchmarks/sync_cpu.py [--syncs 10]

In one process, against the simulator on loopback (1,030 records over the five resources): one
sync to warm up, then `--syncs` first syncs (each into a new warehouse) and as many incremental
syncs of an unchanged API, each through Dagster's `materialize` as a run does it, on DuckDB.
Prints the CPU seconds (user + sys of the process, every thread) of each sync and their medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COUNTS = {"jobs": 240, "contacts": 310, "tasks": 180, "activities": 205, "files": 95}
API_KEY = "bench-key"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--syncs", type=int, default=10)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="crm_sync_cpu_"))
    os.chdir(work)
    os.environ.update(
        DLT_DATA_DIR=str(work / "dlt"), RUNTIME__DLTHUB_TELEMETRY="false",
        DAGSTER_DISABLE_TELEMETRY="true", SOURCES__CRM__API_KEY=API_KEY,
    )
    logging.disable(logging.INFO)  # Dagster's console lines are not what is measured

    from dagster import AssetSelection, materialize

    from crm_assets.assets import crm_sync_assets
    from crm_assets.resources import RESOURCES
    from crm_assets.simulator import CrmSimulator, SimulatorConfig

    simulator = CrmSimulator(SimulatorConfig(api_key=API_KEY, counts=dict(COUNTS))).start()
    os.environ["SOURCES__CRM__BASE_URL"] = simulator.url

    def point_at(number: int) -> None:
        """A warehouse and dlt folder of its own."""
        os.environ["DESTINATION__DUCKDB__CREDENTIALS"] = str(work / f"w{number}.duckdb")
        os.environ["DLT_DATA_DIR"] = str(work / f"dlt{number}")

    def sync() -> float:
        started = time.process_time()
        result = materialize([crm_sync_assets], resources=RESOURCES,
                             selection=AssetSelection.all().without_checks())
        assert result.success
        return time.process_time() - started

    try:
        point_at(0)
        sync()  # imports, first connections
        first, incremental = [], []
        for number in range(1, args.syncs + 1):
            point_at(number)
            first.append(sync())
            incremental.append(sync())
    finally:
        simulator.stop()
    print(json.dumps({
        "first_sync_cpu_s": [round(x, 3) for x in first],
        "incremental_sync_cpu_s": [round(x, 3) for x in incremental],
        "median_first_s": round(statistics.median(first), 3),
        "median_incremental_s": round(statistics.median(incremental), 3),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
