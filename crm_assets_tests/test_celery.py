"""Many accounts spread over several workers by Dagster's own run launcher (issue 24): the
schedule's tick for 20 accounts runs through deploy/celery/dagster.yaml (PostgreSQL storage, the
queued run coordinator, dagster-celery's CeleryRunLauncher with Redis as broker), the daemon and
two Celery workers, every service started by scripts/services.sh. Each account lands exactly in
its own schema; the one whose key is revoked fails alone, named in its run.

The daemon ticks a schedule only on its cron, so the tick is asked for the way the UI's "Test
schedule" does it: the webserver's GraphQL API evaluates crm_sync_schedule in the code server,
against the instance, and its run requests are queued as the daemon queues a tick's (the job's
run tags under each request's tags); from the queue on, the daemon and the workers do the rest.
The module is one xdist unit (conftest.py: --dist loadscope), so the deployment starts once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crm_assets.simulator import CrmSimulator, SimulatorConfig

from .celery_deployment import (
    CELERY_INSTANCE_YAML,
    CELERY_TASK_TAG,
    CeleryDeployment,
    claim_redis_database,
    instance_env,
    release_redis_database,
    wait_for_runs,
)
from .warehouses import REPO, RESOURCES, PgDatabase, _create_database, _drop_database

ACCOUNT_NAMES = [f"acct{number:02d}" for number in range(1, 21)]
REVOKED = "acct07"
# a few pages' worth per account: the point is 20 accounts through the launcher, not volume
COUNTS = {"jobs": 30, "contacts": 25, "tasks": 20, "activities": 20, "files": 10}
SCHEDULE = "crm_sync_schedule"


def test_the_celery_instance_is_the_deploy_instance_with_the_celery_launcher():
    """deploy/celery/dagster.yaml differs from deploy/dagster.yaml in where runs execute and how
    often the daemon drains the run queue: storage, retries, monitoring and every concurrency
    limit are the same."""
    celery = yaml.safe_load(CELERY_INSTANCE_YAML.read_text())
    deploy = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())

    assert {k: v for k, v in celery.items() if k not in ("run_launcher", "run_coordinator")} == \
        {k: v for k, v in deploy.items() if k not in ("run_launcher", "run_coordinator")}
    coordinator = dict(celery["run_coordinator"])
    assert coordinator.pop("config") == {"dequeue_interval_seconds": 1}
    assert coordinator == deploy["run_coordinator"]
    launcher = celery["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_celery.launcher", "CeleryRunLauncher")
    assert launcher["config"]["broker"] == {"env": "DAGSTER_CELERY_BROKER_URL"}


@pytest.fixture(scope="module")
def accounts_simulator():
    simulator = CrmSimulator(SimulatorConfig(
        counts=dict(COUNTS), accounts=list(ACCOUNT_NAMES),
        account_overrides={REVOKED: {"revoked": True}},
    )).start()
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def celery_deployment(postgres_server, accounts_simulator, tmp_path_factory):
    """The deployment, started once for the module: its own Dagster database and warehouse
    database, a working directory whose .dlt/secrets.toml lists the 20 accounts."""
    root = tmp_path_factory.mktemp("celery")
    workdir = root / "project"
    (workdir / ".dlt").mkdir(parents=True)
    (workdir / ".dlt" / "secrets.toml").write_text("".join(
        f'[sources.crm.accounts.{name}]\nbase_url = "{accounts_simulator.account_url(name)}"\n'
        f'api_key = "key-{name}"\n\n'
        for name in ACCOUNT_NAMES
    ))
    dagster_db = _create_database(postgres_server, "dagster_celery")
    warehouse = PgDatabase(postgres_server, _create_database(postgres_server, "crm_celery"))
    redis_db = claim_redis_database(postgres_server)
    env = {
        **instance_env(postgres_server, dagster_db, redis_db),
        "CRM_DESTINATION": "postgres",
        "DESTINATION__POSTGRES__CREDENTIALS": warehouse.url,
        "DLT_DATA_DIR": str(workdir / "dlt"),
        "RUNTIME__DLTHUB_TELEMETRY": "false",
        "DAGSTER_DISABLE_TELEMETRY": "true",
        "SOURCES__CRM__BACKOFF_FACTOR": "0.01",
    }
    # two processes a worker: a run waits on PostgreSQL and the API for part of its time
    deployment = CeleryDeployment(root, workdir, env, workers=2, concurrency=2)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.setenv("DAGSTER_HOME", str(deployment.home))
        from dagster import DagsterInstance

        # Dagster's tables, created here once: processes starting together would race for them
        instance = DagsterInstance.from_config(str(deployment.home))
        try:
            with deployment:
                deployment.start()
                yield deployment, instance, warehouse
        finally:
            instance.dispose()
            release_redis_database(postgres_server, redis_db)
            _drop_database(postgres_server, warehouse.name)
            _drop_database(postgres_server, dagster_db)


def _failure_text(instance, run_id: str) -> str:
    from dagster import DagsterEventType

    texts = []
    for record in instance.get_records_for_run(run_id, of_type={
            DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}).records:
        event = record.event_log_entry.dagster_event
        texts.append(event.message or "")
        if event.event_type == DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            while error is not None:
                texts.append(error.message)
                error = error.cause
    return "\n".join(texts)


@pytest.mark.postgres
@pytest.mark.timeout(600)  # about 90 s alone; under make test it shares the cores with two more workers
def test_the_schedule_tick_for_20_accounts_runs_on_both_workers_and_lands_each_exactly(
    celery_deployment, accounts_simulator
):
    deployment, instance, warehouse = celery_deployment
    deployment.stop_automation()  # nothing but this tick requests runs meanwhile

    requests = deployment.evaluate_schedule(SCHEDULE)
    run_ids = deployment.launch(requests, "crm_sync")
    runs = wait_for_runs(instance, run_ids, timeout=420)

    by_account = {run.tags.get("dagster/partition"): run for run in runs}
    assert sorted(by_account) == ACCOUNT_NAMES, "one run per account"
    failed = sorted(name for name, run in by_account.items() if not run.is_success)
    assert failed == [REVOKED], {name: _failure_text(instance, by_account[name].run_id) for name in failed}

    # the revoked account's run says which account and why
    failure = _failure_text(instance, by_account[REVOKED].run_id)
    assert REVOKED in failure and "401" in failure, failure

    # every other account: every id of its API once, in its own schema
    for name in ACCOUNT_NAMES:
        if name == REVOKED:
            continue
        account = accounts_simulator.account(name)
        for resource in RESOURCES:
            landed = [row[0] for row in warehouse.query(f"SELECT id FROM crm_{name}.{resource}")]
            assert sorted(landed) == sorted(account.ids(resource)), f"{name}: {resource}"
    assert "crm_" + REVOKED not in {row[0] for row in warehouse.query(
        "SELECT DISTINCT table_schema FROM information_schema.tables WHERE table_name = 'jobs'")}

    # the launcher handed every run to Celery, and both workers ran some
    owners = deployment.worker_of_tasks()
    workers = {owners.get(run.tags.get(CELERY_TASK_TAG)) for run in runs}
    assert workers == {"w1", "w2"}, workers
