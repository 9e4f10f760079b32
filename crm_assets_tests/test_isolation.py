"""One resource that fails on its own (a 403, a 500 that outlasts the retries) does not stop the
others: they land and are checked, the run fails naming it, and its table and cursor stay as they
were until a run of that asset alone, once the API is fixed, lands it exactly. A 401 stops all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, Backoff, DagsterInstance, Definitions, RetryPolicy, define_asset_job

from crm_assets.assets import crm_sync_assets
from crm_assets.checks import ID_IS_NOT_NULL, ID_IS_UNIQUE, ROW_COUNT_MATCHES_API
from crm_assets.definitions import defs
from crm_assets.resources import RESOURCES as DAGSTER_RESOURCES
from crm_assets.simulator import SimulatorConfig
from crm_assets.simulator.__main__ import build_parser
from crm_assets.sources.crm.settings import CURSOR_FIELD
from crm_assets.sources.crm_pipeline import crm_pipeline

from .conftest import RESOURCES, api_state, failure_message, query, run_sync
from .warehouses import assert_exact

REPO = Path(__file__).resolve().parent.parent
DG = str(Path(sys.executable).parent / "dg")
CHECKS = (ID_IS_UNIQUE, ID_IS_NOT_NULL, ROW_COUNT_MATCHES_API)


def key(resource: str) -> AssetKey:
    return AssetKey(["crm", resource])


def cursor(resource: str):
    """The resource's incremental cursor as the warehouse's dlt state holds it."""
    pipeline = crm_pipeline()
    pipeline.sync_destination()
    resources = pipeline.state["sources"][pipeline.default_schema_name]["resources"]
    return resources[resource]["incremental"][CURSOR_FIELD]["last_value"]


def evaluations(result) -> dict[str, bool]:
    return {e.asset_check_key.to_user_string(): e.passed for e in result.get_asset_check_evaluations()}


def materialized(result) -> set[str]:
    return {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}


def loaded_then_changed(simulator, warehouse, failing: str):
    """A first sync of everything, then edits and inserts in every resource: what the next run
    must land for the others, and must not touch for `failing`."""
    assert run_sync().success
    before = warehouse.table_state(failing), cursor(failing)
    for resource in RESOURCES:
        simulator.mutate(resource, edit=3, insert=2)
    return before


def assert_the_others_landed_and_were_checked(result, simulator, warehouse, failing: str) -> None:
    others = [r for r in RESOURCES if r != failing]
    assert not result.success
    assert materialized(result) == set(others)
    assert evaluations(result) == {f"crm/{r}:{check}": True for r in others for check in CHECKS}
    for resource in others:
        assert warehouse.table_state(resource) == api_state(simulator, resource), resource


def test_a_forbidden_resource_is_left_out_the_others_land_and_a_rerun_of_it_alone_lands_it(
    start_simulator, crm_env, any_warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    files_before, cursor_before = loaded_then_changed(simulator, any_warehouse, "files")
    simulator.configure(forbidden=["files"])

    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("crm_sync").execute_in_process(instance=instance, raise_on_error=False)

        assert_the_others_landed_and_were_checked(result, simulator, any_warehouse, "files")
        message = failure_message(result).splitlines()[0]
        assert "files: GET /v1/files" in message and "403" in message
        assert "dg launch --assets crm/files" in message
        # a 403 is no outage: crm_sync's retry policy does not run the step again
        assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        # crm/files was planned by the failed run and not materialized: Dagster shows it failed
        planned = instance.get_latest_planned_materialization_info(key("files"))
        assert planned is not None and planned.run_id == result.run_id
        logs = "\n".join(str(entry.user_message) for entry in instance.all_logs(result.run_id))
        assert "files failed and is left out of this run" in logs
        assert "Loading the others without it: jobs, contacts, tasks, activities" in logs
        assert any_warehouse.table_state("files") == files_before
        assert cursor("files") == cursor_before

        simulator.configure(forbidden=[])
        simulator.reset_stats()
        rerun = defs.resolve_job_def("crm_sync").execute_in_process(
            instance=instance, asset_selection=[key("files")]
        )

    assert rerun.success and materialized(rerun) == {"files"}
    assert set(evaluations(rerun)) == {f"crm/files:{check}" for check in CHECKS}
    assert all(evaluations(rerun).values())
    any_warehouse.assert_exact(simulator)
    requested = {resource for resource, count in simulator.stats()["requests"].items() if count}
    assert requested == {"files"}  # the others were not read again


def test_a_lasting_500_fails_that_resource_after_its_retries_through_dg_launch(
    start_simulator, crm_env, any_warehouse, tmp_path
):
    simulator = start_simulator()
    crm_env(simulator)
    tasks_before, cursor_before = loaded_then_changed(simulator, any_warehouse, "tasks")
    simulator.configure(fail_resources={"tasks": 500})
    (tmp_path / "dagster_home").mkdir()
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path / "dagster_home"))

    launched = subprocess.run([DG, "launch", "--assets", "*"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    assert launched.returncode != 0
    last_line = launched.stderr.strip().splitlines()[-1]
    assert last_line.startswith("crm sync failed: tasks: GET /v1/tasks"), launched.stderr[-3000:]
    assert "500" in last_line and "dg launch --assets crm/tasks" in last_line
    others = [r for r in RESOURCES if r != "tasks"]
    for resource in others:
        assert any_warehouse.table_state(resource) == api_state(simulator, resource), resource
    assert any_warehouse.table_state("tasks") == tasks_before
    assert cursor("tasks") == cursor_before
    assert simulator.stats()["statuses"]["tasks"]["500"] >= 4  # the first request and its 3 retries

    simulator.configure(fail_resources={})
    assert run_sync(selection=[key("tasks")]).success
    any_warehouse.assert_exact(simulator)


def test_each_failed_resource_is_named_and_a_mix_with_a_403_is_not_retried(start_simulator, crm_env):
    """The step is retried only when every failure is transient: a 503 alone is (test_reliability.py::
    test_retries_exhausted_fail_the_attempt_by_name_and_dagsters_retry_recovers), a 503 and a 403 are not."""
    simulator = start_simulator(fail_resources={"activities": 503}, forbidden=["files"])
    crm_env(simulator)
    quick = define_asset_job(
        "crm_sync_with_quick_retries",  # crm_sync's, without its 30 s delay
        op_retry_policy=RetryPolicy(max_retries=1, delay=0.1, backoff=Backoff.EXPONENTIAL),
    )
    quick_defs = Definitions(assets=[crm_sync_assets], jobs=[quick], resources=DAGSTER_RESOURCES)

    both = quick_defs.resolve_job_def(quick.name).execute_in_process(raise_on_error=False)

    assert not both.success
    assert not [e for e in both.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    message = failure_message(both).splitlines()[0]
    assert "activities: GET /v1/activities" in message and "503" in message
    assert "files: GET /v1/files" in message and "403" in message
    assert set(message.rsplit("dg launch --assets ", 1)[1].split(",")) == {"crm/files", "crm/activities"}
    assert materialized(both) == {"jobs", "contacts", "tasks"}


def test_a_wrong_key_stops_every_resource(start_simulator, crm_env, warehouse):
    simulator = start_simulator(forbidden=["files"])
    crm_env(simulator, api_key="not-the-key")

    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("crm_sync").execute_in_process(instance=instance, raise_on_error=False)
        logs = "\n".join(str(entry.user_message) for entry in instance.all_logs(result.run_id))

    assert not result.success
    assert "401" in failure_message(result)
    assert materialized(result) == set() and evaluations(result) == {}
    assert "Loading the others" not in logs
    assert query(warehouse, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'crm'") == []


def test_the_sync_without_dagster_leaves_a_forbidden_resource_out_and_loads_the_others(
    start_simulator, crm_env, warehouse, capsys
):
    from crm_assets.sources.__main__ import main

    simulator = start_simulator(forbidden=["files"])
    crm_env(simulator)

    assert main() == 1

    out, err = capsys.readouterr()
    assert "files failed and is left out of this run: files: GET /v1/files" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("crm sync failed: files: GET /v1/files") and "403" in last
    assert last.endswith("Loaded the others (jobs, contacts, tasks, activities); once that is fixed, run again")
    assert "crm.jobs: " in out and "crm.files" not in out
    others = [r for r in RESOURCES if r != "files"]
    assert_exact(warehouse, simulator, resources=others)
    assert query(warehouse, "SELECT table_name FROM information_schema.tables WHERE table_name = 'files'") == []

    simulator.configure(forbidden=[])
    assert main() == 0
    assert_exact(warehouse, simulator)


def test_the_simulator_cli_forbids_and_fails_resources_and_its_defaults_are_unchanged():
    parser = build_parser()
    args = parser.parse_args(["--forbid", "files,tasks", "--fail-resources", "jobs,contacts=503"])
    assert args.forbid == ["files", "tasks"]
    assert args.fail_resources == {"jobs": 500, "contacts": 503}
    defaults, config = parser.parse_args([]), SimulatorConfig()
    assert defaults.forbid == config.forbidden and defaults.fail_resources == config.fail_resources
    for bad in (["--forbid", "all"], ["--forbid", "nope"], ["--fail-resources", "files=200"],
                ["--fail-resources", "files=x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
