"""The real API family's shape, reached through configuration alone: records keyed by `jnid`, a
sixth resource, a descending default sort, and dates that land as timestamps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance

from crm_assets.sources.crm import crm
from crm_assets.sources.crm_pipeline import crm_pipeline

from .conftest import API_KEY, SMALL_COUNTS, api_state, query

REPO = Path(__file__).resolve().parent.parent
DG = str(Path(sys.executable).parent / "dg")
SIX = ("jobs", "contacts", "tasks", "activities", "files", "invoices")
INVOICES = {"invoices": {"path": "/v1/invoices", "data_selector": "results"}}


def _real_shape(start_simulator):
    """The shape public documentation reports: `jnid` keys, newest first unless asked otherwise."""
    return start_simulator(
        counts={**SMALL_COUNTS, "invoices": 170},
        key_field="jnid",
        default_sort_field="date_updated",
        default_sort_direction="desc",
        page_cap=90,
    )


def _env(simulator, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOURCES__")}
    env.update(
        SOURCES__CRM__BASE_URL=simulator.url,
        SOURCES__CRM__API_KEY=API_KEY,
        SOURCES__CRM__PRIMARY_KEY="jnid",
        SOURCES__CRM__RESOURCES=json.dumps(INVOICES),
        DAGSTER_HOME=str(tmp_path / "dagster_home"),
    )
    env.update(extra)
    return env


def test_dg_lists_the_sixth_resource_with_its_checks(start_simulator, tmp_path):
    """The definitions do not depend on the warehouse: listed once, not for each destination."""
    env = _env(_real_shape(start_simulator), tmp_path)
    (tmp_path / "dagster_home").mkdir()
    listed = subprocess.run([DG, "list", "defs", "--json"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=180)
    assert listed.returncode == 0, listed.stderr[-3000:]
    defs = json.loads(listed.stdout[listed.stdout.index("{"):])
    assert "crm/invoices" in {asset["asset_key"] for asset in defs["assets"]}
    invoice_checks = [check for check in defs["asset_checks"] if "invoices" in json.dumps(check)]
    assert {check["name"] for check in invoice_checks} == {
        "id_is_unique", "id_is_not_null", "row_count_matches_api", "warehouse_matches_api"
    }


def test_jnid_and_a_sixth_resource_land_exactly_with_passing_checks(
    start_simulator, any_warehouse, tmp_path, monkeypatch
):
    simulator = _real_shape(start_simulator)
    (tmp_path / "dagster_home").mkdir()
    extra = {}
    if not hasattr(any_warehouse, "url"):  # DuckDB: the test's file
        extra["DESTINATION__DUCKDB__CREDENTIALS"] = str(any_warehouse.path)
    env = _env(simulator, tmp_path, **extra)

    launched = subprocess.run([DG, "launch", "--assets", "*"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]

    any_warehouse.assert_exact(simulator, resources=SIX, key="jnid")
    types = any_warehouse.query(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'crm' AND column_name IN ('jnid', 'id', 'date_created', 'date_updated')"
    )
    by_column = {(table, column): str(kind).lower() for table, column, kind in types}
    for table in SIX:
        assert "timestamp" in by_column[(table, "date_updated")], by_column
        assert "timestamp" in by_column[(table, "date_created")], by_column
        assert (table, "jnid") in by_column and (table, "id") not in by_column

    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with DagsterInstance.get() as instance:
        (run,) = instance.get_runs(limit=1)
        evaluations = [
            event.dagster_event.event_specific_data
            for event in instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
        ]
    results = {(e.asset_key.path[-1], e.check_name): e.passed for e in evaluations}
    assert len(results) == 3 * len(SIX)
    assert all(results.values()), results


def test_a_field_configured_as_epoch_seconds_lands_as_a_timestamp(start_simulator, warehouse, monkeypatch):
    simulator = _real_shape(start_simulator)
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))
    source = crm(
        base_url=simulator.url, api_key=API_KEY, primary_key="jnid",
        resources={"invoices": {"path": "/v1/invoices", "epoch_fields": ["date_due"]}},
    ).with_resources("invoices")

    crm_pipeline().run(source)

    landed = dict(query(warehouse, "SELECT jnid, CAST(EXTRACT(EPOCH FROM date_due) AS BIGINT) FROM crm.invoices"))
    assert landed == {record["jnid"]: record["date_due"] for record in simulator.records("invoices")}
    (kind,) = query(warehouse, "SELECT data_type FROM information_schema.columns "
                               "WHERE table_name = 'invoices' AND column_name = 'date_due'")[0]
    assert kind.startswith("TIMESTAMP")


def test_records_without_the_configured_key_fail_the_run_naming_the_setting(start_simulator, crm_env):
    simulator = _real_shape(start_simulator)  # keyed by jnid, the project left at `id`
    crm_env(simulator)
    with pytest.raises(Exception) as raised:
        crm_pipeline().run(crm().with_resources("jobs"))
    assert "without a string 'id'" in str(raised.value) and "SOURCES__CRM__PRIMARY_KEY" in str(raised.value)


def test_bad_resource_configuration_fails_dg_check_defs_naming_the_setting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOURCES__")}
    env["SOURCES__CRM__RESOURCES"] = '{"invoices": {"data_selector": "results"}}'
    checked = subprocess.run([DG, "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=180)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0
    assert "resource 'invoices' in SOURCES__CRM__RESOURCES" in output and "needs a path" in output


def test_the_real_shape_under_the_adversary_lands_every_record_present_throughout(
    start_simulator, warehouse, monkeypatch
):
    """test_adversary.py's worst case (every kind of change at once, faults, dropped connections)
    on `jnid` keys, six resources and a descending default sort."""
    from crm_assets.sources.destination import run_options
    from crm_assets.sources.tuning import sync_tuning

    from .test_adversary import MODES
    from .warehouses import DuckDbWarehouse

    simulator = _real_shape(start_simulator)
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))
    before = {resource: set(simulator.ids(resource)) for resource in SIX}
    simulator.configure(**MODES["all_with_faults"])
    source = crm(base_url=simulator.url, api_key=API_KEY, primary_key="jnid", resources=INVOICES,
                 page_sizes={resource: 20 for resource in SIX})

    pipeline = crm_pipeline()
    with sync_tuning():
        pipeline.run(source, **run_options(pipeline))

    simulator.configure(repeat_every=None, insert_every=None, delete_every=None, fault_every=None)
    landed_warehouse = DuckDbWarehouse(warehouse)
    for resource in SIX:
        keys = landed_warehouse.table_ids(resource, key="jnid")
        assert len(keys) == len(set(keys)), f"{resource}: a jnid landed twice"
        now = api_state(simulator, resource, key="jnid")
        stayed = before[resource] & set(now)
        landed = landed_warehouse.table_state(resource, key="jnid")
        assert stayed and stayed <= set(landed), resource
        assert {k: landed[k] for k in stayed} == {k: now[k] for k in stayed}, resource
        assert not set(landed) - simulator.ids_ever(resource), resource
    assert sum(len(before[r] - set(simulator.ids(r))) for r in SIX) > 0  # the deletes did happen


def test_date_fields_held_as_bigint_are_refused_before_any_request_naming_the_full_refresh(
    start_simulator, crm_env, warehouse, monkeypatch, capsys
):
    """A warehouse loaded while `tasks.due_date` and `invoices.date_due` stayed integers (an earlier
    version, or `not_epoch_fields`): a sync that lands them as timestamps stops first, saying so."""
    from crm_assets.sources.__main__ import main

    simulator = start_simulator({**SMALL_COUNTS, "invoices": 60})
    crm_env(simulator)
    kept = {"invoices": {"path": "/v1/invoices", "not_epoch_fields": ["date_due"]},
            "tasks": {"not_epoch_fields": ["due_date"]}}
    monkeypatch.setenv("SOURCES__CRM__RESOURCES", json.dumps(kept))
    assert main() == 0
    types = dict(((t, c), k) for t, c, k in query(warehouse, (
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'crm' AND column_name IN ('date_due', 'due_date')")))
    assert types == {("invoices", "date_due"): "BIGINT", ("tasks", "due_date"): "BIGINT"}
    capsys.readouterr()

    monkeypatch.setenv("SOURCES__CRM__RESOURCES", json.dumps({"invoices": {"path": "/v1/invoices"}}))
    simulator.reset_stats()
    assert main() == 1

    error = capsys.readouterr().err
    assert "crm.invoices.date_due, crm.tasks.due_date hold epoch seconds as BIGINT" in error, error
    assert "not_epoch_fields" in error
    assert "dg launch --assets crm/tasks,crm/invoices --config-json" in error and "full_refresh" in error
    assert sum(simulator.stats()["requests"].values()) == 0
    assert query(warehouse, "SELECT data_type FROM information_schema.columns "
                            "WHERE table_schema = 'crm' AND column_name = 'date_due'") == [("BIGINT",)]

    pipeline = crm_pipeline()  # what the full refresh runs
    pipeline.run(crm(resources={"invoices": {"path": "/v1/invoices"}}).with_resources("tasks", "invoices"),
                 refresh="drop_resources")
    landed = dict(query(warehouse, "SELECT id, CAST(EXTRACT(EPOCH FROM date_due) AS BIGINT) FROM crm.invoices"))
    assert landed == {record["id"]: record["date_due"] for record in simulator.records("invoices")}
