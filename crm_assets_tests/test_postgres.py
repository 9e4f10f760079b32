"""PostgreSQL as the warehouse (beyond the tests parametrized with `any_warehouse`), and a
Dagster instance stored in PostgreSQL.

A real server on loopback: `scripts/services.sh up` installs PostgreSQL when it is missing and
starts a private cluster (`make test` does that before pytest; run alone, the session fixture
does it and stops it again). Every test gets a fresh database and selects it the way a user
would: `CRM_DESTINATION=postgres` plus dlt's `DESTINATION__POSTGRES__CREDENTIALS`. The tables
are read back with psycopg2, independently of the pipeline. If the server cannot be installed
or started, these tests fail; they never skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import AssetKey, DagsterInstance

from crm_assets.checks import ID_IS_NOT_NULL, ID_IS_UNIQUE, ROW_COUNT_MATCHES_API
from crm_assets.constants import WAREHOUSE_RUN_TAG
from crm_assets.definitions import defs
from crm_assets.sources.crm_pipeline import crm_pipeline
from crm_assets.sources.destination import ACCEPTED_DESTINATIONS, run_options
from crm_assets.sources.readback import database_location

from .conftest import RESOURCES, SMALL_COUNTS, assert_lists_as_in_api, failure_message, run_sync
from .warehouses import PgDatabase, _create_database, _drop_database

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parent.parent
DEPLOY_INSTANCE_YAML = REPO / "deploy" / "dagster.yaml"
ALL_CHECKS = {
    f"crm/{resource}:{check}"
    for resource in RESOURCES
    for check in (ID_IS_UNIQUE, ID_IS_NOT_NULL, ROW_COUNT_MATCHES_API)
}


def _materializations(result) -> dict[str, dict]:
    return {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("crm_sync_assets")
    }


def _check_evaluations(result) -> dict:
    return {e.asset_check_key.to_user_string(): e for e in result.get_asset_check_evaluations()}


def _meta(evaluation) -> dict[str, Any]:
    return {key: value.value for key, value in evaluation.metadata.items()}


# --- destination selection -------------------------------------------------------------------


def test_crm_destination_selects_postgres_and_its_fast_copy_path(pg_warehouse):
    pipeline = crm_pipeline()

    assert pipeline.destination.destination_name == "postgres"
    # parquet files loaded with COPY through ADBC: faster than INSERT statements (see run_options);
    # without the driver dlt would quietly fall back to INSERTs
    assert run_options(pipeline) == {"loader_file_format": "parquet"}
    assert importlib.util.find_spec("adbc_driver_postgresql") is not None
    location = database_location(pipeline)
    assert pg_warehouse.name in location and pg_warehouse.server["CRM_TEST_PG_PASSWORD"] not in location


def test_an_unknown_crm_destination_loads_the_definitions_but_fails_the_run_saying_what_to_set(
    start_simulator, crm_env, monkeypatch, tmp_path
):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "DESTINATION__"))}
    env["CRM_DESTINATION"] = "snowflak"
    loaded = subprocess.run(
        [sys.executable, "-c", "from crm_assets.definitions import defs; print(len(defs.assets))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "CRM_DESTINATION='snowflak' is not a destination" in loaded.stderr  # said, not raised

    simulator = start_simulator()
    crm_env(simulator)
    monkeypatch.setenv("CRM_DESTINATION", "snowflak")
    result = run_sync(raise_on_error=False)

    assert not result.success
    message = failure_message(result)
    assert "CRM_DESTINATION" in message and "'snowflak'" in message
    assert all(name in message for name in ACCEPTED_DESTINATIONS)
    assert sum(simulator.stats()["requests"].values()) == 0


# --- the sync on PostgreSQL ------------------------------------------------------------------


def test_every_record_lands_once_in_postgres_with_capped_pages_and_a_resource_over_the_window(
    start_simulator, crm_env, pg_warehouse, warehouse, monkeypatch
):
    counts = {**SMALL_COUNTS, "tasks": 10_450}
    simulator = start_simulator(counts, page_cap=300)  # we ask for 1000 and get 300
    crm_env(simulator)
    monkeypatch.setenv("SOURCES__CRM__PAGE_SIZES", json.dumps({"tasks": 1000}))

    result = run_sync()

    assert result.success
    pg_warehouse.assert_exact(simulator)
    assert len(pg_warehouse.table_ids("tasks")) == 10_450
    metadata = _materializations(result)
    for name in RESOURCES:
        assert metadata[f"crm/{name}"]["dagster/row_count"].value == counts[name]
        # rows, not fields (dlt's CSV writer would report ~16x); each page after the first
        # repeats the last record of the one before (pages of 300), merged once
        loaded = metadata[f"crm/{name}"]["crm/records_read"].value
        assert counts[name] <= loaded <= counts[name] + counts[name] // 299 + 1
    load_info = crm_pipeline().last_trace.last_load_info
    formats = {job.job_file_info.file_format
               for package in load_info.load_packages for job in package.jobs["completed_jobs"]}
    assert "parquet" in formats, formats  # the data went through COPY, not INSERTs
    # lists land in their record's row in JSON columns, exactly the API's
    assert_lists_as_in_api(pg_warehouse.query, simulator)
    assert not warehouse.exists()  # nothing went to DuckDB


# --- the checks read PostgreSQL through the pipeline's SQL client ------------------------------


def test_the_checks_pass_on_postgres_and_catch_a_planted_duplicate(
    start_simulator, crm_env, pg_warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    instance = DagsterInstance.ephemeral()

    synced = defs.resolve_job_def("crm_sync").execute_in_process(instance=instance, raise_on_error=False)

    assert synced.success, failure_message(synced)
    checks = _check_evaluations(synced)
    assert set(checks) == ALL_CHECKS and all(e.passed for e in checks.values())
    for resource in RESOURCES:
        assert _meta(checks[f"crm/{resource}:{ROW_COUNT_MATCHES_API}"]) == {
            "table_rows": SMALL_COUNTS[resource],
            "api_count": SMALL_COUNTS[resource],
            "difference": 0,
        }

    # a second copy of one row, with its own _dlt_id (dlt keeps that column unique)
    (duplicated,) = pg_warehouse.query("SELECT MIN(id) FROM crm.jobs")[0]
    columns = [row[0] for row in pg_warehouse.query(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'crm' AND table_name = 'jobs' ORDER BY ordinal_position")]
    select = ", ".join(
        "md5(random()::text)" if column == "_dlt_id" else f'"{column}"' for column in columns
    )
    pg_warehouse.execute(
        f"INSERT INTO crm.jobs ({', '.join(f'{chr(34)}{c}{chr(34)}' for c in columns)}) "
        f"SELECT {select} FROM crm.jobs WHERE id = '{duplicated}'"
    )
    checked = defs.resolve_job_def("crm_checks").execute_in_process(
        instance=instance, raise_on_error=False
    )

    assert not checked.success
    assert f"crm/jobs: {ID_IS_UNIQUE}" in failure_message(checked)
    failed = _check_evaluations(checked)[f"crm/jobs:{ID_IS_UNIQUE}"]
    assert not failed.passed
    assert _meta(failed) == {"duplicate_ids": 1, "extra_rows": 1, "duplicate_id_sample": [duplicated]}
    assert _check_evaluations(checked)[f"crm/contacts:{ID_IS_UNIQUE}"].passed


# --- deploy/dagster.yaml: a Dagster instance stored in PostgreSQL ------------------------------


@pytest.fixture
def deploy_instance_home(postgres_server, monkeypatch, tmp_path) -> Iterator[Path]:
    """DAGSTER_HOME holding deploy/dagster.yaml, its DAGSTER_PG_* pointing at a fresh database."""
    database = _create_database(postgres_server, "dagster_test")
    monkeypatch.setenv("DAGSTER_PG_HOST", postgres_server["CRM_TEST_PG_HOST"])
    monkeypatch.setenv("DAGSTER_PG_PORT", postgres_server["CRM_TEST_PG_PORT"])
    monkeypatch.setenv("DAGSTER_PG_USERNAME", postgres_server["CRM_TEST_PG_USER"])
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", postgres_server["CRM_TEST_PG_PASSWORD"])
    monkeypatch.setenv("DAGSTER_PG_DB", database)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_INSTANCE_YAML, home / "dagster.yaml")
    yield home
    _drop_database(postgres_server, database)


def test_deploy_dagster_yaml_keeps_every_setting_of_the_development_instance():
    deploy = yaml.safe_load(DEPLOY_INSTANCE_YAML.read_text())
    development_yaml = REPO / "dagster.yaml"
    development = yaml.safe_load(development_yaml.read_text()) if development_yaml.exists() else {}

    # production = development + PostgreSQL storage: a setting changed in one must change in both,
    # but concurrency: on PostgreSQL accounts run side by side, one run per account (on DuckDB, one
    # run at a time), test_account_orchestration.py checks both
    for section, settings in (development or {}).items():
        if section == "concurrency":
            # a deployment's runs all pass the queue, which counts them against the pool
            assert (settings["pools"]["granularity"], deploy[section]["pools"]["granularity"]) == ("op", "run")
            assert {limit["key"] for limit in deploy[section]["runs"]["tag_concurrency_limits"]} == {
                limit["key"] for limit in settings["runs"]["tag_concurrency_limits"]
            }
            continue
        assert deploy.get(section) == settings, f"deploy/dagster.yaml differs in `{section}`"
    assert set(deploy["storage"]) == {"postgres"}
    assert deploy["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_deploy_dagster_yaml_is_a_postgres_backed_instance_that_runs_the_sync(
    deploy_instance_home, start_simulator, crm_env, pg_warehouse
):
    from dagster import QueuedRunCoordinator
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    instance = DagsterInstance.from_config(str(deploy_instance_home))  # checks the file's schema
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        # one warehouse run per value of the tag at a time (crm_sync and crm_checks carry it: the
        # single account's runs one value, each account its own) ...
        limits = concurrency.run_queue_config.tag_concurrency_limits
        assert {"key": WAREHOUSE_RUN_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
        assert WAREHOUSE_RUN_TAG in defs.resolve_job_def("crm_sync").run_tags
        # ... and several steps in the `crm_warehouse` pool (assets.py: pool="crm_warehouse"), for
        # accounts side by side
        assert concurrency.pool_config.default_pool_limit == 4

        simulator = start_simulator()
        crm_env(simulator)
        result = defs.resolve_job_def("crm_sync").execute_in_process(
            instance=instance, raise_on_error=False
        )

        assert result.success, failure_message(result)
        pg_warehouse.assert_exact(simulator)
        # the run, its events and its check results live in the Dagster database
        stored = instance.get_run_by_id(result.run_id)
        assert stored is not None and stored.is_success
        assert instance.get_latest_materialization_event(AssetKey(["crm", "jobs"])) is not None
        database = os.environ["DAGSTER_PG_DB"]
        runs = PgDatabase(pg_warehouse.server, database).query(
            "SELECT COUNT(*) FROM runs WHERE run_id = %s", (result.run_id,)
        )
        assert runs == [(1,)]
    finally:
        instance.dispose()
