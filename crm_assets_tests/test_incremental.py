"""Incremental sync on `date_updated`, deletions, schema changes and full refresh.

The simulator counts what it served, so these tests prove a run after a small change fetched a
few records rather than the dataset, and the tables still match the API exactly.
"""

from __future__ import annotations

from dagster import AssetKey

from .warehouses import CHILD_TABLES_SQL
from .conftest import (
    RESOURCES,
    SMALL_COUNTS,
    assert_exact,
    assert_lists_as_in_api,
    failure_message,
    query,
    run_sync,
    table_ids,
    table_state,
)


def _metadata(result, name: str) -> dict:
    for materialization in result.asset_materializations_for_node("crm_sync_assets"):
        if materialization.asset_key == AssetKey(["crm", name]):
            return materialization.metadata
    raise AssertionError(f"crm/{name} was not materialized")


def test_after_a_full_load_a_small_change_refetches_a_few_records_not_the_dataset(
    start_simulator, crm_env, any_warehouse
):
    simulator = start_simulator(page_cap=40)
    crm_env(simulator)
    assert run_sync().success
    assert simulator.stats()["records_served"]["jobs"] >= SMALL_COUNTS["jobs"]
    # the incremental cursors are committed to the warehouse with the data
    assert any_warehouse.query("SELECT COUNT(*) FROM crm._dlt_pipeline_state")[0][0] >= 1

    simulator.reset_stats()
    changed = simulator.mutate("jobs", edit=3, insert=2, deactivate=1)
    result = run_sync()

    assert result.success
    any_warehouse.assert_exact(simulator)
    served = simulator.stats()["records_served"]
    changed_ids = sum(len(ids) for ids in changed.values())
    # the changed records, plus at most a few that share the previous cursor's second (inclusive)
    assert changed_ids <= served["jobs"] <= changed_ids + 5, served
    for name in RESOURCES:
        if name != "jobs":
            assert served.get(name, 0) <= 5, served
    deactivated = changed["deactivated"][0]
    assert any_warehouse.table_state("jobs")[deactivated][2] is False


def test_more_than_10000_changes_since_the_last_run_still_land_exactly_once(
    start_simulator, crm_env, warehouse, monkeypatch
):
    simulator = start_simulator({**SMALL_COUNTS, "tasks": 10_400}, page_cap=500)
    crm_env(simulator)
    monkeypatch.setenv("SOURCES__CRM__PAGE_SIZES", '{"tasks": 1000}')
    tasks = [AssetKey(["crm", "tasks"])]
    assert run_sync(selection=tasks).success

    simulator.reset_stats()
    simulator.mutate("tasks", edit=10_150, insert=300)
    result = run_sync(selection=tasks)

    assert result.success
    assert_exact(warehouse, simulator, resources=["tasks"])
    assert len(table_ids(warehouse, "tasks")) == 10_700
    served = simulator.stats()["records_served"]["tasks"]
    assert 10_450 <= served < 10_700 + 1000, served  # the change set, not a full re-read plus


def test_a_failed_incremental_run_keeps_the_cursor_and_the_next_run_loses_nothing(
    start_simulator, crm_env, warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync().success
    changed = simulator.mutate("contacts", edit=4, insert=2)

    simulator.configure(fail_resources={"contacts": 503})
    failed = run_sync(raise_on_error=False)
    assert not failed.success
    assert "contacts" in failure_message(failed) and "503" in failure_message(failed)

    simulator.configure(fail_resources={})
    assert run_sync().success
    assert_exact(warehouse, simulator)
    for record_id in changed["inserted"]:
        assert record_id in table_state(warehouse, "contacts")


def test_full_refresh_reloads_the_selected_resource_and_leaves_the_others_alone(
    start_simulator, crm_env, warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync().success
    contacts_before = table_state(warehouse, "contacts")
    simulator.mutate("contacts", edit=3)
    simulator.reset_stats()

    result = run_sync(
        selection=[AssetKey(["crm", "jobs"])],
        run_config={"ops": {"crm_sync_assets": {"config": {"full_refresh": True}}}},
    )

    assert result.success
    served = simulator.stats()["records_served"]
    assert served["jobs"] == SMALL_COUNTS["jobs"]  # read from scratch
    assert served.get("contacts", 0) == 0
    assert table_state(warehouse, "contacts") == contacts_before  # untouched, edits not pulled
    assert_exact(warehouse, simulator, resources=["jobs"])

    simulator.reset_stats()
    simulator.mutate("jobs", edit=1)
    assert run_sync(selection=[AssetKey(["crm", "jobs"])]).success
    assert simulator.stats()["records_served"]["jobs"] <= 6  # the reset cursor was stored again


def test_a_warehouse_from_an_earlier_version_says_to_run_a_full_refresh_which_moves_it_over(
    start_simulator, crm_env, warehouse
):
    """A warehouse an earlier version loaded, with dates as BIGINT epoch seconds and lists in child
    tables (dlt's defaults): the first sync names both and the way over instead of loading a mix;
    a full refresh reloads the resource in this version's layout."""
    import dlt

    from crm_assets.sources.crm_pipeline import crm_pipeline

    simulator = start_simulator()
    crm_env(simulator)

    @dlt.source(name="crm")  # the source's name is the schema's, whose resources a full refresh drops
    def earlier_crm():
        @dlt.resource(name="jobs", primary_key="id",
                      write_disposition={"disposition": "merge", "strategy": "delete-insert"})
        def jobs():
            yield simulator.records("jobs")

        return jobs

    crm_pipeline().run(earlier_crm())
    assert query(warehouse, "SELECT data_type FROM information_schema.columns WHERE table_schema = 'crm' AND table_name = 'jobs' "
                            "AND column_name = 'date_updated'") == [("BIGINT",)]
    assert {"jobs__tags", "jobs__related"} <= {row[0] for row in query(warehouse, CHILD_TABLES_SQL)}
    simulator.mutate("jobs", edit=3)
    jobs = [AssetKey(["crm", "jobs"])]

    failed = run_sync(selection=jobs, raise_on_error=False)

    assert not failed.success
    message = failure_message(failed)
    assert "crm.jobs.date_created, crm.jobs.date_updated hold epoch seconds as BIGINT" in message
    assert "crm.jobs__related, crm.jobs__tags hold lists as child tables" in message
    assert "full_refresh" in message
    refreshed = run_sync(selection=jobs, run_config={"ops": {"crm_sync_assets": {"config": {"full_refresh": True}}}})
    assert refreshed.success
    assert_exact(warehouse, simulator, resources=["jobs"])
    assert_lists_as_in_api(lambda sql: query(warehouse, sql), simulator, resources=["jobs"])


def test_a_new_field_becomes_a_column_and_the_materialization_says_so(
    start_simulator, crm_env, warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync().success

    simulator.mutate("jobs", edit=2, add_field={"name": "warranty_code", "value": "W-17"})
    result = run_sync()

    assert result.success
    rows = query(warehouse, "SELECT COUNT(*) FROM crm.jobs WHERE warranty_code = 'W-17'")
    assert rows == [(2,)]
    new_columns = _metadata(result, "jobs")["crm/new_columns"].value
    assert any(entry.startswith("jobs.warranty_code") for entry in new_columns)
    assert _metadata(result, "files")["crm/new_columns"].value == []


def test_a_type_change_is_reported_as_a_variant_column(start_simulator, crm_env, warehouse):
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync().success

    # `number` has been an integer so far; the API now sends text in it
    simulator.mutate("jobs", edit=1, add_field={"name": "number", "value": "N/A"})
    result = run_sync()

    assert result.success
    variants = _metadata(result, "jobs")["crm/variant_columns"].value
    assert any(entry.startswith("jobs.number__v_") for entry in variants), variants


def test_a_frozen_schema_fails_naming_the_table_and_column(
    start_simulator, crm_env, warehouse, monkeypatch
):
    simulator = start_simulator()
    crm_env(simulator)
    monkeypatch.setenv("SOURCES__CRM__SCHEMA_CONTRACT", "freeze")
    assert run_sync().success  # the first load creates the tables
    before = table_state(warehouse, "jobs")

    simulator.mutate("jobs", edit=2, add_field={"name": "warranty_code", "value": "W-17"})
    result = run_sync(raise_on_error=False)

    assert not result.success
    message = failure_message(result)
    assert "jobs" in message and "warranty_code" in message and "frozen" in message
    assert table_state(warehouse, "jobs") == before


def test_hard_delete_removes_deactivated_records_lists_and_all(
    start_simulator, crm_env, any_warehouse, monkeypatch
):
    simulator = start_simulator()
    crm_env(simulator)
    monkeypatch.setenv("SOURCES__CRM__HARD_DELETE", "true")
    jobs = [AssetKey(["crm", "jobs"])]
    assert run_sync(selection=jobs).success
    active = {r["id"] for r in simulator.records("jobs") if r["is_active"]}
    assert set(any_warehouse.table_ids("jobs")) == active

    deactivated = simulator.mutate("jobs", deactivate=4)["deactivated"]
    assert run_sync(selection=jobs).success

    remaining = set(any_warehouse.table_ids("jobs"))
    assert remaining == {r["id"] for r in simulator.records("jobs") if r["is_active"]}
    assert not remaining & set(deactivated)
    # a record is one row (its lists inside it): nothing of a deleted record is left elsewhere
    assert any_warehouse.query(
        "SELECT COUNT(*) FROM crm.jobs WHERE tags IS NULL AND related IS NULL"
    ) == [(0,)]
    assert any_warehouse.query(CHILD_TABLES_SQL) == []


def test_a_changed_primary_key_is_refused_before_any_request_and_a_full_refresh_lands_it(
    start_simulator, crm_env, any_warehouse, monkeypatch
):
    """The README's real-API example over a warehouse `make demo` left: records keyed by `jnid`
    would fail deep in the load (`id` is NOT NULL); the sync names the change and the way over
    instead, and touches nothing."""
    jobs, tasks = AssetKey(["crm", "jobs"]), AssetKey(["crm", "tasks"])
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync(selection=[jobs, tasks]).success
    before = {name: any_warehouse.table_state(name) for name in ("jobs", "tasks")}

    jnid = start_simulator(key_field="jnid")  # the same seeded records, keyed by jnid
    crm_env(jnid)
    monkeypatch.setenv("SOURCES__CRM__PRIMARY_KEY", "jnid")
    failed = run_sync(selection=[jobs, tasks], raise_on_error=False)

    assert not failed.success
    message = failure_message(failed)
    assert "crm.jobs is keyed by `id`, the settings now say `jnid`" in message, message
    assert "crm.tasks is keyed by `id`, the settings now say `jnid`" in message, message
    assert "SOURCES__CRM__PRIMARY_KEY" in message
    assert "dg launch --assets crm/jobs,crm/tasks --config-json" in message and "full_refresh" in message
    assert sum(jnid.stats()["requests"].values()) == 0  # refused before any request
    assert {name: any_warehouse.table_state(name) for name in ("jobs", "tasks")} == before

    refreshed = run_sync(selection=[jobs, tasks],
                         run_config={"ops": {"crm_sync_assets": {"config": {"full_refresh": True}}}})
    assert refreshed.success
    any_warehouse.assert_exact(jnid, resources=["jobs", "tasks"], key="jnid")


def test_the_metadata_says_what_each_count_is_whether_the_load_was_full_and_where_the_cursor_is(
    start_simulator, crm_env, warehouse
):
    """`dagster/row_count`: rows in the table; `crm/records_read`: records the run read (a record
    met twice counted twice); `crm/full_load`: read from scratch; `crm/cursor`: the newest
    `date_updated` loaded, as a timestamp. dagster-dlt's `rows_loaded` and `first_run` are gone."""
    from dagster import TimestampMetadataValue

    jobs = [AssetKey(["crm", "jobs"])]
    simulator = start_simulator(page_cap=50)  # pages overlap by a record: read > rows
    crm_env(simulator)

    def newest() -> int:
        return max(record["date_updated"] for record in simulator.records("jobs"))

    first = _metadata(run_sync(selection=jobs), "jobs")
    assert "rows_loaded" not in first and "first_run" not in first
    assert first["dagster/row_count"].value == SMALL_COUNTS["jobs"]
    assert first["crm/records_read"].value >= SMALL_COUNTS["jobs"]
    assert first["crm/full_load"].value is True
    assert isinstance(first["crm/cursor"], TimestampMetadataValue)
    assert first["crm/cursor"].value == newest()

    simulator.mutate("jobs", edit=2, insert=1)
    second = _metadata(run_sync(selection=jobs), "jobs")
    assert second["crm/full_load"].value is False
    assert second["crm/cursor"].value == newest() > first["crm/cursor"].value
    assert second["dagster/row_count"].value == SMALL_COUNTS["jobs"] + 1
    assert 3 <= second["crm/records_read"].value <= 10

    refresh = {"ops": {"crm_sync_assets": {"config": {"full_refresh": True}}}}
    refreshed = _metadata(run_sync(selection=jobs, run_config=refresh), "jobs")
    assert refreshed["crm/full_load"].value is True
    assert refreshed["crm/cursor"].value == newest()
    assert refreshed["crm/records_read"].value >= SMALL_COUNTS["jobs"] + 1


def test_a_record_dated_after_now_does_not_hold_the_cursor_and_later_edits_still_land(
    start_simulator, crm_env, warehouse, caplog
):
    """A record dated hours ahead (a device's clock, an import from another time zone) would, as
    the newest `date_updated` read, put the cursor hours ahead too: every edit until then missed.
    The cursor counts such a date as the sync's start less five minutes; the record lands as dated."""
    import time

    from crm_assets.simulator.data import AHEAD_SECONDS

    jobs = [AssetKey(["crm", "jobs"])]
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync(selection=jobs).success
    ahead = simulator.mutate("jobs", dated_ahead=1)["dated_ahead"]
    with caplog.at_level("WARNING", logger="crm_assets.sources.crm"):
        second = _metadata(run_sync(selection=jobs), "jobs")
    assert any("after now" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert second["crm/cursor"].value < time.time() + 60  # not hours ahead
    dated = dict(query(warehouse, "SELECT id, epoch(date_updated)::BIGINT FROM crm.jobs"))
    assert dated[ahead[0]] >= time.time() + AHEAD_SECONDS - 60

    simulator.reset_stats()
    edited = simulator.mutate("jobs", edit=3, insert=1)
    assert run_sync(selection=jobs).success
    assert_exact(warehouse, simulator, resources=["jobs"])
    # the edits, the record dated ahead again, and the few that share the cursor's second
    assert simulator.stats()["records_served"]["jobs"] <= sum(map(len, edited.values())) + 6
