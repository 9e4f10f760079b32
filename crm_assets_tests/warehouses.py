"""The warehouses the exactness tests run against: the default DuckDB file and a real PostgreSQL.

PostgreSQL is a private server on loopback: `scripts/services.sh up` installs it when it is
missing and starts a cluster of its own (`make test` does that before pytest; the session fixture
does it too, and the server stops when its last user is done). Every test gets a fresh database
and selects it the way a user would: `CRM_DESTINATION=postgres` plus dlt's
`DESTINATION__POSTGRES__CREDENTIALS`.
Tables are read back independently of the pipeline (duckdb / psycopg2). If the server cannot be
installed or started, the tests that need it fail; they never skip.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import duckdb
import psycopg2
import pytest

from crm_assets.simulator import CrmSimulator

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "scripts" / "services.sh"
RESOURCES = ("jobs", "contacts", "tasks", "activities", "files")


# --- reading a DuckDB warehouse back ---------------------------------------------------------


def query(warehouse: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return connection.execute(sql).fetchall()


def table_ids(warehouse: Path, table: str, key: str = "id") -> list[str]:
    return [row[0] for row in query(warehouse, f"SELECT {key} FROM crm.{table} ORDER BY {key}")]


# date_updated lands as a UTC timestamp; the API's value is its epoch seconds (same SQL on
# DuckDB and PostgreSQL)
STATE_SQL = "SELECT {key}, name, CAST(EXTRACT(EPOCH FROM date_updated) AS BIGINT), is_active FROM crm.{table}"


def table_state(warehouse: Path, table: str, key: str = "id") -> dict[str, tuple]:
    """key -> (name, date_updated in epoch seconds, is_active) as the warehouse has it."""
    rows = query(warehouse, STATE_SQL.format(key=key, table=table))
    return {row[0]: tuple(row[1:]) for row in rows}


def api_state(simulator: CrmSimulator, resource: str, key: str = "id") -> dict[str, tuple]:
    return {
        record[key]: (record["name"], record.get("date_updated"), record["is_active"])
        for record in simulator.records(resource)
    }


def assert_exact(warehouse: Path, simulator: CrmSimulator, resources=RESOURCES, key: str = "id") -> None:
    """Every API record present exactly once, with the API's current values."""
    for resource in resources:
        ids = table_ids(warehouse, resource, key)
        assert len(ids) == len(set(ids)), f"{resource}: duplicate {key}s in the table"
        assert table_state(warehouse, resource, key) == api_state(simulator, resource, key), resource


# every list the simulator's records carry, by resource
LIST_FIELDS = {"jobs": ("related", "tags"), "contacts": ("tags",), "tasks": ("assignees",),
               "activities": (), "files": ("related",)}
CHILD_TABLES_SQL = (
    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'crm' AND table_name LIKE '%\\_\\_%' ESCAPE '\\'"
)


def assert_lists_as_in_api(run_query: Callable[[str], list[tuple]], simulator: CrmSimulator,
                           resources=RESOURCES, key: str = "id") -> None:
    """Every list sits in its record's row, in a JSON column, as the API's list, and no child
    table was made of one. `run_query` reads the warehouse (DuckDB gives a JSON value as its text,
    psycopg2 parses it)."""
    assert run_query(CHILD_TABLES_SQL) == []
    for resource in resources:
        fields = LIST_FIELDS[resource]
        if not fields:
            continue
        rows = run_query(f"SELECT {key}, {', '.join(fields)} FROM crm.{resource}")
        landed = {row[0]: tuple(json.loads(value) if isinstance(value, str) else value for value in row[1:])
                  for row in rows}
        expected = {record[key]: tuple(record.get(field) for field in fields)
                    for record in simulator.records(resource)}
        assert landed == expected, resource


# --- the warehouses ---------------------------------------------------------------------------


class DuckDbWarehouse:
    """The test's DuckDB file, with the same reading methods as `PgDatabase`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def query(self, sql: str) -> list[tuple]:
        return query(self.path, sql)

    def table_ids(self, table: str, key: str = "id") -> list[str]:
        return table_ids(self.path, table, key)

    def table_state(self, table: str, key: str = "id") -> dict[str, tuple]:
        return table_state(self.path, table, key)

    def assert_exact(self, simulator, resources=RESOURCES, key: str = "id") -> None:
        for resource in resources:
            ids = self.table_ids(resource, key)
            assert len(ids) == len(set(ids)), f"{resource}: duplicate {key}s in the table"
            assert self.table_state(resource, key) == api_state(simulator, resource, key), resource


# --- the server and a database per test ------------------------------------------------------


def _services(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SERVICES), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[dict[str, str]]:
    """The loopback PostgreSQL of scripts/services.sh, started if it is not up. This process holds
    it until the session ends (`up` registers it, `down` lets go): the server stops with its last
    holder, never under another session's tests (make test, a pytest-xdist worker, a colleague's
    pytest in the same working tree)."""
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

    def table_ids(self, table: str, key: str = "id") -> list[str]:
        return [row[0] for row in self.query(f"SELECT {key} FROM crm.{table} ORDER BY {key}")]

    def table_state(self, table: str, key: str = "id") -> dict[str, tuple]:
        """Like conftest.table_state for DuckDB."""
        rows = self.query(STATE_SQL.format(key=key, table=table))
        return {row[0]: tuple(row[1:]) for row in rows}

    assert_exact = DuckDbWarehouse.assert_exact


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


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_warehouse(request, warehouse: Path):
    """Run the test once with the default DuckDB warehouse and once with PostgreSQL."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_warehouse")
    return DuckDbWarehouse(warehouse)
