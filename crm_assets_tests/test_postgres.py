"""The same guarantees with PostgreSQL as the warehouse, and a Dagster instance stored in PostgreSQL.

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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import psycopg2
import pytest
import yaml
from dagster import AssetKey, DagsterInstance

from crm_assets.checks import ID_IS_NOT_NULL, ID_IS_UNIQUE, ROW_COUNT_MATCHES_API
from crm_assets.constants import WAREHOUSE_RUN_TAG
from crm_assets.definitions import defs
from crm_assets.sources.crm_pipeline import (
    ACCEPTED_DESTINATIONS,
    crm_pipeline,
    database_location,
    run_options,
)

from .conftest import RESOURCES, SMALL_COUNTS, api_state, failure_message, run_sync

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "scripts" / "services.sh"
DEPLOY_INSTANCE_YAML = REPO / "deploy" / "dagster.yaml"
ALL_CHECKS = {
    f"crm/{resource}:{check}"
    for resource in RESOURCES
    for check in (ID_IS_UNIQUE, ID_IS_NOT_NULL, ROW_COUNT_MATCHES_API)
}


# --- the server and a database per test ------------------------------------------------------


def _services(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SERVICES), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[dict[str, str]]:
    """The loopback PostgreSQL of scripts/services.sh: reused if up, else started (and stopped)."""
    already_up = _services("env", timeout=60).returncode == 0
    if not already_up:
        started = _services("up", timeout=1200)
        if started.returncode != 0:
            pytest.fail(
                "scripts/services.sh up could not install or start PostgreSQL:\n"
                + (started.stdout + started.stderr)[-4000:],
                pytrace=False,
            )
    listed = _services("env", timeout=60)
    if listed.returncode != 0:
        pytest.fail(f"PostgreSQL is not answering: {listed.stderr[-2000:]}", pytrace=False)
    server = dict(line.split("=", 1) for line in listed.stdout.splitlines() if "=" in line)
    yield server
    if not already_up:
        _services("down", timeout=120)


def _connect(server: dict[str, str], database: str):
    return psycopg2.connect(
        host=server["CRM_TEST_PG_HOST"],
        port=int(server["CRM_TEST_PG_PORT"]),
        user=server["CRM_TEST_PG_USER"],
        password=server["CRM_TEST_PG_PASSWORD"],
        dbname=database,
        connect_timeout=15,
    )


class PgDatabase:
    """One fresh database on the test server, read and written with psycopg2."""

    def __init__(self, server: dict[str, str], name: str) -> None:
        self.server = server
        self.name = name

    @property
    def url(self) -> str:
        s = self.server
        return (
            f"postgresql://{s['CRM_TEST_PG_USER']}:{s['CRM_TEST_PG_PASSWORD']}"
            f"@{s['CRM_TEST_PG_HOST']}:{s['CRM_TEST_PG_PORT']}/{self.name}"
        )

    def query(self, sql: str, params: Optional[tuple] = None) -> list[tuple]:
        with _connect(self.server, self.name) as connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    def execute(self, *statements: str) -> None:
        connection = _connect(self.server, self.name)
        try:
            with connection, connection.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
        finally:
            connection.close()

    def tables(self, schema: str = "crm") -> set[str]:
        rows = self.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        )
        return {row[0] for row in rows}

    def table_ids(self, table: str) -> list[str]:
        return [row[0] for row in self.query(f"SELECT id FROM crm.{table} ORDER BY id")]

    def table_state(self, table: str) -> dict[str, tuple]:
        """id -> (name, date_updated, is_active), like conftest.table_state for DuckDB."""
        rows = self.query(f"SELECT id, name, date_updated, is_active FROM crm.{table}")
        return {row[0]: tuple(row[1:]) for row in rows}

    def assert_exact(self, simulator, resources=RESOURCES) -> None:
        """Every API record present exactly once, with the API's current values."""
        for resource in resources:
            ids = self.table_ids(resource)
            assert len(ids) == len(set(ids)), f"{resource}: duplicate ids in the table"
            assert self.table_state(resource) == api_state(simulator, resource), resource


def _create_database(server: dict[str, str], prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    connection = _connect(server, "postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()
    return name


def _drop_database(server: dict[str, str], name: str) -> None:
    connection = _connect(server, "postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        connection.close()


@pytest.fixture
def pg_warehouse(postgres_server, monkeypatch: pytest.MonkeyPatch) -> Iterator[PgDatabase]:
    """A fresh database, selected as the pipeline's destination the way a user selects it."""
    database = PgDatabase(postgres_server, _create_database(postgres_server, "crm_test"))
    monkeypatch.setenv("CRM_DESTINATION", "postgres")
    monkeypatch.setenv("DESTINATION__POSTGRES__CREDENTIALS", database.url)
    yield database
    _drop_database(postgres_server, database.name)


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
        # rows, not fields (dlt's CSV writer would report ~16x); a record on a window boundary
        # is read twice and merged once
        assert counts[name] <= metadata[f"crm/{name}"]["rows_loaded"].value <= counts[name] + 5
    load_info = crm_pipeline().last_trace.last_load_info
    formats = {job.job_file_info.file_format
               for package in load_info.load_packages for job in package.jobs["completed_jobs"]}
    assert "parquet" in formats, formats  # the data went through COPY, not INSERTs
    # nested lists land in child tables tied to their parent rows
    assert {"jobs__tags", "tasks__assignees"} <= pg_warehouse.tables()
    assert pg_warehouse.query(
        "SELECT COUNT(*), COUNT(j._dlt_id) FROM crm.jobs__tags t "
        "LEFT JOIN crm.jobs j ON t._dlt_root_id = j._dlt_id"
    )[0] == pg_warehouse.query("SELECT COUNT(*), COUNT(*) FROM crm.jobs__tags")[0]
    assert not warehouse.exists()  # nothing went to DuckDB


def test_a_second_run_merges_edits_inserts_and_deactivations_in_place_in_postgres(
    start_simulator, crm_env, pg_warehouse
):
    simulator = start_simulator(page_cap=64)
    crm_env(simulator)
    assert run_sync().success
    before = pg_warehouse.table_state("jobs")

    changed = simulator.mutate("jobs", edit=7, insert=4, deactivate=3)
    simulator.mutate("contacts", edit=2, insert=1)
    result = run_sync()

    assert result.success
    pg_warehouse.assert_exact(simulator)
    after = pg_warehouse.table_state("jobs")
    assert len(after) == len(before) + 4
    for record_id in changed["deactivated"]:
        assert after[record_id][2] is False
    for record_id in changed["edited"]:
        assert after[record_id] != before[record_id]
        assert after[record_id] == api_state(simulator, "jobs")[record_id]


def test_after_a_full_load_a_small_change_refetches_a_few_records_from_postgres_state(
    start_simulator, crm_env, pg_warehouse
):
    simulator = start_simulator(page_cap=40)
    crm_env(simulator)
    assert run_sync().success
    # the incremental cursors are committed to PostgreSQL with the data
    assert pg_warehouse.query("SELECT COUNT(*) FROM crm._dlt_pipeline_state")[0][0] >= 1

    simulator.reset_stats()
    changed = simulator.mutate("jobs", edit=3, insert=2, deactivate=1)
    result = run_sync()

    assert result.success
    pg_warehouse.assert_exact(simulator)
    served = simulator.stats()["records_served"]
    changed_ids = sum(len(ids) for ids in changed.values())
    assert changed_ids <= served["jobs"] <= changed_ids + 5, served
    for name in RESOURCES:
        if name != "jobs":
            assert served.get(name, 0) <= 5, served


def test_hard_delete_removes_deactivated_records_and_their_child_rows_in_postgres(
    start_simulator, crm_env, pg_warehouse, monkeypatch
):
    simulator = start_simulator()
    crm_env(simulator)
    monkeypatch.setenv("SOURCES__CRM__HARD_DELETE", "true")
    assert run_sync(selection=[AssetKey(["crm", "jobs"])]).success

    deactivated = simulator.mutate("jobs", deactivate=4)["deactivated"]
    assert run_sync(selection=[AssetKey(["crm", "jobs"])]).success

    remaining = set(pg_warehouse.table_ids("jobs"))
    assert remaining == {r["id"] for r in simulator.records("jobs") if r["is_active"]}
    assert not remaining & set(deactivated)
    orphans = pg_warehouse.query(
        "SELECT COUNT(*) FROM crm.jobs__tags t LEFT JOIN crm.jobs j ON t._dlt_root_id = j._dlt_id "
        "WHERE j._dlt_id IS NULL"
    )
    assert orphans == [(0,)]


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

    # production = development + PostgreSQL storage: a setting changed in one must change in both
    for section, settings in (development or {}).items():
        assert deploy.get(section) == settings, f"deploy/dagster.yaml differs in `{section}`"
    assert set(deploy["storage"]) == {"postgres"}
    assert deploy["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_deploy_dagster_yaml_is_a_postgres_backed_instance_that_runs_the_sync(
    deploy_instance_home, start_simulator, crm_env, pg_warehouse
):
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    config, _ = dagster_instance_config(str(deploy_instance_home))  # the schema check
    assert "postgres" in config["storage"]
    instance = DagsterInstance.from_config(str(deploy_instance_home))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        # one warehouse run at a time (crm_sync and crm_checks carry the tag) ...
        limits = concurrency.run_queue_config.tag_concurrency_limits
        assert {"key": WAREHOUSE_RUN_TAG, "limit": 1} in limits
        assert WAREHOUSE_RUN_TAG in defs.resolve_job_def("crm_sync").run_tags
        # ... and one step in the `crm_warehouse` pool (assets.py: pool="crm_warehouse")
        assert concurrency.pool_config.default_pool_limit == 1

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
