"""End to end through Dagster's `materialize()`: real HTTP to the simulator, a real DuckDB file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import AssetKey

from .conftest import (
    API_KEY,
    RESOURCES,
    SMALL_COUNTS,
    all_event_text,
    api_state,
    assert_exact,
    assert_lists_as_in_api,
    failure_message,
    query,
    run_sync,
    table_ids,
    table_state,
)

REPO = Path(__file__).resolve().parent.parent
DG = str(Path(sys.executable).parent / "dg")


def _materializations(result) -> dict[str, dict]:
    return {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("crm_sync_assets")
    }


def test_every_record_lands_once_when_pages_are_capped_below_the_asked_size(
    start_simulator, crm_env, warehouse
):
    simulator = start_simulator(page_cap=37)  # we ask for 1000 (tasks: 100) and get 37
    crm_env(simulator)

    result = run_sync()

    assert result.success
    assert_exact(warehouse, simulator)
    metadata = _materializations(result)
    assert set(metadata) == {f"crm/{name}" for name in RESOURCES}
    for name in RESOURCES:
        assert metadata[f"crm/{name}"]["dagster/row_count"].value == SMALL_COUNTS[name]
    # lists land in their record's row in JSON columns, exactly the API's
    assert_lists_as_in_api(lambda sql: query(warehouse, sql), simulator)


def test_a_resource_larger_than_the_result_window_is_read_completely(
    start_simulator, crm_env, warehouse, monkeypatch
):
    counts = {**SMALL_COUNTS, "tasks": 10_450}
    simulator = start_simulator(counts, page_cap=300)
    crm_env(simulator)
    monkeypatch.setenv("SOURCES__CRM__PAGE_SIZES", json.dumps({"tasks": 1000}))

    result = run_sync(selection=[AssetKey(["crm", "tasks"])])

    assert result.success
    assert_exact(warehouse, simulator, resources=["tasks"])
    assert len(table_ids(warehouse, "tasks")) == 10_450


def test_retried_faults_and_offset_drift_lose_and_duplicate_nothing(
    start_simulator, crm_env, warehouse
):
    simulator = start_simulator(
        page_cap=50,
        fault_every=3,
        fault_kinds=["429", "500", "502", "503", "504", "drop"],
        retry_after=0,
        drift_every=2,
    )
    crm_env(simulator)

    result = run_sync()

    assert result.success
    assert_exact(warehouse, simulator)
    statuses = simulator.stats()["statuses"]
    assert any(str(code) in json.dumps(statuses) for code in (429, 500, 502, 503, 504))


def test_a_second_run_merges_edits_inserts_and_deactivations_in_place(
    start_simulator, crm_env, any_warehouse
):
    simulator = start_simulator(page_cap=64)
    crm_env(simulator)
    assert run_sync().success
    before = any_warehouse.table_state("jobs")

    changed = simulator.mutate("jobs", edit=7, insert=4, deactivate=3)
    simulator.mutate("contacts", edit=2, insert=1)
    result = run_sync()

    assert result.success
    any_warehouse.assert_exact(simulator)
    after = any_warehouse.table_state("jobs")
    assert len(after) == len(before) + 4
    for record_id in changed["deactivated"]:
        assert after[record_id][2] is False
    for record_id in changed["edited"]:
        assert after[record_id] != before[record_id]
        assert after[record_id] == api_state(simulator, "jobs")[record_id]


def test_a_wrong_key_fails_fast_readably_and_without_printing_the_key(
    start_simulator, crm_env, warehouse, capfd
):
    simulator = start_simulator()
    wrong_key = "wrong-key-7d41b0e2"
    crm_env(simulator, api_key=wrong_key)

    result = run_sync(raise_on_error=False)

    assert not result.success
    message = failure_message(result)
    assert "401" in message and "API key" in message and "SOURCES__CRM__API_KEY" in message
    requests_made = simulator.stats()["requests"]
    assert all(requests_made.get(name, 0) <= 1 for name in RESOURCES), requests_made
    captured = capfd.readouterr()
    for text in (all_event_text(result), captured.out, captured.err):
        assert wrong_key not in text
    assert not warehouse.exists() or not query(
        warehouse, "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'jobs'"
    )[0][0]


def test_a_200_that_is_not_json_fails_naming_the_resource_and_leaves_tables_alone(
    start_simulator, crm_env, warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync().success
    before = table_state(warehouse, "activities")

    simulator.mutate("activities", edit=3)
    simulator.configure(corrupt={"activities": "html"})
    result = run_sync(raise_on_error=False)

    assert not result.success
    message = failure_message(result)
    assert "activities" in message and "/v1/activities" in message and "not JSON" in message
    assert table_state(warehouse, "activities") == before


def test_missing_configuration_fails_before_any_request_saying_what_to_set(
    start_simulator, warehouse, monkeypatch
):
    simulator = start_simulator()
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))
    monkeypatch.setenv("SOURCES__CRM__API_KEY", API_KEY)

    result = run_sync(raise_on_error=False)

    assert not result.success
    assert "SOURCES__CRM__BASE_URL" in failure_message(result)
    assert sum(simulator.stats()["requests"].values()) == 0


def test_a_subset_materializes_only_the_selected_resource(start_simulator, crm_env, warehouse):
    simulator = start_simulator()
    crm_env(simulator)

    result = run_sync(selection=[AssetKey(["crm", "files"])])

    assert result.success
    assert set(_materializations(result)) == {"crm/files"}
    tables = {row[0] for row in query(
        warehouse, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'crm'")}
    assert "files" in tables and "jobs" not in tables
    assert_exact(warehouse, simulator, resources=["files"])


@pytest.mark.parametrize("spelling", ["SOURCES__CRM__API_KEY", "API_KEY"])
def test_the_api_key_can_be_given_in_the_seed_specs_spelling_too(
    start_simulator, crm_env, warehouse, monkeypatch, spelling
):
    simulator = start_simulator()
    crm_env(simulator)
    monkeypatch.delenv("SOURCES__CRM__API_KEY")
    monkeypatch.setenv(spelling, API_KEY)

    assert run_sync(selection=[AssetKey(["crm", "files"])]).success
    assert_exact(warehouse, simulator, resources=["files"])


def test_the_five_resources_are_read_at_once(start_simulator, crm_env, warehouse):
    # dlt's rest_api `parallelized` flag is lost for independent resources in dlt 1.31; the
    # source parallelizes them itself. With 20 ms a request, reads overlap if they are parallel.
    simulator = start_simulator(latency_ms=20)
    crm_env(simulator)

    assert run_sync().success

    assert simulator.stats()["peak_in_flight"] >= 3
    assert_exact(warehouse, simulator)


def _closed_port() -> int:
    with socket.socket() as probe:  # a port nothing listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("where", ["refused", "unresolvable"])
def test_an_unreachable_api_fails_once_naming_the_address_and_the_setting(where, warehouse, monkeypatch):
    base_url = f"http://127.0.0.1:{_closed_port()}" if where == "refused" else "http://crm-api.invalid"
    monkeypatch.setenv("SOURCES__CRM__BASE_URL", base_url)
    monkeypatch.setenv("SOURCES__CRM__API_KEY", API_KEY)
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))

    result = run_sync(selection=[AssetKey(["crm", "files"])], raise_on_error=False)

    assert not result.success
    message = failure_message(result)
    assert base_url in message and "SOURCES__CRM__BASE_URL" in message, message
    assert ("refused" if where == "refused" else "does not resolve") in message
    assert "urllib3" not in message and "Traceback" not in message
    assert message.count(base_url) == 1  # said once, not repeated down the cause chain


def _refused(warehouse, monkeypatch) -> str:
    base_url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("SOURCES__CRM__BASE_URL", base_url)
    monkeypatch.setenv("SOURCES__CRM__API_KEY", API_KEY)
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))
    monkeypatch.delenv("SOURCES__CRM__BACKOFF_FACTOR")  # the real policy: 2, 4 and 8 s
    return base_url


def test_a_refused_first_connection_fails_at_once_through_materialize_and_the_crm_sync_job(
    warehouse, monkeypatch
):
    """No HTTP retry and no op retry: an API that never answered is not running at that address."""
    from dagster import DagsterEventType, DagsterInstance

    from crm_assets.definitions import defs

    base_url = _refused(warehouse, monkeypatch)

    started = time.monotonic()
    result = run_sync(raise_on_error=False)
    assert time.monotonic() - started < 10
    assert not result.success
    message = failure_message(result)
    assert f"the connection was refused at {base_url}" in message, message
    assert "before the API answered any request" in message and "SOURCES__CRM__BASE_URL" in message

    with DagsterInstance.ephemeral() as instance:
        started = time.monotonic()
        job = defs.resolve_job_def("crm_sync").execute_in_process(instance=instance, raise_on_error=False)
        elapsed = time.monotonic() - started
        retries = instance.all_logs(job.run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY)
    assert not job.success and elapsed < 10, elapsed
    assert not retries
    assert f"the connection was refused at {base_url}" in failure_message(job)


def test_dg_launch_against_a_refused_port_ends_with_the_one_line_that_says_what_to_do(
    warehouse, tmp_path, monkeypatch
):
    base_url = _refused(warehouse, monkeypatch)
    (tmp_path / "dagster_home").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "API_KEY"}
    env["DAGSTER_HOME"] = str(tmp_path / "dagster_home")

    started = time.monotonic()
    launched = subprocess.run([DG, "launch", "--assets", "*"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    assert launched.returncode != 0
    assert time.monotonic() - started < 60  # the CLI's own start-up included; no retry waits
    last = launched.stderr.strip().splitlines()[-1]
    assert last.startswith("crm sync failed: ") and f"refused at {base_url}" in last, launched.stderr[-2000:]
    assert "SOURCES__CRM__BASE_URL" in last
    assert "Traceback" not in last


def test_a_connection_dropped_after_the_api_answered_is_retried_as_transient(start_simulator):
    """The same refusal once the API has answered (here: it stopped mid-run) is an outage: the
    HTTP retries run, and the error leaves the op's retry policy free to try again."""
    import copy

    from crm_assets.assets import _is_transient
    from crm_assets.sources.crm import CrmApiError
    from crm_assets.sources.crm.http import CrmSession

    simulator = start_simulator()
    session = CrmSession(backoff_factor=0.01)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{simulator.url}/v1/jobs?size=3"
    assert session.get(url, headers=headers).status_code == 200
    other_copy = copy.deepcopy(session)  # dlt and Dagster copy sessions: the copy knows too
    simulator.stop()

    with pytest.raises(CrmApiError) as raised:
        other_copy.get(url, headers=headers)
    assert "after 3 retries" in str(raised.value) and not raised.value.unreachable
    assert _is_transient(raised.value)
    with pytest.raises(CrmApiError) as first:
        CrmSession(backoff_factor=0.01).get(url, headers=headers)  # a new run's first request
    assert first.value.unreachable and not _is_transient(first.value)


def test_a_host_that_does_not_resolve_is_not_worth_a_retry_and_a_refusal_is():
    from crm_assets.assets import _is_transient
    from crm_assets.sources.crm import CrmApiError

    assert not _is_transient(CrmApiError("x", resource="jobs", path="/v1/jobs", unresolvable=True))
    assert not _is_transient(CrmApiError("x", resource="jobs", path="/v1/jobs", unreachable=True))
    assert _is_transient(CrmApiError("x", resource="jobs", path="/v1/jobs"))


def test_no_staging_copy_is_left_after_a_load(start_simulator, crm_env, any_warehouse):
    simulator = start_simulator()
    crm_env(simulator)

    assert run_sync().success
    simulator.mutate("jobs", edit=4)
    assert run_sync().success  # a merge: dlt staged the changed rows in crm_staging

    schemas = {row[0] for row in any_warehouse.query("SELECT schema_name FROM information_schema.schemata")}
    assert "crm" in schemas and "crm_staging" not in schemas
    any_warehouse.assert_exact(simulator)


def test_the_retry_budget_for_an_unreachable_api_stays_under_40_seconds_of_waiting():
    """The spec's policy (3 retries, factor 2): 2 + 4 + 8 s of backoff before the error, plus four
    connection attempts, which a refused port or a name that does not resolve answer at once."""
    from crm_assets.sources.crm.http import CrmSession

    session = CrmSession()
    waits = [session.backoff_seconds(retry) for retry in range(1, session.max_retries + 1)]
    assert waits == [2.0, 4.0, 8.0]
    assert sum(waits) < 40
