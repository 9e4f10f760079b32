"""Jobs, retries, the schedule, the sensors and the instance config, as Dagster sees them."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from dagster import (
    AssetKey,
    AssetSelection,
    Backoff,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Jitter,
    RunRequest,
    SkipReason,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from crm_assets import sensors
from crm_assets.assets import WAREHOUSE_POOL
from crm_assets.checks import CRM_FRESHNESS_POLICY
from crm_assets.constants import CHANGE_SENSOR_INTERVAL_SECONDS, CHANGE_SENSOR_OVERLAP_SECONDS, WAREHOUSE_RUN_TAG
from crm_assets.definitions import defs
from crm_assets.assets import crm_sync_assets
from crm_assets.audit import WAREHOUSE_MATCHES_API, crm_audit_checks
from crm_assets.resources import RESOURCES as RESOURCES_BY_KEY
from crm_assets.constants import CRM_AUDIT_CRON
from crm_assets.schedules import crm_audit_schedule, crm_sync_schedule
from crm_assets.sensors import crm_audit_sensor, crm_change_sensor, crm_sync_failure_sensor

from .conftest import API_KEY, RESOURCES, failure_message

REPO = Path(__file__).resolve().parent.parent
CONTACTS = AssetKey(["crm", "contacts"])


def _run_of(instance: DagsterInstance, job_name: str, status: DagsterRunStatus) -> DagsterRun:
    """A run record in the instance, as if a run of `job_name` were under way."""
    return instance.add_run(DagsterRun(job_name=job_name, run_id=str(uuid.uuid4()), status=status))


# --- definitions ---------------------------------------------------------------------------


def test_the_jobs_their_selections_tags_and_retry_policy():
    sync = defs.resolve_job_def("crm_sync")
    checks = defs.resolve_job_def("crm_checks")

    policy = sync.op_retry_policy
    assert policy.max_retries == 3
    assert policy.backoff == Backoff.EXPONENTIAL and policy.jitter == Jitter.PLUS_MINUS
    assert policy.delay and policy.delay > 0
    assert checks.op_retry_policy is None  # a failed check is not worth another attempt
    # the sync loads the five assets and runs their fifteen checks, in one step
    assert {key.path[-1] for key in sync.asset_layer.selected_asset_keys} == set(RESOURCES)
    assert [node.name for node in sync.nodes_in_topological_order] == ["crm_sync_assets"]
    # crm_checks loads nothing: the same step, with only the checks selected
    assert checks.asset_layer.selected_asset_keys == set()
    assert [node.name for node in checks.nodes_in_topological_order] == ["crm_sync_assets"]
    assert len(checks.asset_layer.asset_graph.asset_check_keys) == 3 * len(RESOURCES)
    # the audit's checks run in crm_audit alone: it selects exactly them, the others none of them
    audit = defs.resolve_job_def("crm_audit")
    assert [node.name for node in audit.nodes_in_topological_order] == ["crm_audit_checks"]
    assert audit.asset_layer.selected_asset_keys == set()
    assert {(key.asset_key.path[-1], key.name) for key in audit.asset_layer.asset_graph.asset_check_keys} == {
        (resource, WAREHOUSE_MATCHES_API) for resource in RESOURCES
    }
    for job in (sync, checks):
        assert WAREHOUSE_MATCHES_API not in {key.name for key in job.asset_layer.asset_graph.asset_check_keys}
    assert audit.op_retry_policy is None
    for job in (sync, checks, audit):
        assert job.run_tags[WAREHOUSE_RUN_TAG] == WAREHOUSE_POOL
        assert job.description


def test_the_schedule_and_the_sensors_as_the_ui_shows_them():
    schedule = defs.resolve_schedule_def("crm_sync_schedule")
    assert schedule.cron_schedule == "0 * * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == DefaultScheduleStatus.RUNNING
    assert schedule.job_name == "crm_sync" and schedule.description

    change = defs.resolve_sensor_def("crm_change_sensor")
    assert change.job_name == "crm_sync"
    assert change.minimum_interval_seconds == CHANGE_SENSOR_INTERVAL_SECONDS
    assert change.default_status == DefaultSensorStatus.RUNNING and change.description
    failure = defs.resolve_sensor_def("crm_sync_failure_sensor")
    assert failure.default_status == DefaultSensorStatus.RUNNING and failure.description

    audit = defs.resolve_schedule_def("crm_audit_schedule")
    assert audit.cron_schedule == CRM_AUDIT_CRON == "30 3 * * *"  # daily
    assert audit.default_status == DefaultScheduleStatus.RUNNING
    assert audit.job_name == "crm_audit" and audit.description
    audit_sensor = defs.resolve_sensor_def("crm_audit_sensor")
    assert audit_sensor.default_status == DefaultSensorStatus.RUNNING and audit_sensor.description
    assert audit_sensor.job_name == "crm_audit"

    graph = defs.resolve_asset_graph()
    for key in graph.asset_check_keys:
        assert graph.get(key).description, key
    # freshness: every crm/* asset warns after one missed hour and fails after two
    for resource in RESOURCES:
        assert graph.get(AssetKey(["crm", resource])).freshness_policy == CRM_FRESHNESS_POLICY
    assert CRM_FRESHNESS_POLICY.fail_window.to_timedelta().total_seconds() == 2 * 3600


def test_dagster_yaml_enables_run_retries_and_limits_the_warehouse_to_one_at_a_time(tmp_path):
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert config["run_retries"]["enabled"] is True
    assert config["run_retries"]["retry_on_asset_or_op_failure"] is False
    # a run killed mid-step gives its pool slot back, or every later sync would wait forever
    assert config["run_monitoring"]["enabled"] is True
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_retries_enabled and instance.run_retries_max_retries >= 1
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.run_monitoring_enabled
        storage = instance.event_log_storage
        storage.initialize_concurrency_limit_to_default(WAREHOUSE_POOL)
        assert storage.get_concurrency_info(WAREHOUSE_POOL).slot_count == 1
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
        assert {"key": WAREHOUSE_RUN_TAG, "limit": 1} in limits


# --- crm_change_sensor ---------------------------------------------------------------------


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


def evaluate(instance, cursor):
    context = build_sensor_context(instance=instance, cursor=cursor)
    return crm_change_sensor(context), context.cursor


def test_the_change_sensor_requests_only_what_changed_and_moves_its_cursor(
    start_simulator, crm_env, instance, monkeypatch
):
    simulator = start_simulator()
    crm_env(simulator)
    started = time.time()

    first, cursor = evaluate(instance, None)
    assert isinstance(first, SkipReason) and "First evaluation" in first.skip_message
    assert set(json.loads(cursor)) == set(RESOURCES)
    assert sum(simulator.stats()["count_requests"].values()) == 0  # starting asks nothing

    quiet, cursor = evaluate(instance, cursor)
    assert isinstance(quiet, SkipReason) and "No CRM resource has changed" in quiet.skip_message
    assert simulator.stats()["count_requests"] == {name: 1 for name in RESOURCES}
    assert simulator.stats()["records_served"] == {name: 0 for name in RESOURCES}

    simulator.mutate("contacts", edit=2)
    # the next evaluation, two minutes later
    monkeypatch.setattr(sensors, "_now", lambda: started + 120)
    changed, next_cursor = evaluate(instance, cursor)

    assert isinstance(changed, RunRequest)
    assert changed.asset_selection == [CONTACTS]
    assert changed.tags["crm_assets/changed"] == "contacts"
    # UTC timestamps a person can read in the UI, not epoch integers
    checked = datetime.fromtimestamp(int(started + 120) - CHANGE_SENSOR_OVERLAP_SECONDS, timezone.utc)
    assert json.loads(next_cursor) == {name: checked.strftime("%Y-%m-%dT%H:%M:%SZ") for name in RESOURCES}
    assert all(json.loads(next_cursor)[name] > json.loads(cursor)[name] for name in RESOURCES)

    monkeypatch.setattr(sensors, "_now", lambda: started + 240)
    again, _ = evaluate(instance, next_cursor)
    assert isinstance(again, SkipReason)  # the edits are behind the cursor now


def test_a_record_dated_ahead_does_not_make_the_change_sensor_request_a_sync_at_every_tick(
    start_simulator, crm_env, instance
):
    """A date hours ahead (a wrong clock) stays after the sensor's cursor until that time: counted
    as a change, it would request a sync at every tick. The scheduled sync reads it."""
    simulator = start_simulator()
    crm_env(simulator)
    _, cursor = evaluate(instance, None)
    simulator.mutate("jobs", dated_ahead=1)
    for _ in range(2):
        quiet, cursor = evaluate(instance, cursor)
        assert isinstance(quiet, SkipReason) and "No CRM resource has changed" in quiet.skip_message

    simulator.mutate("jobs", edit=1)
    changed, _ = evaluate(instance, cursor)
    assert isinstance(changed, RunRequest) and changed.asset_selection == [AssetKey(["crm", "jobs"])]


def test_the_change_sensor_reads_an_earlier_versions_epoch_cursor(start_simulator, crm_env, instance):
    simulator = start_simulator()
    crm_env(simulator)
    earlier = json.dumps({name: int(time.time()) - 60 for name in RESOURCES})  # epoch integers
    simulator.mutate("jobs", edit=1)

    changed, cursor = evaluate(instance, earlier)

    assert isinstance(changed, RunRequest) and changed.asset_selection == [AssetKey(["crm", "jobs"])]
    assert all(value.endswith("Z") for value in json.loads(cursor).values())


def test_the_change_sensor_waits_while_a_sync_is_queued_or_running(
    start_simulator, crm_env, instance
):
    simulator = start_simulator()
    crm_env(simulator)
    _, cursor = evaluate(instance, None)
    simulator.mutate("contacts", edit=2)
    run = _run_of(instance, "crm_sync", DagsterRunStatus.STARTED)

    waiting, kept = evaluate(instance, cursor)

    assert isinstance(waiting, SkipReason) and run.run_id in waiting.skip_message
    assert kept == cursor
    assert sum(simulator.stats()["count_requests"].values()) == 0

    instance.report_run_failed(run)
    after, _ = evaluate(instance, cursor)
    assert isinstance(after, RunRequest) and after.asset_selection == [CONTACTS]


def test_the_change_sensor_skips_on_api_errors_keeping_its_cursor_and_the_key_private(
    start_simulator, crm_env, instance, monkeypatch
):
    simulator = start_simulator()
    crm_env(simulator)
    _, cursor = evaluate(instance, None)
    simulator.configure(forbidden=["tasks"])

    denied, kept = evaluate(instance, cursor)

    assert isinstance(denied, SkipReason)
    assert "403" in denied.skip_message and "/v1/tasks" in denied.skip_message
    assert API_KEY not in denied.skip_message
    assert kept == cursor

    monkeypatch.delenv("SOURCES__CRM__BASE_URL")
    unconfigured, kept = evaluate(instance, cursor)
    assert isinstance(unconfigured, SkipReason) and "SOURCES__CRM__BASE_URL" in unconfigured.skip_message
    assert kept == cursor


def test_a_sensor_requested_subset_runs_only_that_assets_load_and_checks(start_simulator, crm_env):
    crm_env(start_simulator())

    with instance_for_test() as instance:
        result = defs.resolve_job_def("crm_sync").execute_in_process(
            instance=instance, asset_selection=[CONTACTS]
        )

    assert result.success
    assert {e.asset_key for e in result.get_asset_materialization_events()} == {CONTACTS}
    checked = {e.asset_check_key.asset_key for e in result.get_asset_check_evaluations()}
    assert checked == {CONTACTS}


# --- crm_sync_schedule ---------------------------------------------------------------------


def test_the_schedule_requests_a_sync_unless_one_is_still_under_way(instance):
    assert isinstance(crm_sync_schedule(build_schedule_context(instance=instance)), RunRequest)

    run = _run_of(instance, "crm_sync", DagsterRunStatus.STARTING)
    skipped = crm_sync_schedule(build_schedule_context(instance=instance))

    assert isinstance(skipped, SkipReason) and run.run_id in skipped.skip_message


def test_the_audit_schedule_requests_an_audit_unless_one_is_still_under_way(instance):
    assert isinstance(crm_audit_schedule(build_schedule_context(instance=instance)), RunRequest)

    run = _run_of(instance, "crm_audit", DagsterRunStatus.STARTING)
    skipped = crm_audit_schedule(build_schedule_context(instance=instance))

    assert isinstance(skipped, SkipReason) and run.run_id in skipped.skip_message


# --- crm_audit_sensor ----------------------------------------------------------------------


def _audit_sensor_after(result, instance):
    context = build_run_status_sensor_context(
        sensor_name="crm_audit_sensor",
        dagster_event=result.get_run_success_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    )
    return crm_audit_sensor(context)


def test_the_audit_sensor_requests_an_audit_of_the_tables_whose_row_count_failed(
    start_simulator, crm_env, instance
):
    simulator = start_simulator()
    crm_env(simulator)
    checks_job = defs.resolve_job_def("crm_checks")
    synced = defs.resolve_job_def("crm_sync").execute_in_process(instance=instance)
    assert synced.success

    quiet = _audit_sensor_after(synced, instance)
    assert isinstance(quiet, SkipReason) and "passed" in quiet.skip_message

    simulator.mutate("files", delete=2)
    simulator.mutate("tasks", delete=1)
    checked = checks_job.execute_in_process(instance=instance)
    assert checked.success  # the row counts only warn
    requested = _audit_sensor_after(checked, instance)

    assert isinstance(requested, RunRequest)
    assert requested.run_key == f"crm_audit_after_{checked.run_id}"
    assert {(key.asset_key.path[-1], key.name) for key in requested.asset_check_keys} == {
        ("files", WAREHOUSE_MATCHES_API), ("tasks", WAREHOUSE_MATCHES_API)
    }

    audit = _run_of(instance, "crm_audit", DagsterRunStatus.STARTED)
    waiting = _audit_sensor_after(checked, instance)
    assert isinstance(waiting, SkipReason) and audit.run_id in waiting.skip_message

    # the requested run audits those two tables, and they equal the API again
    instance.report_run_failed(audit)
    result = materialize(
        [crm_sync_assets, crm_audit_checks], selection=AssetSelection.checks(*requested.asset_check_keys),
        resources=RESOURCES_BY_KEY, instance=instance,
    )
    evaluations = result.get_asset_check_evaluations()
    assert {e.asset_check_key for e in evaluations} == set(requested.asset_check_keys)
    assert all(e.passed for e in evaluations)
    rechecked = checks_job.execute_in_process(instance=instance)
    assert isinstance(_audit_sensor_after(rechecked, instance), SkipReason)


# --- crm_sync_failure_sensor ---------------------------------------------------------------


@pytest.fixture
def webhook():
    """A local Slack-style webhook: records each POST and answers with `status[0]`."""
    received: list[tuple[str, str]] = []
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append((self.headers.get("Content-Type", ""), body.decode("utf-8")))
            self.send_response(status[0])
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/services/T0/B0/webhook-secret", received, status
    server.shutdown()
    server.server_close()


def test_a_failed_sync_is_posted_to_the_webhook_without_the_key(
    start_simulator, crm_env, monkeypatch, webhook, instance
):
    url, received, status = webhook
    simulator = start_simulator()
    crm_env(simulator)
    # the key pasted into the base URL: the API answers 404 and the error quotes the path
    monkeypatch.setenv("SOURCES__CRM__BASE_URL", f"{simulator.url}/{API_KEY}")
    result = defs.resolve_job_def("crm_sync").execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success and API_KEY in failure_message(result)
    context = build_run_status_sensor_context(
        sensor_name="crm_sync_failure_sensor",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    )

    crm_sync_failure_sensor(context)  # no webhook configured: it only logs
    assert received == []

    monkeypatch.setenv("CRM_ALERT_WEBHOOK_URL", url)
    crm_sync_failure_sensor(context)

    assert len(received) == 1
    content_type, body = received[0]
    assert content_type == "application/json"
    text = json.loads(body)["text"]
    assert "crm_sync" in text and result.run_id in text
    assert "404" in text and "/v1/" in text and "[redacted]" in text
    assert API_KEY not in body

    status[0] = 500
    with pytest.raises(Exception) as failed:
        crm_sync_failure_sensor(context)
    assert "500" in str(failed.value) and "webhook-secret" not in str(failed.value)
