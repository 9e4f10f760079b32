"""The audit (job crm_audit, check warehouse_matches_api): after hard deletes at the source, edits
that did not move date_updated and rows damaged by hand, one audit leaves every table equal to the
API, on DuckDB and PostgreSQL; the guard leaves a table untouched; a sync afterwards is still
incremental."""

from __future__ import annotations

import duckdb
import pytest
from dagster import AssetCheckSeverity, DagsterInstance

from crm_assets.audit import WAREHOUSE_MATCHES_API
from crm_assets.definitions import defs

from .conftest import RESOURCES, SMALL_COUNTS, api_state, failure_message
from .warehouses import DuckDbWarehouse

AUDIT_CHECKS = {f"crm/{resource}:{WAREHOUSE_MATCHES_API}" for resource in RESOURCES}
# (key, date_updated in epoch seconds, marked deleted) of every row, the same SQL on both warehouses
ROWS_SQL = (
    "SELECT id, name, CAST(EXTRACT(EPOCH FROM date_updated) AS BIGINT), is_active, "
    "_crm_deleted_at IS NOT NULL FROM crm.{table} ORDER BY id"
)


def pages(stats: dict) -> dict[str, int]:
    """Requests for records (not `size=0` counts) by resource."""
    return {r: stats["requests"][r] - stats["count_requests"][r] for r in RESOURCES}


def run_job(name: str, instance: DagsterInstance):
    return defs.resolve_job_def(name).execute_in_process(instance=instance, raise_on_error=False)


def evaluations(result) -> dict:
    return {e.asset_check_key.to_user_string(): e for e in result.get_asset_check_evaluations()}


def meta(evaluation) -> dict:
    return {key: value.value for key, value in evaluation.metadata.items()}


def execute(database, *statements: str) -> None:
    """Change the warehouse by hand, as a person with SQL access would."""
    if isinstance(database, DuckDbWarehouse):
        with duckdb.connect(str(database.path)) as connection:
            for statement in statements:
                connection.execute(statement)
    else:
        database.execute(*statements)


def rows(database, table: str) -> dict[str, tuple]:
    return {row[0]: tuple(row[1:]) for row in database.query(ROWS_SQL.format(table=table))}


def assert_equals_api(database, simulator, gone: dict[str, set[str]], hard_delete: bool) -> None:
    """Every live record as the API has it; the hard-deleted ones marked, or removed."""
    for resource in RESOURCES:
        landed = rows(database, resource)
        live = {key: values[:3] for key, values in landed.items() if not values[3]}
        marked = {key for key, values in landed.items() if values[3]}
        expected = api_state(simulator, resource)
        if hard_delete:  # a sync removes deactivated records too
            expected = {key: state for key, state in expected.items() if state[2]}
        assert live == expected, resource
        assert marked == (set() if hard_delete else gone.get(resource, set())), resource
        if hard_delete:
            assert not set(landed) & gone.get(resource, set()), resource


@pytest.fixture
def synced(start_simulator, crm_env, any_warehouse, monkeypatch, request):
    """A clean crm_sync of all five resources; the simulator, the warehouse and the instance."""

    def make(hard_delete: bool = False, **simulator_config):
        if hard_delete:
            monkeypatch.setenv("SOURCES__CRM__HARD_DELETE", "true")
        simulator = start_simulator(**simulator_config)
        crm_env(simulator)
        instance = DagsterInstance.ephemeral()
        result = run_job("crm_sync", instance)
        assert result.success, failure_message(result)
        return simulator, any_warehouse, instance

    return make


def damage(simulator, database, *, silent: bool = True) -> dict[str, set[str]]:
    """Hard deletes and silent edits at the source, a row deleted and a row made stale by hand.
    Returns the hard-deleted ids by resource."""
    deleted = {"jobs": set(simulator.mutate("jobs", delete=4)["deleted"]),
               "files": set(simulator.mutate("files", delete=2)["deleted"])}
    if silent:
        simulator.mutate("contacts", silent_edit=3)
    execute(
        database,
        "DELETE FROM crm.tasks WHERE id IN (SELECT id FROM crm.tasks ORDER BY id LIMIT 2)",
        "UPDATE crm.activities SET date_updated = date_updated - INTERVAL '1 day', name = 'stale' "
        "WHERE id = (SELECT MIN(id) FROM crm.activities)",
    )
    return deleted


@pytest.mark.parametrize("hard_delete", [False, True], ids=["marked", "hard_delete"])
def test_one_audit_leaves_every_table_equal_to_the_api(synced, hard_delete):
    simulator, database, instance = synced(hard_delete=hard_delete)
    gone = damage(simulator, database)
    assert rows(database, "contacts") != {}  # the silent edits are not in the table yet

    result = run_job("crm_audit", instance)

    assert result.success, failure_message(result)
    assert result.get_asset_materialization_events() == []
    checks = evaluations(result)
    assert set(checks) == AUDIT_CHECKS
    assert all(check.passed for check in checks.values()), {k: c.description for k, c in checks.items()}
    counts = {key.split(":")[0].split("/")[1]: meta(check) for key, check in checks.items()}
    assert counts["jobs"]["deleted"] == 4 and counts["files"]["deleted"] == 2
    assert counts["tasks"]["missing"] == 2 and counts["tasks"]["repaired"] == 2
    assert counts["activities"]["stale"] == 1 and counts["activities"]["repaired"] == 1
    assert counts["contacts"]["missing"] == counts["contacts"]["stale"] == 0
    assert all(c["whole_records"] for c in counts.values())  # the API ignored `fields`
    for resource, c in counts.items():
        assert c["still_different"] == 0, resource
        if resource not in ("jobs", "files"):
            assert c["deleted"] == 0, resource
    # the silent edits are repaired too: whole records were merged as listed
    assert_equals_api(database, simulator, gone, hard_delete)

    again = run_job("crm_audit", instance)  # nothing left to repair
    assert all(meta(e)["missing"] + meta(e)["stale"] + meta(e)["deleted"] == 0
               for e in evaluations(again).values())
    assert_equals_api(database, simulator, gone, hard_delete)


def test_a_key_and_date_listing_repairs_missing_stale_and_gone_within_a_full_reads_pages(synced):
    simulator, database, instance = synced(fields_param=True)
    full_read = pages(simulator.stats())  # the sync's first run: a full read of every resource
    simulator.reset_stats()
    gone = damage(simulator, database, silent=False)

    result = run_job("crm_audit", instance)

    checks = evaluations(result)
    assert all(check.passed for check in checks.values()), {k: c.description for k, c in checks.items()}
    counts = {key.split(":")[0].split("/")[1]: meta(check) for key, check in checks.items()}
    assert not any(c["whole_records"] for c in counts.values())  # the API honoured `fields`
    assert (counts["jobs"]["deleted"], counts["files"]["deleted"]) == (4, 2)
    assert (counts["tasks"]["missing"], counts["tasks"]["records_loaded"]) == (2, 2)
    assert (counts["activities"]["stale"], counts["activities"]["records_loaded"]) == (1, 1)
    assert sum(c["records_loaded"] for c in counts.values()) == 3  # only what was wrong
    assert_equals_api(database, simulator, gone, hard_delete=False)
    # the listing asks for what a full read asks for; the repair reads add a request or two
    audit_pages = pages(simulator.stats())
    for resource in RESOURCES:
        assert audit_pages[resource] <= full_read[resource] + 2, (resource, audit_pages, full_read)
    assert audit_pages["tasks"] == full_read["tasks"] + 1  # the repair read of the missing rows
    assert audit_pages["contacts"] == full_read["contacts"]  # nothing to repair there
    assert simulator.stats()["count_requests"] == {r: 2 for r in RESOURCES}  # the probe's two counts


def test_the_guard_refuses_to_mark_more_than_a_share_and_leaves_the_table_unchanged(synced):
    simulator, database, instance = synced()
    simulator.mutate("jobs", delete=SMALL_COUNTS["jobs"] // 5)  # 20% of the table
    simulator.mutate("files", delete=1)
    execute(database, "DELETE FROM crm.tasks WHERE id = (SELECT MIN(id) FROM crm.tasks)")
    before = database.query("SELECT * FROM crm.jobs ORDER BY id")

    result = run_job("crm_audit", instance)

    checks = evaluations(result)
    guarded = checks[f"crm/jobs:{WAREHOUSE_MATCHES_API}"]
    assert not guarded.passed and guarded.severity == AssetCheckSeverity.ERROR
    assert "crm.jobs" in guarded.description and "20.0%" in guarded.description
    assert "SOURCES__CRM__AUDIT_MAX_GONE_SHARE" in guarded.description
    assert database.query("SELECT * FROM crm.jobs ORDER BY id") == before
    # the other tables are repaired all the same
    assert all(c.passed for key, c in checks.items() if not key.startswith("crm/jobs:"))
    assert meta(checks[f"crm/files:{WAREHOUSE_MATCHES_API}"])["deleted"] == 1
    assert meta(checks[f"crm/tasks:{WAREHOUSE_MATCHES_API}"])["repaired"] == 1


def test_a_sync_after_an_audit_is_incremental_and_unmarks_a_record_that_comes_back(synced):
    simulator, database, instance = synced()
    gone = damage(simulator, database, silent=False)
    assert run_job("crm_audit", instance).success
    edited = simulator.mutate("contacts", edit=2)["edited"]
    # as if an earlier audit had marked them while the API had lost them for a moment
    quoted = ", ".join(f"'{key}'" for key in edited)
    execute(database, f"UPDATE crm.contacts SET _crm_deleted_at = CURRENT_TIMESTAMP WHERE id IN ({quoted})")
    assert all(rows(database, "contacts")[key][3] for key in edited)
    simulator.reset_stats()

    result = run_job("crm_sync", instance)

    assert result.success, failure_message(result)
    assert simulator.stats()["records_served"]["contacts"] <= 10  # the two edits, not the table
    assert sum(simulator.stats()["records_served"].values()) <= 50
    assert not any(rows(database, "contacts")[key][3] for key in edited)
    assert_equals_api(database, simulator, gone, hard_delete=False)


def test_materializing_the_assets_leaves_the_audit_out(start_simulator, crm_env, warehouse):
    """Dagster adds the checks of the assets a run materializes (`dg launch --assets '*'`, the UI's
    Materialize): the audit, a listing of the whole API, skips itself there."""
    from dagster import materialize

    from crm_assets.assets import crm_sync_assets
    from crm_assets.audit import crm_audit_checks
    from crm_assets.resources import RESOURCES as DAGSTER_RESOURCES

    simulator = start_simulator()
    crm_env(simulator)

    result = materialize([crm_sync_assets, crm_audit_checks], resources=DAGSTER_RESOURCES)

    assert result.success
    assert len(result.get_asset_materialization_events()) == len(RESOURCES)
    # the load's own checks ran (part of its step); the audit's did not
    checked = {e.asset_check_key.name for e in result.get_asset_check_evaluations()}
    assert checked and WAREHOUSE_MATCHES_API not in checked
    # one full read per resource: the sync's, no listing for an audit
    assert simulator.stats()["records_served"] == SMALL_COUNTS


def test_records_without_a_cursor_are_repaired_by_their_date_created(synced):
    """A key/date listing: records whose date_updated the API nulled (the table still has one) and
    one of them deleted from the table are read again by date_created, not date_updated."""
    simulator, database, instance = synced(fields_param=True)
    nulled = simulator.mutate("jobs", null_cursor=3)["null_cursor"]
    execute(database, f"DELETE FROM crm.jobs WHERE id = '{nulled[0]}'")

    result = run_job("crm_audit", instance)

    check = evaluations(result)[f"crm/jobs:{WAREHOUSE_MATCHES_API}"]
    assert check.passed, check.description
    assert (meta(check)["missing"], meta(check)["stale"], meta(check)["repaired"]) == (1, 2, 3)
    landed = rows(database, "jobs")
    assert all(landed[key][1] is None for key in nulled)  # date_updated as the API has it: none
    assert_equals_api(database, simulator, {}, hard_delete=False)


def test_wanted_seconds_share_a_range_while_at_most_a_page_lies_between_them():
    from crm_assets.sources.crm.audit import group_seconds

    listed = sorted([10, 10, 11, 12, 13, 14, 20, 30, 30, 30, 30, 40])
    # page of 3: 11..13 (3 records) between 10 and 14 -> one range; 20 is next to 14 (nothing between);
    # between 20 and 40 lie four records at 30 -> a range of its own
    assert group_seconds([10, 14, 20, 40], listed, page_size=3) == [(10, 20), (40, 40)]
    assert group_seconds([40, 10, 10], listed, page_size=100) == [(10, 40)]
    assert group_seconds([], listed, page_size=3) == []


def test_an_api_error_fails_the_audit_with_error_severity_and_changes_nothing(synced):
    simulator, database, instance = synced()
    simulator.mutate("jobs", delete=2)
    before = {table: database.query(f"SELECT * FROM crm.{table} ORDER BY id") for table in RESOURCES}
    simulator.configure(forbidden=["files"])

    result = run_job("crm_audit", instance)

    checks = evaluations(result)
    assert set(checks) == AUDIT_CHECKS
    for check in checks.values():
        assert not check.passed and check.severity == AssetCheckSeverity.ERROR
        assert "403" in check.description and "/v1/files" in check.description
        assert simulator.config.api_key not in check.description
    assert {table: database.query(f"SELECT * FROM crm.{table} ORDER BY id") for table in RESOURCES} == before
