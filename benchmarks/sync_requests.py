"""How many requests a sync sends, per resource: a first sync, a quiet one, one after a few edits.

    .venv/bin/python benchmarks/sync_requests.py [--jobs 240]

In one process, against the simulator on loopback (`--jobs` jobs and the test suite's small counts
of the other four resources), through the sync without Dagster (`crm_pipeline().run(crm())`) on
DuckDB in a temporary folder. Prints the simulator's request count of each resource per sync. A
request is one round trip: over a slow API its count, not the CPU, sets a small sync's time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

API_KEY = "bench-key"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=240)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="crm_sync_requests_")
    os.chdir(work)
    os.environ.update(
        DLT_DATA_DIR=os.path.join(work, "dlt"), RUNTIME__DLTHUB_TELEMETRY="false",
        SOURCES__CRM__API_KEY=API_KEY, DESTINATION__DUCKDB__CREDENTIALS=os.path.join(work, "w.duckdb"),
    )
    logging.disable(logging.WARNING)

    from crm_assets.simulator import CrmSimulator, SimulatorConfig
    from crm_assets.sources.crm import crm
    from crm_assets.sources.crm_pipeline import crm_pipeline

    counts = {"jobs": args.jobs, "contacts": 310, "tasks": 180, "activities": 205, "files": 95}
    simulator = CrmSimulator(SimulatorConfig(api_key=API_KEY, counts=counts)).start()
    os.environ["SOURCES__CRM__BASE_URL"] = simulator.url
    try:
        for label, edits in (("first sync", 0), ("quiet sync", 0), ("after 3 edits", 3)):
            if edits:
                simulator.mutate("jobs", edit=edits)
            simulator.reset_stats()
            crm_pipeline().run(crm())
            requests = simulator.stats()["requests"]
            print(f"{label:>14}: {sum(requests.values()):3d} requests  {json.dumps(requests)}")
    finally:
        simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
