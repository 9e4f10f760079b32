"""Fields whose names normalize to the same column keep their values in distinct columns
(crm/field_names.py): the rule on its own, then syncs on DuckDB and PostgreSQL, with the Arrow step
on and off, with the colliding fields there from the first sync and appearing at a later one."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import dlt
import duckdb
import pytest
from dlt.common.normalizers.naming.snake_case import NamingConvention

from crm_assets.simulator.__main__ import build_parser
from crm_assets.simulator.server import with_colliding_fields
from crm_assets.sources.audit import audit
from crm_assets.sources.crm import crm
from crm_assets.sources.crm.audit import audit_settings
from crm_assets.sources.crm.field_names import STATE_KEY, FieldNames
from crm_assets.sources.crm_pipeline import crm_pipeline
from crm_assets.sources.destination import run_options
from crm_assets.sources.tuning import sync_tuning

NAMING = NamingConvention()


def renamed(records, reserved=("id",)):
    """What one step makes of `records`, in order."""
    step = FieldNames("jobs", reserved, naming=NAMING)
    return [step(dict(record)) for record in records]


# -- the rule ---------------------------------------------------------------------------------


def test_both_fields_of_a_pair_keep_their_values_whatever_the_key_order():
    fields = {"Status": 1, "status": 2, "first-name": 3, "first_name": 4, "FirstName": 5}
    outcomes = {
        tuple(sorted(renamed([{key: fields[key] for key in order}])[0].items()))
        for order in itertools.permutations(fields)
    }
    # the field in normalized form keeps the column; the others follow in sorted order
    assert outcomes == {tuple(sorted({
        "status": 2, "status_2": 1, "first_name": 4, "first_name_2": 5, "first_name_3": 3,
    }.items()))}


def test_the_first_field_to_claim_a_column_keeps_it_in_later_records():
    first, second, third = renamed([{"Status": "a"}, {"status": "b"}, {"status": "c", "Status": "d"}])
    # `Status` keeps its name and dlt's column `status`
    assert first == {"Status": "a"}
    assert second == {"status_2": "b"}
    assert third == {"status_2": "c", "Status": "d"}


def test_declared_columns_belong_to_the_field_of_that_name():
    assert renamed([{"ID": "x"}, {"id": "y", "ID": "z"}]) == [{"id_2": "x"}, {"id": "y", "id_2": "z"}]


def test_a_suffix_skips_the_columns_other_fields_hold():
    assert renamed([{"Status": 1, "status": 2, "status_2": 3}]) == [{"status_3": 1, "status": 2, "status_2": 3}]


def test_nested_objects_are_renamed_on_their_flattened_columns():
    record = {"location": {"Geo": "text", "geo": {"lat": 1.0, "Lat": 2.0}}, "Location": {"geo": "other"}}
    assert renamed([record]) == [{
        "location": {"geo_2": "text", "geo": {"lat": 1.0, "lat_2": 2.0}},
        "location_2": {"geo": "other"},
    }]


def test_an_object_where_the_same_shape_held_none_before_is_renamed_too():
    # the same keys each time: only the value of `location` turns into an object
    records = [{"id": 1, "location": None}, {"id": 2, "location": {"Geo": 1, "geo": 2}},
               {"id": 3, "location": "text"}, {"id": 4, "location": {"geo": 3, "Geo": 4}}]
    assert renamed(records) == [records[0], {"id": 2, "location": {"geo_2": 1, "geo": 2}}, records[2],
                                {"id": 4, "location": {"geo": 3, "geo_2": 4}}]


def test_records_without_a_collision_pass_unchanged_and_each_renaming_is_logged_once(caplog):
    step = FieldNames("contacts", ("id",), naming=NAMING)
    plain = {"id": "c1", "Email": "a@b", "tags": "[]"}
    assert step([dict(plain), dict(plain)]) == [plain, plain]
    with caplog.at_level(logging.WARNING, logger="crm_assets.sources.crm"):
        step([{"id": "c2", "status": "s", "Status": "S"}, {"id": "c3", "Status": "S", "status": "s"}])
    assert [r.getMessage() for r in caplog.records] == [
        "contacts: fields `status` and `Status` both normalize to `status`; `Status` lands in `status_2`"
    ]


def _plain_pipeline(tmp_path: Path, local: str, records: list[dict]):
    """A plain dlt resource with the step, loaded from a fresh local folder (as dagster-dlt
    drops the pipeline's local state before a run): the claims come back from the destination."""

    @dlt.resource(name="people", primary_key="id", write_disposition="merge")
    def people():
        yield records

    resource = people()
    resource.add_step(FieldNames.of(resource))
    pipeline = dlt.pipeline(
        "field_names", destination=dlt.destinations.duckdb(str(tmp_path / "people.duckdb")),
        dataset_name="crm", pipelines_dir=str(tmp_path / local),
    )
    pipeline.run(resource)
    return pipeline


def test_claims_are_committed_with_the_data_and_restored_from_the_destination(tmp_path):
    _plain_pipeline(tmp_path, "first", [{"id": 1, "Status": "a"}])
    pipeline = _plain_pipeline(tmp_path, "second", [{"id": 2, "status": "b"}])
    claims = pipeline.state["sources"]["field_names"]["resources"]["people"][STATE_KEY]
    assert [["Status"], "status"] in claims and [["status"], "status_2"] in claims
    with duckdb.connect(str(tmp_path / "people.duckdb"), read_only=True) as connection:
        rows = connection.execute("SELECT id, status, status_2 FROM crm.people ORDER BY id").fetchall()
    assert rows == [(1, "a", None), (2, None, "b")]


# -- syncs --------------------------------------------------------------------------------------

COUNTS = {"jobs": 45, "contacts": 35, "tasks": 3, "activities": 3, "files": 3}
SYNCED = ("jobs", "contacts")
COLUMNS = ("status", "status_2", "first_name", "first_name_2", "custom__region", "custom__region_2")


def _expected(record: dict) -> tuple:
    return (record["status"], record["Status"], record["first_name"], record["first-name"],
            record["custom"]["region"], record["custom"]["Region"])


def _sync(tmp_path: Path, run: int, arrow_pages: bool):
    # a fresh local folder each time: the claims must come back from the warehouse
    pipeline = crm_pipeline(pipelines_dir=str(tmp_path / f"pipelines-{run}"))
    with sync_tuning():
        pipeline.run(crm(arrow_pages=arrow_pages).with_resources(*SYNCED), **run_options(pipeline))
    info = pipeline.last_trace.last_extract_info
    return {name: dict(m.custom_metrics) for name, m in info.metrics[info.loads_ids[0]][0]["resource_metrics"].items()}


@pytest.mark.parametrize("arrow_pages", [True, False], ids=["arrow", "dlt_normalizer"])
def test_no_value_is_lost_at_the_first_sync_nor_when_a_collision_appears_later(
    start_simulator, crm_env, any_warehouse, tmp_path, arrow_pages
):
    # jobs collide from the first sync; contacts from the second one, on the records it reads
    simulator = start_simulator(COUNTS, page_cap=20, colliding_fields=["jobs"])
    crm_env(simulator)
    metrics = _sync(tmp_path, 1, arrow_pages)
    simulator.configure(colliding_fields=list(SYNCED))
    reply = simulator.mutate("contacts", edit=6, insert=2)
    later = set(reply["edited"]) | set(reply["inserted"])
    simulator.mutate("jobs", edit=4, insert=2)
    _sync(tmp_path, 2, arrow_pages)

    any_warehouse.assert_exact(simulator, resources=SYNCED)
    for resource in SYNCED:
        rows = any_warehouse.query(f"SELECT id, {', '.join(COLUMNS)} FROM crm.{resource}")
        landed = {row[0]: tuple(row[1:]) for row in rows}
        records = {r["id"]: r for r in simulator.records(resource)}
        for key, record in records.items():
            if resource == "jobs" or key in later:
                assert landed[key] == _expected(record), (resource, key)
            else:  # read before contacts collided (none of the fields yet), or read again since
                assert landed[key] in ((None,) * len(COLUMNS), _expected(record)), (resource, key)
        if resource == "contacts":  # most contacts were read before, some after the change
            assert sum(value[0] is None for value in landed.values()) > len(landed) // 2
        columns = {row[0] for row in any_warehouse.query(
            "SELECT column_name FROM information_schema.columns "
            f"WHERE table_schema = 'crm' AND table_name = '{resource}'")}
        assert not any(c.endswith("_3") or c == "status__2" for c in columns), columns
    if arrow_pages:  # the renamed pages are the Arrow step's to build, not left to dlt
        assert metrics["jobs"]["records_built_with_arrow"] > 0, metrics

    if arrow_pages:  # once per warehouse: the audit reads the records through the same steps
        results = audit(crm_pipeline(), audit_settings(arrow_pages=arrow_pages), list(SYNCED))
        assert all(result.passed and result.whole_records for result in results.values()), results
        rows = any_warehouse.query(f"SELECT id, {', '.join(COLUMNS)} FROM crm.jobs")
        assert {row[0]: tuple(row[1:]) for row in rows} == {
            r["id"]: _expected(r) for r in simulator.records("jobs")}


def test_the_simulator_serves_colliding_fields_only_when_asked(start_simulator):
    simulator = start_simulator(COUNTS)
    plain = simulator.records("jobs")
    assert not any("Status" in r or "first-name" in r for r in plain)
    simulator.configure(colliding_fields=["jobs"])
    assert simulator.records("jobs") == [with_colliding_fields(r) for r in plain]
    assert "Status" not in simulator.records("contacts")[0]
    with pytest.raises(ValueError):
        simulator.configure(colliding_fields=["nope"])
    assert build_parser().parse_args(["--colliding-fields", "jobs,files"]).colliding_fields == ["jobs", "files"]
    assert build_parser().parse_args([]).colliding_fields == []
