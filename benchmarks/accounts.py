"""`make bench-accounts`: many accounts through Dagster's Celery run launcher on PostgreSQL.

For each number of accounts (--accounts, default 20,100) and of workers (--workers, default
1,2), from nothing: a simulator serving the accounts (--records per resource each, default 1,000:
5,000 records an account), a fresh Dagster database and warehouse database on the PostgreSQL of
scripts/services.sh, and the deployment of deploy/celery/ (code servers, webserver, daemon, the
workers: one process each, `--concurrency 1`, Redis as broker; crm_assets_tests/celery_deployment.py).
Then, measured:

  trivial   --trivial-runs runs (default 20) of a one-asset job from another code location
            (benchmarks/trivial_location.py), on the same daemon and workers: Dagster's own cost
            of materializing an asset through this launcher; then as many of the same asset in
            the pool `crm_warehouse` (what the pool's slot claim adds);
  accounts  crm_sync_schedule's tick (evaluated by the code server through the webserver's
            GraphQL API, its run requests queued as the daemon queues them), one run per account.

Per phase: the wall time from queuing the runs to the last one finished; per run (medians and
the 90th percentile): the run's time (Dagster's run start to end, in the worker), its step's
time (the sync: load and checks; for `trivial`, the asset), the overhead (run minus step) and
the wait (queued to started: the run queue, the broker, a free worker). The overhead ratio is
the accounts' median overhead over the trivial runs'. The workers' CPU seconds per run. Peak RSS
per worker: its processes (the `dagster-celery` command, Celery's main process, the pool
process) summed, and its largest process, polled every 0.2 s; and the machine's load average
before and after, since other work on the machine slows every figure.

    .venv/bin/python benchmarks/accounts.py                          # 20 and 100 accounts, 1 and 2 workers
    .venv/bin/python benchmarks/accounts.py --accounts 20 --workers 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg2  # noqa: E402

from benchmarks.process_tree import children_by_parent, tree_pids  # noqa: E402
from crm_assets.simulator.process import start_simulator, stop_group  # noqa: E402
from crm_assets_tests.celery_deployment import (  # noqa: E402
    LOCATION,
    CeleryDeployment,
    claim_redis_database,
    instance_env,
    release_redis_database,
    wait_for_runs,
)

TRIVIAL_LOCATION = "trivial"
SCHEDULE = "crm_sync_schedule"


# --- the services and databases --------------------------------------------------------------


SERVICES = REPO / "scripts" / "services.sh"


def services() -> dict[str, str]:
    """PostgreSQL and Redis, started if they are not up; this process holds them until
    `services.sh down` (which stops them only if no other caller still holds them)."""
    script = SERVICES
    subprocess.run(["bash", str(script), "up"], check=True, stdout=subprocess.DEVNULL)
    listed = subprocess.run(["bash", str(script), "env"], check=True, capture_output=True, text=True)
    return dict(line.split("=", 1) for line in listed.stdout.splitlines() if "=" in line)


def _admin_sql(server: dict[str, str], statement: str) -> None:
    connection = psycopg2.connect(host=server["CRM_TEST_PG_HOST"], port=int(server["CRM_TEST_PG_PORT"]),
                                  user=server["CRM_TEST_PG_USER"], password=server["CRM_TEST_PG_PASSWORD"],
                                  dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def database_url(server: dict[str, str], name: str) -> str:
    return (f"postgresql://{server['CRM_TEST_PG_USER']}:{server['CRM_TEST_PG_PASSWORD']}@"
            f"{server['CRM_TEST_PG_HOST']}:{server['CRM_TEST_PG_PORT']}/{name}")


# --- measuring -------------------------------------------------------------------------------


def cpu_seconds(roots: list[int]) -> float:
    """CPU seconds (user + system) the living processes of these trees have used so far."""
    children, total = children_by_parent(), 0.0
    for root in roots:
        for pid in tree_pids(root, children):
            try:
                fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Peak RSS of each worker: its process tree (the `dagster-celery` command, Celery's main
    process, its pool process) summed, and its largest process alone (the pool process, which
    runs the runs), polled every 0.2 s."""

    def __init__(self, roots: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.peaks = {name: [0, 0] for name in roots}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.2):
            children = children_by_parent()
            for name, root in self.roots.items():
                sizes = [_rss_kb(pid) for pid in tree_pids(root, children)]
                peak = self.peaks[name]
                peak[0], peak[1] = max(peak[0], sum(sizes)), max(peak[1], max(sizes))

    def stop(self) -> dict[str, dict[str, float]]:
        self._halt.set()
        self.join()
        return {name: {"tree": round(tree / 1024, 1), "largest_process": round(largest / 1024, 1)}
                for name, (tree, largest) in self.peaks.items()}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def run_figures(instance, run_ids: list[str]) -> dict[str, Any]:
    """Per run, from Dagster's own records: run time, step time, overhead, wait."""
    from dagster import RunsFilter

    rows = []
    for record in instance.get_run_records(filters=RunsFilter(run_ids=run_ids)):
        steps = instance.get_run_step_stats(record.dagster_run.run_id)
        step = sum((s.end_time or 0) - (s.start_time or 0) for s in steps if s.start_time)
        run = (record.end_time or 0) - (record.start_time or 0)
        rows.append({"run": run, "step": step, "overhead": run - step,
                     "wait": (record.start_time or 0) - record.create_timestamp.timestamp(),
                     "ok": record.dagster_run.is_success})
    figures: dict[str, Any] = {"runs": len(rows), "succeeded": sum(row["ok"] for row in rows)}
    for field in ("run", "step", "overhead", "wait"):
        values = [row[field] for row in rows]
        figures[field] = {"median": round(statistics.median(values), 2),
                          "p90": round(_percentile(values, 0.9), 2)}
    return figures


def phase(deployment: CeleryDeployment, instance, requests: list[dict], job: str, location: str,
          timeout: float) -> dict[str, Any]:
    """Queue the runs, wait for them; with the workers' CPU seconds per run (their Celery
    processes: the pool processes run the runs) and the whole deployment's."""
    workers = [deployment.processes[name].pid for name in deployment.worker_names]
    everything = [process.pid for process in deployment.processes.values()]
    cpu_workers, cpu_all = cpu_seconds(workers), cpu_seconds(everything)
    started = time.monotonic()
    run_ids = deployment.launch(requests, job, location)
    wait_for_runs(instance, run_ids, timeout)
    wall = time.monotonic() - started
    return {"wall_s": round(wall, 1),
            "worker_cpu_s_per_run": round((cpu_seconds(workers) - cpu_workers) / len(run_ids), 2),
            "deployment_cpu_s": round(cpu_seconds(everything) - cpu_all, 1),
            **run_figures(instance, run_ids)}


# --- one configuration -----------------------------------------------------------------------


def configuration(server: dict[str, str], accounts: int, workers: int, records: int, trivial_runs: int,
                  root: Path, timeout: float, pool_granularity: Optional[str] = None) -> dict[str, Any]:
    from dagster import DagsterInstance

    root.mkdir(parents=True)
    workdir = root / "project"
    (workdir / ".dlt").mkdir(parents=True)
    simulator, url = start_simulator(root / "simulator.ready", "--accounts", str(accounts), "--records",
                                     str(records), api_key="unused", output=subprocess.DEVNULL)
    dagster_db = f"bench_dagster_{uuid.uuid4().hex[:8]}"
    warehouse_db = f"bench_crm_{uuid.uuid4().hex[:8]}"
    _admin_sql(server, f'CREATE DATABASE "{dagster_db}"')
    _admin_sql(server, f'CREATE DATABASE "{warehouse_db}"')
    redis_db = claim_redis_database(server)
    try:
        import requests as http

        names = http.get(f"{url}/_admin/accounts", timeout=30).json()["accounts"]
        (workdir / ".dlt" / "secrets.toml").write_text("".join(
            f'[sources.crm.accounts.{name}]\nbase_url = "{url}/{name}"\napi_key = "key-{name}"\n\n'
            for name in names))
        env = {**instance_env(server, dagster_db, redis_db), "CRM_DESTINATION": "postgres",
               "DESTINATION__POSTGRES__CREDENTIALS": database_url(server, warehouse_db),
               "DLT_DATA_DIR": str(workdir / "dlt"), "RUNTIME__DLTHUB_TELEMETRY": "false",
               "DAGSTER_DISABLE_TELEMETRY": "true"}
        deployment = CeleryDeployment(root, workdir, env, workers=workers, locations={
            LOCATION: ["-m", "crm_assets.definitions"],
            TRIVIAL_LOCATION: ["-f", str(REPO / "benchmarks" / "trivial_location.py")],
        })
        if pool_granularity:  # the instance file as deployed, but this one setting
            import yaml

            instance_yaml = deployment.home / "dagster.yaml"
            settings = yaml.safe_load(instance_yaml.read_text())
            settings["concurrency"]["pools"]["granularity"] = pool_granularity
            instance_yaml.write_text(yaml.safe_dump(settings))
        os.environ.update(env, DAGSTER_HOME=str(deployment.home))
        instance = DagsterInstance.from_config(str(deployment.home))  # Dagster's tables, once
        with deployment:
            deployment.start()
            for location in (LOCATION, TRIVIAL_LOCATION):
                deployment.stop_automation(location)
            sampler = RssSampler({name: deployment.processes[name].pid for name in deployment.worker_names})
            sampler.start()
            load_before = os.getloadavg()
            plain = [{"tags": [], "runConfigYaml": "{}"}] * trivial_runs
            trivial = phase(deployment, instance, plain, "trivial_job", TRIVIAL_LOCATION, timeout)
            print(f"  trivial: {trivial}", flush=True)
            in_pool = phase(deployment, instance, plain, "trivial_in_pool_job", TRIVIAL_LOCATION, timeout)
            print(f"  trivial in pool: {in_pool}", flush=True)
            tick = deployment.evaluate_schedule(SCHEDULE)
            synced = phase(deployment, instance, tick, "crm_sync", LOCATION, timeout)
            print(f"  accounts: {synced}", flush=True)
            load_after = os.getloadavg()
            peaks = sampler.stop()
        instance.dispose()
        return {
            "accounts": accounts, "records_per_account": records * 5, "workers": workers,
            "pool_granularity": pool_granularity or "as deployed",
            "trivial": trivial, "trivial_in_pool": in_pool, "accounts_phase": synced,
            "overhead_ratio": round(synced["overhead"]["median"] / trivial["overhead"]["median"], 2),
            "overhead_ratio_to_pooled": round(synced["overhead"]["median"] / in_pool["overhead"]["median"], 2),
            "peak_rss_mb_per_worker": peaks,
            "loadavg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        }
    finally:
        stop_group(simulator)
        release_redis_database(server, redis_db)
        _admin_sql(server, f'DROP DATABASE IF EXISTS "{dagster_db}" WITH (FORCE)')
        _admin_sql(server, f'DROP DATABASE IF EXISTS "{warehouse_db}" WITH (FORCE)')


def render(result: dict[str, Any]) -> str:
    a, t, p = result["accounts_phase"], result["trivial"], result["trivial_in_pool"]
    rss = ", ".join(f"{name} {mb['tree']:,.0f} MB (largest process {mb['largest_process']:,.0f} MB)"
                    for name, mb in result["peak_rss_mb_per_worker"].items())
    return (
        f"{result['accounts']} accounts x {result['records_per_account']:,} records, "
        f"{result['workers']} worker(s), pool granularity {result['pool_granularity']}: {a['succeeded']}/{a['runs']} runs in {a['wall_s']} s; per run "
        f"(median/p90) run {a['run']['median']}/{a['run']['p90']} s, sync {a['step']['median']}/"
        f"{a['step']['p90']} s, overhead {a['overhead']['median']}/{a['overhead']['p90']} s, wait "
        f"{a['wait']['median']}/{a['wait']['p90']} s; worker CPU {a['worker_cpu_s_per_run']} s a run\n"
        f"    trivial asset: {t['succeeded']}/{t['runs']} runs in {t['wall_s']} s; overhead "
        f"{t['overhead']['median']}/{t['overhead']['p90']} s (run {t['run']['median']} s); worker CPU "
        f"{t['worker_cpu_s_per_run']} s a run; the same in pool crm_warehouse: overhead "
        f"{p['overhead']['median']}/{p['overhead']['p90']} s\n"
        f"    overhead ratio {result['overhead_ratio']}x the trivial asset's (target <= 1.5x), "
        f"{result['overhead_ratio_to_pooled']}x the pooled one's; peak RSS {rss}; "
        f"load average {result['loadavg_1min'][0]} -> {result['loadavg_1min'][1]}"
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", default="20,100", help="numbers of accounts, e.g. 20,100")
    parser.add_argument("--workers", default="1,2", help="numbers of Celery workers, e.g. 1,2")
    parser.add_argument("--records", type=int, default=1000, help="records of each resource per account")
    parser.add_argument("--trivial-runs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a phase may take")
    parser.add_argument("--pool-granularity", choices=("op", "run"),
                        help="override concurrency > pools > granularity of deploy/celery/dagster.yaml "
                             "(op: each step claims a pool slot as it starts; run: the run queue "
                             "counts runs against the pool, steps claim nothing)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)

    server = services()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="crm-bench-accounts-") as temp:
            for accounts in [int(n) for n in args.accounts.split(",")]:
                for workers in [int(n) for n in args.workers.split(",")]:
                    result = configuration(server, accounts, workers, args.records, args.trivial_runs,
                                           Path(temp) / f"{accounts}x{workers}", args.timeout,
                                           args.pool_granularity)
                    print(render(result), flush=True)
                    results.append(result)
    finally:
        subprocess.run(["bash", str(SERVICES), "down"], stdout=subprocess.DEVNULL)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
