"""What a failing resource costs the others: the sync through Dagster (the `crm_sync_assets` step
with its checks, as `dg launch --assets '*'` runs it, in this process) with nothing failing, with
one resource answering 403, and with one answering 500 for the whole run, on a full load and on
an incremental one. Prints wall seconds and the API requests of each.

    python benchmarks/isolation.py                        # 109,000 records, files failing
    python benchmarks/isolation.py --failing tasks --repeat 2

A failure costs the others one more read from their cursors (the failed attempt's extract is
thrown away): nothing on a 403, which fails at the resource's first request, and the whole read
that ran beside the retries on a 500 (the HTTP retries wait 2 + 4 + 8 s before the resource fails).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import DEFAULT_COUNTS  # noqa: E402  (the same 109,000 records as make bench)

API_KEY = "bench-key"
SCENARIOS = ("nothing failing", "403", "500")


def sync(simulator: Any, failing: str, scenario: str) -> dict[str, Any]:
    from dagster import AssetSelection, DagsterInstance, materialize

    from crm_assets.assets import crm_sync_assets
    from crm_assets.resources import RESOURCES

    simulator.configure(forbidden=[failing] if scenario == "403" else [],
                        fail_resources={failing: 500} if scenario == "500" else {})
    simulator.reset_stats()
    started = time.perf_counter()
    with DagsterInstance.ephemeral() as instance:
        result = materialize([crm_sync_assets], resources=RESOURCES, instance=instance,
                             selection=AssetSelection.all(), raise_on_error=False)
    wall = time.perf_counter() - started
    assert result.success == (scenario == "nothing failing"), scenario
    landed = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert landed == set(DEFAULT_COUNTS) - ({failing} if scenario != "nothing failing" else set())
    requests = simulator.stats()["requests"]
    return {"wall": wall, "requests": sum(requests.values()) - requests.get(failing, 0),
            "failing_requests": requests.get(failing, 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--failing", default="files", choices=sorted(DEFAULT_COUNTS))
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the table shows medians")
    parser.add_argument("--edits", type=int, default=200, help="edits per resource before each incremental sync")
    args = parser.parse_args()

    from crm_assets.simulator import CrmSimulator, SimulatorConfig

    figures: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="crm-isolation-") as tmp:
        os.environ.update(RUNTIME__DLTHUB_TELEMETRY="false", DAGSTER_DISABLE_TELEMETRY="true")
        simulator = CrmSimulator(SimulatorConfig(api_key=API_KEY, counts=dict(DEFAULT_COUNTS))).start()
        os.environ.update(SOURCES__CRM__BASE_URL=simulator.url, SOURCES__CRM__API_KEY=API_KEY)
        try:
            # unmeasured: the first materialization in a process pays for imports and Dagster's set-up
            os.environ["DLT_DATA_DIR"] = str(Path(tmp) / "warm-up" / "dlt")
            os.environ["DESTINATION__DUCKDB__CREDENTIALS"] = str(Path(tmp) / "warm-up" / "warehouse.duckdb")
            sync(simulator, args.failing, "nothing failing")
            for round_ in range(args.repeat):
                for scenario in SCENARIOS:
                    # a fresh warehouse and dlt state: the full load, then changes and the incremental one
                    folder = Path(tmp) / f"{round_}-{scenario}"
                    os.environ["DLT_DATA_DIR"] = str(folder / "dlt")
                    os.environ["DESTINATION__DUCKDB__CREDENTIALS"] = str(folder / "warehouse.duckdb")
                    full = sync(simulator, args.failing, scenario)
                    if scenario != "nothing failing":  # the failed resource's first load, for the next one
                        sync(simulator, args.failing, "nothing failing")
                    for name in DEFAULT_COUNTS:
                        simulator.mutate(name, edit=args.edits)
                    incremental = sync(simulator, args.failing, scenario)
                    figures.setdefault(("full load", scenario), []).append(full)
                    figures.setdefault(("incremental", scenario), []).append(incremental)
                    print(f"round {round_ + 1}, {scenario}: full {full['wall']:.2f} s, "
                          f"incremental {incremental['wall']:.2f} s", file=sys.stderr, flush=True)
        finally:
            simulator.stop()

    print(f"\n{sum(DEFAULT_COUNTS.values()):,} records, {args.failing} failing, medians of {args.repeat}\n")
    print("| sync | failing | wall s | requests of the others | requests of the failing one |")
    print("|---|---|---:|---:|---:|")
    for (kind, scenario), runs in figures.items():
        wall = statistics.median(run["wall"] for run in runs)
        others = statistics.median(run["requests"] for run in runs)
        own = statistics.median(run["failing_requests"] for run in runs)
        print(f"| {kind} | {scenario} | {wall:.2f} | {others:,.0f} | {own:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
