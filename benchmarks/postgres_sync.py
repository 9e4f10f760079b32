"""A full sync into PostgreSQL, timed: code trees compared interleaved, and the loader file format.

bench.py reads its warehouses with DuckDB; this measures the project's sync (`crm_pipeline()` +
`run_options()` inside `sync_tuning()`, as bench.py's c' does) into the test PostgreSQL of
scripts/services.sh, a fresh database per run, against one simulator (109,000 records spread as
bench.py's default). Each run is a subprocess importing `crm_assets` from the tree given:

    python benchmarks/postgres_sync.py --code before=<worktree> --code after=. --rounds 3
    python benchmarks/postgres_sync.py --code after=. --insert-values   # + jsonb through INSERTs

`--insert-values` adds a run of the last tree with dlt's `insert_values` loader instead of parquet
(PostgreSQL's `jsonb` for JSON columns, which ADBC's parquet COPY cannot write). Prints each run
(wall and dlt's step seconds, the type `crm.jobs.tags` got) and the median sync seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNTS = {"jobs": 20000, "contacts": 25000, "tasks": 30000, "activities": 24000, "files": 10000}
API_KEY = "bench-key"

CHILD = r"""
import json, os, time
from crm_assets.sources.crm import crm
from crm_assets.sources.crm_pipeline import crm_pipeline
from crm_assets.sources.destination import run_options
from crm_assets.sources.tuning import sync_tuning
with sync_tuning():
    pipeline = crm_pipeline()
    options = run_options(pipeline)
    if os.environ.get("BENCH_LOADER_FILE_FORMAT"):
        options["loader_file_format"] = os.environ["BENCH_LOADER_FILE_FORMAT"]
    started = time.perf_counter()
    pipeline.run(crm(), **options)
    seconds = time.perf_counter() - started
steps = {s.step: round((s.finished_at - s.started_at).total_seconds(), 2) for s in pipeline.last_trace.steps}
print(json.dumps({"sync": round(seconds, 2), "steps": steps}))
"""


def _server() -> dict[str, str]:
    subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "up"], check=True, capture_output=True)
    listed = subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "env"], check=True,
                            capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in listed.split())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", action="append", required=True, metavar="LABEL=DIR",
                        help="a tree whose crm_assets is measured (repeatable, run in this order)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--insert-values", action="store_true")
    args = parser.parse_args()
    trees = [(label, str(Path(path).resolve()), None) for label, path in (c.split("=", 1) for c in args.code)]
    if args.insert_values:
        trees.append((f"{trees[-1][0]}, insert_values", trees[-1][1], "insert_values"))

    import psycopg2

    sys.path.insert(0, str(ROOT))
    from crm_assets.simulator import CrmSimulator, SimulatorConfig

    server = _server()

    def execute(database: str, sql: str) -> list[tuple]:
        connection = psycopg2.connect(host=server["CRM_TEST_PG_HOST"], port=int(server["CRM_TEST_PG_PORT"]),
                                      user=server["CRM_TEST_PG_USER"], password=server["CRM_TEST_PG_PASSWORD"],
                                      dbname=database)
        connection.autocommit = True  # CREATE and DROP DATABASE run outside a transaction
        try:
            cursor = connection.cursor()
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    simulator = CrmSimulator(SimulatorConfig(api_key=API_KEY, counts=COUNTS)).start()
    scratch = tempfile.TemporaryDirectory(prefix="postgres_sync_")  # dlt's state of each run
    syncs: dict[str, list[float]] = {label: [] for label, _, _ in trees}
    try:
        for round_ in range(args.rounds):
            for label, tree, file_format in trees:
                database = f"bench_{uuid.uuid4().hex[:10]}"
                execute("postgres", f'CREATE DATABASE "{database}"')
                env = {k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "DESTINATION__", "CRM_", "DLT_"))}
                env.update(
                    PYTHONPATH=tree, SOURCES__CRM__BASE_URL=simulator.url, SOURCES__CRM__API_KEY=API_KEY,
                    CRM_DESTINATION="postgres", RUNTIME__DLTHUB_TELEMETRY="false",
                    DESTINATION__POSTGRES__CREDENTIALS=(
                        f"postgresql://{server['CRM_TEST_PG_USER']}:{server['CRM_TEST_PG_PASSWORD']}"
                        f"@{server['CRM_TEST_PG_HOST']}:{server['CRM_TEST_PG_PORT']}/{database}"),
                    DLT_DATA_DIR=str(Path(scratch.name) / database),
                    **({"BENCH_LOADER_FILE_FORMAT": file_format} if file_format else {}),
                )
                started = time.perf_counter()
                run = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=tree, capture_output=True,
                                     text=True, timeout=1800)
                wall = time.perf_counter() - started
                if run.returncode:
                    print(f"{label}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
                    return 1
                result = run.stdout.strip().splitlines()[-1]
                ((tags_type,),) = execute(database, "SELECT data_type FROM information_schema.columns WHERE "
                                          "table_schema = 'crm' AND table_name = 'jobs' AND column_name = 'tags'")
                execute("postgres", f'DROP DATABASE "{database}" WITH (FORCE)')
                syncs[label].append(float(json.loads(result)["sync"]))
                print(f"round {round_ + 1} {label}: wall {wall:.2f} s {result} tags {tags_type}", flush=True)
    finally:
        simulator.stop()
        scratch.cleanup()
    for label, values in syncs.items():
        print(f"{label}: median sync {statistics.median(values):.2f} s of {len(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
