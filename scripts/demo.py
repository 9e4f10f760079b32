"""`make demo`: the whole project once, end to end, on this machine.

Starts the local CRM API simulator on a free loopback port, materializes every asset with
`dg launch` in the same Dagster instance as `make dev` (.dagster_home/, so the UI shows what the
demo loaded), prints each table's row count and where the database is, and stops the simulator.
The simulator starts from its seed every time, so the demo reloads the tables from scratch (a
full refresh) rather than merging into what an earlier demo loaded from another API state.
Run it from the repository root (the Makefile does).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from crm_assets.simulator.process import start_simulator, stop_group

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "demo-key"
DATABASE = ROOT / "crm_warehouse.duckdb"
FULL_REFRESH = '{"ops": {"crm_sync_assets": {"config": {"full_refresh": true}}}}'
# Dagster's own notice when `dg launch --assets '*'` selects all assets (nothing this project does)
QUIET_WARNINGS = "ignore:Parameter `include_sources` of function `AssetSelection.all` is currently in beta"


def prepare_instance(home: Path = ROOT / ".dagster_home") -> Path:
    """DAGSTER_HOME (.dagster_home/) with the repository's dagster.yaml, without the UI's
    first-visit pop-up (`nux`), and with telemetry off when DAGSTER_DISABLE_TELEMETRY says so
    (Dagster and dg only read their instance's file for that: the variable stops the upload, not
    the event files)."""
    home.mkdir(parents=True, exist_ok=True)
    settings = (ROOT / "dagster.yaml").read_text() if (ROOT / "dagster.yaml").exists() else ""
    settings += "\n# added by scripts/demo.py: a local instance\nnux:\n  enabled: false\n"
    if os.environ.get("DAGSTER_DISABLE_TELEMETRY", "").strip().lower() in ("1", "true", "yes"):
        settings += "telemetry:\n  enabled: false\n"
    (home / "dagster.yaml").write_text(settings)
    return home


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=ROOT / ".dagster_home",
                        help="DAGSTER_HOME: Dagster's state and dagster.yaml (default: .dagster_home)")
    parser.add_argument("--warehouse", type=Path, default=DATABASE,
                        help="the DuckDB file (default: crm_warehouse.duckdb in the repository)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the run's log (DEBUG) and every warning")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    database = args.warehouse.resolve()
    home = prepare_instance(args.home.resolve())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the simulator
    simulator_log = home / "simulator.log"
    # the simulator caps pages at 250 records, below the 1000 we ask for: the sync must not care
    try:
        with simulator_log.open("wb") as log:
            simulator, url = start_simulator(home / "simulator.url", "--page-cap", "250", api_key=API_KEY,
                                             cwd=ROOT, output=None if args.verbose else log)
    except RuntimeError as exc:
        print(f"demo failed: {exc}\n{simulator_log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
        return 1
    print(f"CRM simulator at {url}", flush=True)
    env = {
        **os.environ,
        "SOURCES__CRM__BASE_URL": url,
        "SOURCES__CRM__API_KEY": API_KEY,
        "DESTINATION__DUCKDB__CREDENTIALS": str(database),
        "DAGSTER_HOME": str(home),
        "VIRTUAL_ENV": str(ROOT / ".venv"),  # dg runs from the project's venv: nothing to warn about
    }
    run_config = json.loads(FULL_REFRESH)
    if not args.verbose:
        # the run's log only when something fails; `-v` shows all of it (DEBUG) and every warning
        run_config["loggers"] = {"console": {"config": {"log_level": "ERROR"}}}
        env["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET_WARNINGS]))
    try:
        started = time.monotonic()
        subprocess.run(
            [str(Path(sys.executable).parent / "dg"), "launch", "--assets", "*",
             "--config-json", json.dumps(run_config)],
            cwd=ROOT, env=env, check=True,
        )
        elapsed = time.monotonic() - started
    except subprocess.CalledProcessError as exc:
        print(f"demo failed: dg launch exited with {exc.returncode}", file=sys.stderr)
        return 1
    finally:
        stop_group(simulator)

    import duckdb

    from crm_assets.sources.crm import configured_endpoints

    with duckdb.connect(str(database), read_only=True) as connection:
        endpoints = configured_endpoints()
        print(f"\nMaterialized all {len(endpoints)} assets in {elapsed:.1f}s. Rows now in the warehouse:")
        for endpoint in endpoints:
            key = endpoint.primary_key
            (rows,) = connection.execute(f"SELECT COUNT(*) FROM crm.{endpoint.name}").fetchone()
            (ids,) = connection.execute(f"SELECT COUNT(DISTINCT {key}) FROM crm.{endpoint.name}").fetchone()
            print(f"  crm.{endpoint.name:<11} {rows:>7} rows ({ids} distinct {key}s)")
        (tags,) = connection.execute("SELECT tags FROM crm.jobs WHERE tags <> '[]' LIMIT 1").fetchone()
        print(f"  lists stay in their record's row in JSON columns, e.g. crm.jobs.tags = {tags}")
    print(f"\nDatabase: {database}")
    print(f"Try: {Path(sys.executable).parent / 'python'} -c \"import duckdb; "
          f"print(duckdb.connect('{database}', read_only=True).sql('select * from crm.jobs limit 5'))\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
