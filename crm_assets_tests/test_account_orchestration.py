"""Orchestration with many accounts: the schedules and sensors request one run per account, skip
only the accounts that are busy or unreachable, and the instance limits runs per account.

In process: the definitions are built for accounts configured through dlt's providers (the
environment: SOURCES__CRM__ACCOUNTS), served by one simulator with an account per path prefix.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    RunRequest,
    SensorResult,
    SkipReason,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from crm_assets import sensors
from crm_assets.assets import build_crm_sync_assets
from crm_assets.audit import WAREHOUSE_MATCHES_API, build_crm_audit_checks
from crm_assets.checks import ROW_COUNT_MATCHES_API
from crm_assets.constants import CHANGE_SENSOR_OVERLAP_SECONDS, WAREHOUSE_RUN_TAG
from crm_assets.definitions import defs
from crm_assets.jobs import crm_audit, crm_sync
from crm_assets.resources import RESOURCES as DAGSTER_RESOURCES
from crm_assets.schedules import audit_schedule, sync_schedule
from crm_assets.sensors import change_sensor, crm_audit_sensor, crm_sync_failure_sensor
from crm_assets.simulator import CrmSimulator, SimulatorConfig
from crm_assets.sources.crm.accounts import configured_accounts

from .conftest import failure_message

REPO = Path(__file__).resolve().parent.parent
NAMES = ["acme", "beta", "cora"]
# few records: these tests are about which runs are requested, not about loading
COUNTS = {"jobs": 30, "contacts": 40, "tasks": 20, "activities": 25, "files": 10}
PARTITION_TAG = "dagster/partition"
JOBS = AssetKey(["crm", "jobs"])
TICK = datetime(2026, 12, 3, 14, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def simulator():
    with CrmSimulator(SimulatorConfig(accounts=NAMES, counts=COUNTS)) as simulator:
        yield simulator


@pytest.fixture
def accounts(simulator, monkeypatch, tmp_path):
    """The three accounts, configured as a deployment would (dlt's providers), each with its key."""
    for name in NAMES:
        simulator.account(name).reset()
    monkeypatch.setenv(
        "SOURCES__CRM__ACCOUNTS",
        json.dumps({name: {"base_url": simulator.account_url(name), "api_key": f"key-{name}"} for name in NAMES}),
    )
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(tmp_path / "warehouse.duckdb"))
    return configured_accounts()


@pytest.fixture(scope="module")
def module_instance():
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def instance(module_instance):
    """One instance for the module (setting one up costs a second or two), without the runs an
    earlier test left in it: they would be runs under way."""
    for run in module_instance.get_runs():
        module_instance.delete_run(run.run_id)
    return module_instance


def _run_for(instance: DagsterInstance, job_name: str, account: str, status: DagsterRunStatus) -> DagsterRun:
    """A run record of `job_name` for `account`, as if it were under way."""
    return instance.add_run(
        DagsterRun(job_name=job_name, run_id=str(uuid.uuid4()), status=status, tags={PARTITION_TAG: account})
    )


def _definitions(accounts) -> Definitions:
    """The code location's definitions as they are with these accounts configured."""
    return Definitions(
        assets=[build_crm_sync_assets(accounts)],
        asset_checks=[build_crm_audit_checks(accounts)],
        jobs=[crm_sync, crm_audit],
        schedules=[sync_schedule(accounts), audit_schedule(accounts)],
        sensors=[change_sensor(accounts)],
        resources=DAGSTER_RESOURCES,
    )


# --- the schedules ---------------------------------------------------------------------------


def test_the_schedule_requests_one_run_per_account_with_its_partition_and_tag(accounts, instance):
    defs = _definitions(accounts)
    context = build_schedule_context(
        instance=instance, scheduled_execution_time=TICK, repository_def=defs.get_repository_def()
    )

    # evaluated as the daemon does: partition keys resolved against the job's partitions
    requests = defs.resolve_schedule_def("crm_sync_schedule").evaluate_tick(context).run_requests

    assert [request.partition_key for request in requests] == NAMES
    for name, request in zip(NAMES, requests):
        assert request.tags[PARTITION_TAG] == name
        assert request.tags[WAREHOUSE_RUN_TAG] == f"account:{name}"  # overrides the job's own value
        assert request.run_key == f"crm_sync:{name}:2026-12-03T14:00:00Z"
        assert f"key-{name}" not in json.dumps(request.tags)


def test_the_schedule_skips_an_account_whose_sync_is_under_way_and_requests_the_others(
    accounts, instance, capsys
):
    schedule = sync_schedule(accounts)
    busy = _run_for(instance, "crm_sync", "beta", DagsterRunStatus.STARTED)
    _run_for(instance, "crm_audit", "acme", DagsterRunStatus.STARTED)  # another job: no reason to skip

    requests = schedule(build_schedule_context(instance=instance, scheduled_execution_time=TICK))

    assert [request.partition_key for request in requests] == ["acme", "cora"]
    assert f"beta (run {busy.run_id} started)" in capsys.readouterr().err  # the tick's log names it

    for name in ("acme", "cora"):
        _run_for(instance, "crm_sync", name, DagsterRunStatus.STARTING)
    skipped = schedule(build_schedule_context(instance=instance, scheduled_execution_time=TICK))
    assert isinstance(skipped, SkipReason)
    assert all(name in skipped.skip_message for name in NAMES)

    instance.report_run_failed(busy)  # over: beta is requested again
    assert [request.partition_key for request in schedule(build_schedule_context(instance=instance, scheduled_execution_time=TICK))] == ["beta"]


def test_the_audit_schedule_requests_an_audit_per_account_by_its_partition_tag(accounts, instance):
    _run_for(instance, "crm_audit", "cora", DagsterRunStatus.STARTING)

    requests = audit_schedule(accounts)(build_schedule_context(instance=instance, scheduled_execution_time=TICK))

    # crm_audit selects checks alone, which Dagster cannot partition: the account goes as the tag
    assert [request.tags[PARTITION_TAG] for request in requests] == ["acme", "beta"]
    assert all(request.partition_key is None for request in requests)
    assert requests[0].tags[WAREHOUSE_RUN_TAG] == "account:acme"


# --- crm_change_sensor -----------------------------------------------------------------------


def _evaluate(sensor, instance, cursor):
    result = sensor(build_sensor_context(instance=instance, cursor=cursor))
    assert isinstance(result, SensorResult)
    return result, result.cursor


def test_the_change_sensor_requests_only_the_accounts_that_changed(
    accounts, simulator, instance, monkeypatch
):
    sensor = change_sensor(accounts)
    started = time.time()
    first, cursor = _evaluate(sensor, instance, None)
    assert not first.run_requests and "First evaluation for acme, beta, cora" in first.skip_reason.skip_message
    assert set(json.loads(cursor)) == set(NAMES)

    simulator.account("beta").mutate("contacts", edit=2)
    simulator.account("cora").mutate("jobs", edit=1)
    monkeypatch.setattr(sensors, "_now", lambda: started + 120)
    changed, next_cursor = _evaluate(sensor, instance, cursor)

    assert [(r.partition_key, r.asset_selection) for r in changed.run_requests] == [
        ("beta", [AssetKey(["crm", "contacts"])]),
        ("cora", [AssetKey(["crm", "jobs"])]),
    ]
    assert changed.run_requests[0].tags[WAREHOUSE_RUN_TAG] == "account:beta"
    assert changed.run_requests[0].tags["crm_assets/changed"] == "contacts"
    # every account asked its API with its own key (a wrong key answers 401 and nothing is requested)
    for name in NAMES:
        assert sum(simulator.account(name).stats()["count_requests"].values()) == len(COUNTS)
    moved = datetime.fromtimestamp(int(started + 120) - CHANGE_SENSOR_OVERLAP_SECONDS, timezone.utc)
    assert json.loads(next_cursor)["acme"]["jobs"] == moved.strftime("%Y-%m-%dT%H:%M:%SZ")

    monkeypatch.setattr(sensors, "_now", lambda: started + 240)
    quiet, _ = _evaluate(sensor, instance, next_cursor)  # the edits are behind every cursor now
    assert not quiet.run_requests
    assert quiet.skip_reason.skip_message == "Nothing changed since the last evaluation in 3 account(s)"


def test_the_change_sensor_skips_an_unreachable_or_busy_account_and_requests_the_others(
    accounts, simulator, instance, monkeypatch, capsys
):
    sensor = change_sensor(accounts)
    started = time.time()
    _, cursor = _evaluate(sensor, instance, None)
    simulator.account("acme").configure(revoked=True)  # acme's API answers 401 to its key
    busy = _run_for(instance, "crm_sync", "beta", DagsterRunStatus.STARTED)
    for name in NAMES:
        simulator.account(name).mutate("tasks", edit=1)
    monkeypatch.setattr(sensors, "_now", lambda: started + 120)

    result, next_cursor = _evaluate(sensor, instance, cursor)

    assert [r.partition_key for r in result.run_requests] == ["cora"]
    log = capsys.readouterr().err
    assert "Could not ask the CRM API of account acme: " in log and "401" in log
    assert "check api_key under [sources.crm.accounts.acme]" in log  # its own setting, not the single account's
    assert f"beta (crm_sync run {busy.run_id} started)" in log
    assert "key-acme" not in log
    # acme and beta keep their cursors: their changes are requested once they can be
    assert json.loads(next_cursor)["acme"] == json.loads(cursor)["acme"]
    assert json.loads(next_cursor)["beta"] == json.loads(cursor)["beta"]
    assert json.loads(next_cursor)["cora"] != json.loads(cursor)["cora"]
    assert sum(simulator.account("beta").stats()["count_requests"].values()) == 0  # not even asked

    simulator.account("acme").configure(revoked=False)
    instance.report_run_failed(busy)
    monkeypatch.setattr(sensors, "_now", lambda: started + 240)
    later, _ = _evaluate(sensor, instance, next_cursor)
    assert [r.partition_key for r in later.run_requests] == ["acme", "beta"]


def test_the_change_sensor_leaves_an_account_that_does_not_answer_in_time_for_the_next_tick(
    accounts, simulator, instance, monkeypatch, capsys
):
    sensor = change_sensor(accounts)
    _, cursor = _evaluate(sensor, instance, None)
    for name in NAMES:
        simulator.account(name).mutate("files", edit=1)
    # cora was last asked a minute before the others (a tick's deadline left it out): asked first
    cursors = json.loads(cursor)
    earlier = datetime.fromisoformat(cursors["cora"]["jobs"].replace("Z", "+00:00")).timestamp() - 60
    cursors["cora"] = {name: datetime.fromtimestamp(earlier, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") for name in cursors["cora"]}
    simulator.account("beta").configure(latency_ms=1500)  # each of its answers takes 1.5 s
    monkeypatch.setattr(sensors, "CHANGE_SENSOR_ACCOUNTS_DEADLINE_SECONDS", 1.0)
    monkeypatch.setattr(sensors, "CHANGE_SENSOR_ACCOUNT_THREADS", 1)  # one at a time: the order shows

    started = time.monotonic()
    result, next_cursor = _evaluate(sensor, instance, json.dumps(cursors))

    assert time.monotonic() - started < 1.4  # the tick did not wait for beta
    # cora first (oldest), then acme and beta; beta's slow answer left nobody behind it
    assert [r.partition_key for r in result.run_requests] == ["acme", "cora"]
    assert "Could not ask the CRM API of account beta: no answer within 1.0s" in capsys.readouterr().err
    assert json.loads(next_cursor)["beta"] == cursors["beta"]
    # beta's request under way is answered, and no other is sent once the tick is over
    simulator.account("beta").configure(latency_ms=0)
    answered = time.monotonic() + 10
    while not sum(simulator.account("beta").stats()["count_requests"].values()) and time.monotonic() < answered:
        time.sleep(0.05)
    time.sleep(0.2)
    assert sum(simulator.account("beta").stats()["count_requests"].values()) == 1


# --- a failed run, and the audit, per account -------------------------------------------------


def test_a_failed_account_is_named_in_the_alert_and_its_audit_is_of_its_own_tables(
    accounts, simulator, instance, capsys
):
    defs = _definitions(accounts)
    sync = defs.resolve_job_def("crm_sync")

    # cora's key is revoked: its run fails alone, and the alert names it without the key
    simulator.account("cora").configure(revoked=True)
    failed = sync.execute_in_process(instance=instance, partition_key="cora", raise_on_error=False)
    assert not failed.success and "401" in failure_message(failed)
    context = build_run_status_sensor_context(
        sensor_name="crm_sync_failure_sensor", dagster_event=failed.get_run_failure_event(),
        dagster_instance=instance, dagster_run=failed.dagster_run,
    )
    capsys.readouterr()
    crm_sync_failure_sensor(context)  # no webhook configured: it logs what a webhook would get
    alert = capsys.readouterr().err
    assert f"Dagster job `crm_sync` failed for account `cora` (run `{failed.run_id}`)" in alert
    assert "401" in alert and "key-cora" not in alert

    # beta's jobs land; then a record vanishes from its API, the row count fails, and the audit
    # sensor asks for an audit of beta's table alone, by beta's partition
    synced = sync.execute_in_process(instance=instance, partition_key="beta", asset_selection=[JOBS])
    assert synced.success
    simulator.account("beta").mutate("jobs", delete=1)
    checked = sync.execute_in_process(
        instance=instance, partition_key="beta", asset_selection=[JOBS],
        run_config={"ops": {"crm_sync_assets": {"config": {"checks_only": True}}}},
    )
    failed_counts = [
        e.asset_check_key.asset_key
        for e in checked.get_asset_check_evaluations()
        if e.asset_check_key.name == ROW_COUNT_MATCHES_API and not e.passed
    ]
    assert failed_counts == [JOBS]
    _run_for(instance, "crm_audit", "acme", DagsterRunStatus.STARTED)  # another account's audit: no wait
    request = crm_audit_sensor(
        build_run_status_sensor_context(
            sensor_name="crm_audit_sensor", dagster_event=checked.get_run_success_event(),
            dagster_instance=instance, dagster_run=checked.dagster_run,
        )
    )
    assert isinstance(request, RunRequest)
    assert request.tags[PARTITION_TAG] == "beta" and request.tags[WAREHOUSE_RUN_TAG] == "account:beta"
    assert request.asset_check_keys == [AssetCheckKey(JOBS, WAREHOUSE_MATCHES_API)]

    # the requested run (its checks, its tags) repairs beta's table and passes, stored for beta
    audit = materialize(
        [build_crm_sync_assets(accounts), build_crm_audit_checks(accounts)],
        selection=AssetSelection.checks(*request.asset_check_keys), tags=request.tags,
        resources=DAGSTER_RESOURCES, instance=instance,
    )
    (evaluation,) = audit.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.partition == "beta"
    assert evaluation.description.startswith("crm_beta.jobs equals the API")
    assert evaluation.metadata["gone"].value == 1


# --- the instance: one run per account at a time ----------------------------------------------


def _concurrency(tmp_path: Path, name: str, config: dict):
    """The run-queue and pool limits Dagster reads from an instance holding `config`."""
    home = tmp_path / name
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    with DagsterInstance.from_config(str(home)) as instance:
        return instance.get_concurrency_config()


def test_the_instances_limit_runs_per_account_and_deploy_runs_accounts_in_parallel(tmp_path):
    per_value = {"applyLimitPerUniqueValue": True}
    development = yaml.safe_load((REPO / "dagster.yaml").read_text())
    dev = _concurrency(tmp_path, "dev", development)
    # DuckDB: every account's dataset is in one file, one writer: one warehouse run at a time
    # whatever its account, and one step in the pool
    assert {"key": WAREHOUSE_RUN_TAG, "limit": 1} in dev.run_queue_config.tag_concurrency_limits
    assert {"key": PARTITION_TAG, "value": per_value, "limit": 1} in dev.run_queue_config.tag_concurrency_limits
    assert dev.pool_config.default_pool_limit == 1

    # PostgreSQL (deploy/dagster.yaml; its storage needs a server, test_postgres.py loads it whole):
    # one run per account (both tags, so runs launched from the UI too), several accounts at once
    deploy = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    prod = _concurrency(tmp_path, "deploy", {"concurrency": deploy["concurrency"]})
    limits = prod.run_queue_config.tag_concurrency_limits
    assert {"key": WAREHOUSE_RUN_TAG, "value": per_value, "limit": 1} in limits
    assert {"key": PARTITION_TAG, "value": per_value, "limit": 1} in limits
    assert not any(limit["key"] == WAREHOUSE_RUN_TAG and "value" not in limit for limit in limits)
    assert prod.pool_config.default_pool_limit > 1
    # the single account's runs all carry their job's one value: still one at a time there
    values = {defs.resolve_job_def(job).run_tags[WAREHOUSE_RUN_TAG] for job in ("crm_sync", "crm_checks", "crm_audit")}
    assert values == {"crm_warehouse"}
