"""Pages built as Arrow tables (crm/arrow_pages.py) land exactly what dlt's own normalizer lands.

Each test loads the same records twice, once with the Arrow step and once with every record left
to dlt's normalizer, and compares the two warehouses: the same tables, columns, types and
nullability, and the same rows. Both loads keep lists in their record's row in JSON columns
(lists_as_json.py), as the CRM source does.
"""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import dlt
import pyarrow as pa
import duckdb
import pytest

from crm_assets.sources.crm import crm
from crm_assets.sources.crm.dlt_columns import ROOT_COLUMNS
from crm_assets.sources.crm.arrow_pages import ArrowPages
from crm_assets.sources.crm.arrow_tables import ColumnTypes, page_table
from crm_assets.sources.crm.lists_as_json import ListsAsJson
from crm_assets.sources.tuning import sync_tuning
from crm_assets.sources.crm_pipeline import crm_pipeline
from crm_assets.sources.destination import run_options

from .conftest import SMALL_COUNTS, assert_exact

RESOURCES = ("jobs", "contacts", "tasks", "activities", "files")


def _columns(connection: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], tuple[str, str]]:
    rows = connection.execute(
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = 'crm' AND table_name NOT LIKE '\\_dlt%' ESCAPE '\\'"
    ).fetchall()
    return {(table, column): (data_type, nullable) for table, column, data_type, nullable in rows}


def warehouse_content(path: Path) -> tuple[dict, dict[str, list]]:
    """(columns with their types, rows of each table). A row is keyed by its id, not by dlt's
    random row key, so two loads of the same records compare equal however the keys were drawn."""
    with duckdb.connect(str(path), read_only=True) as connection:
        columns = _columns(connection)
        content: dict[str, list] = {}
        for table in sorted({table for table, _ in columns}):
            names = sorted(c for (t, c) in columns if t == table)
            data_names = [c for c in names if not c.startswith("_dlt")]
            quoted = ", ".join(f'"{c}"' for c in names)
            rows = []
            for values in connection.execute(f'SELECT {quoted} FROM crm."{table}"').fetchall():
                row = dict(zip(names, values))
                rows.append((repr(row["id"]), tuple(repr(row[c]) for c in data_names)))
            content[table] = sorted(rows)
    return columns, content


def assert_same_warehouse(arrow: Path, dlt_only: Path) -> None:
    arrow_columns, arrow_rows = warehouse_content(arrow)
    dlt_columns, dlt_rows = warehouse_content(dlt_only)
    assert arrow_columns == dlt_columns
    assert arrow_rows.keys() == dlt_rows.keys()
    for table in dlt_rows:
        assert arrow_rows[table] == dlt_rows[table], table


def _arrow_metrics(pipeline: Any) -> dict[str, dict[str, int]]:
    info = pipeline.last_trace.last_extract_info
    metrics = info.metrics[info.loads_ids[0]][0]["resource_metrics"]
    return {name: dict(m.custom_metrics) for name, m in metrics.items()}


def _sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, label: str, arrow_pages: bool, **source_args: Any):
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(tmp_path / f"{label}.duckdb"))
    pipeline = crm_pipeline(pipelines_dir=str(tmp_path / f"pipelines-{label}"))
    with sync_tuning():
        pipeline.run(crm(arrow_pages=arrow_pages, **source_args), **run_options(pipeline))
    return pipeline


@pytest.mark.parametrize("hard_delete", [False, True])
def test_a_full_then_an_incremental_sync_land_the_same_tables_as_dlts_normalizer(
    start_simulator, crm_env, tmp_path, monkeypatch, hard_delete
):
    simulator = start_simulator(page_cap=40)  # many pages, several per table
    crm_env(simulator)
    arrow = _sync(tmp_path, monkeypatch, "arrow", True, hard_delete=hard_delete)
    _sync(tmp_path, monkeypatch, "dlt", False, hard_delete=hard_delete)
    assert_same_warehouse(tmp_path / "arrow.duckdb", tmp_path / "dlt.duckdb")

    metrics = _arrow_metrics(arrow)
    for name in RESOURCES:
        # every resource's pages went through the Arrow step...
        assert metrics[name]["records_built_with_arrow"] > 0, (name, metrics)
    # ...and the jobs whose budget is not a number were left to dlt (variant column budget__v_text)
    assert 0 < metrics["jobs"]["records_left_to_dlt_normalizer"] < SMALL_COUNTS["jobs"]

    simulator.mutate("jobs", edit=7, insert=5, deactivate=3)
    simulator.mutate("files", edit=4, deactivate=2)
    simulator.mutate("contacts", add_field={"name": "loyalty_tier", "value": "gold"}, edit=3)
    _sync(tmp_path, monkeypatch, "arrow", True, hard_delete=hard_delete)
    _sync(tmp_path, monkeypatch, "dlt", False, hard_delete=hard_delete)
    assert_same_warehouse(tmp_path / "arrow.duckdb", tmp_path / "dlt.duckdb")
    if not hard_delete:
        monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(tmp_path / "arrow.duckdb"))
        assert_exact(tmp_path / "arrow.duckdb", simulator)


# Records dlt's normalizer has opinions about. Each case is loaded on its own table (a page that needs
# the record-by-record check sends the resource's next pages straight there, so the whole-page
# rules are only tested by a case's first pages), and each page's other records are plain.
PLAIN_PAGE = [  # nested objects (a list inside one), lists of objects and of scalars, nulls, empty lists
    {"id": "a1", "n": 1, "ok": True,
     "where": {"city": "Oslo", "geo": {"lat": 59.9, "lng": 10.7}, "aliases": ["Christiania"]},
     "tags": ["x", None, "y"], "links": [{"kind": "job", "ref": "j1", "notes": ["n1", "n2"]}]},
    {"id": "a2", "n": 2, "ok": False, "where": None, "tags": [], "links": None},
    {"id": "a3", "n": None, "where": {"city": None, "geo": None}, "tags": None,
     "links": [{"kind": "contact", "ref": None, "notes": []}, {"kind": "job", "ref": "j9"}]},
]
MIXED_PAGE = [  # a field whose type varies between records: the odd ones go to dlt's variant columns
    {"id": "b1", "n": 5, "score": 1.5, "note": "text", "payload": {"a": 2}},
    {"id": "b2", "n": "12k", "score": 2, "note": 7},
    {"id": "b3", "n": 6, "score": True, "note": None},
]
AWKWARD_CASES = {
    "plain": ([PLAIN_PAGE], [(("things", "where__aliases"), "JSON"),  # a list inside an object
                             (("things", "links"), "JSON"),  # a list of objects with lists
                             (("things", "tags"), "JSON")]),
    "varying types": ([PLAIN_PAGE, MIXED_PAGE], [(("things", "n__v_text"), "VARCHAR"),
                                                 (("things", "score__v_bool"), "BOOLEAN")]),
    "ISO timestamps in a new column": (
        [[{"id": "c1", "seen_at": "2024-05-01T10:00:00+00:00"},
          {"id": "c2", "seen_at": "2024-05-02T10:00:00+00:00"}],
         [{"id": "c3", "seen_at": "not a date"}]],
        [(("things", "seen_at"), "TIMESTAMP"), (("things", "seen_at__v_text"), "VARCHAR")]),
    "a new column of ints then floats": (
        [[{"id": "d1", "ratio": 1}, {"id": "d2", "ratio": 0.5}]],
        [(("things", "ratio"), "BIGINT"), (("things", "ratio__v_double"), "DOUBLE")]),
    "keys dlt renames or reserves, a list of lists": (
        [[{"id": "e1", "Due Date": 3}, {"id": "e2", "__odd": 1, "_dlt_own": "x"},
          {"id": "e3", "grid": [[1, 2], [3]]}]],
        [(("things", "due_date"), "BIGINT"), (("things", "grid"), "JSON")]),
    # new columns first seen in a record left to dlt (its key dlt renames): dlt types them by those
    # first values, so later values of another type must not be taken
    "new columns first seen in a record left to dlt": (
        [[{"id": "g1", "grid": [[1]], "code": "x1", "when": "2024-01-01T00:00:00+00:00", "Odd Key": 1},
          {"id": "g2", "code": 5, "when": "soon", "odd_key": "one"},
          {"id": "g3", "code": "x3", "when": "later", "odd_key": 2}]],
        [(("things", "code"), "VARCHAR"), (("things", "when"), "TIMESTAMP"),
         (("things", "when__v_text"), "VARCHAR")]),
    "a whole page of another type in a known column": (
        [PLAIN_PAGE, [{"id": "k1", "n": "seven", "tags": [7]}, {"id": "k2", "n": "eight"}]],
        [(("things", "n__v_text"), "VARCHAR")]),
    "a JSON column keeps objects whole": (
        [[{"id": "h1", "payload": {"a": 1, "b": [1, 2]}}]], [(("things", "payload"), "JSON")]),
    "known columns again, and a newer copy merged": (
        [PLAIN_PAGE, MIXED_PAGE,
         [{"id": "i1", "n": 9, "score": 3.25, "where": {"city": "Rome", "geo": {"lat": 41.9, "lng": 12.5}},
           "tags": ["z"]},
          {"id": "i2", "n": 10, "where": {"geo": {"lat": 1.5, "lng": 12}}},  # an int in a double column
          # a1 again, newer: the merge keeps this one (dedup_sort on `updated`, as the CRM source)
          {"id": "a1", "n": 10, "ok": None, "tags": ["replaced"], "links": [], "updated": 2}]],
        [(("things", "where__geo__lng"), "DOUBLE")]),
}


def _awkward_resource(pages: list[list[dict]], arrow_pages: bool,
                      columns: Optional[dict[str, dict[str, Any]]] = None, name: str = "things") -> Any:
    @dlt.resource(name=name, primary_key="id",
                  write_disposition={"disposition": "merge", "strategy": "delete-insert"},
                  columns={"updated": {"data_type": "bigint", "dedup_sort": "desc"},
                           "payload": {"data_type": "json"}, **(columns or {})})
    def things():
        for page in pages:  # copies: the map encodes lists in place, and the cases share pages
            yield [{"updated": 1, **copy.deepcopy(record)} for record in page]

    resource = things()
    lists = ListsAsJson(resource, json_columns={"payload"}, encode=arrow_pages)
    resource.add_step(lists)
    if arrow_pages:
        resource.apply_hints(columns=ROOT_COLUMNS)
        resource.add_step(ArrowPages(resource, lists=lists))
    return resource


def _case_tables(cases) -> dict[Any, str]:
    """A table of its own for each case: `things_0`, `things_1`, ..."""
    return {case: f"things_{index}" for index, case in enumerate(cases)}


AWKWARD_TABLES = _case_tables(AWKWARD_CASES)


def _table_content(content: tuple[dict, dict[str, list]], table: str) -> tuple[dict, dict[str, list]]:
    """One case's part of `warehouse_content`: the columns with their types and the rows of its
    table and of any child table dlt made of it (`<table>__...`)."""
    columns, rows = content

    def ours(name: str) -> bool:
        return name == table or name.startswith(f"{table}__")

    return ({key: kind for key, kind in columns.items() if ours(key[0])},
            {name: table_rows for name, table_rows in rows.items() if ours(name)})


@pytest.fixture(scope="module")
def awkward_loads(tmp_path_factory):
    """Every case's records in one load per path, each case in a table of its own (the Arrow step
    and dlt's normalizer work table by table, so each case is still loaded on its own; one load
    instead of one per case saves dlt's per-run cost, about 0.8 s of CPU a case): the Arrow step's
    metrics by table and both warehouses' content."""
    root = tmp_path_factory.mktemp("awkward")
    metrics = {}
    for label, arrow_pages in (("arrow", True), ("dlt", False)):
        pipeline = dlt.pipeline(
            pipeline_name=f"awkward_{label}", pipelines_dir=str(root / label), dataset_name="crm",
            destination=dlt.destinations.duckdb(str(root / f"{label}.duckdb")),
        )
        pipeline.run([_awkward_resource(AWKWARD_CASES[case][0], arrow_pages, name=table)
                      for case, table in AWKWARD_TABLES.items()], loader_file_format="parquet")
        if arrow_pages:
            metrics = _arrow_metrics(pipeline)
    return metrics, warehouse_content(root / "arrow.duckdb"), warehouse_content(root / "dlt.duckdb")


@pytest.mark.parametrize("case", list(AWKWARD_CASES))
def test_awkward_records_land_as_dlts_normalizer_lands_them(awkward_loads, case):
    pages, expected_columns = AWKWARD_CASES[case]
    table = AWKWARD_TABLES[case]
    all_metrics, arrow, dlt_only = awkward_loads
    metrics = all_metrics[table]
    records = sum(len(page) for page in pages)
    assert metrics["records_built_with_arrow"] + metrics["records_left_to_dlt_normalizer"] == records
    if case == "plain":
        assert metrics["records_built_with_arrow"] == records

    assert table in dlt_only[1]
    assert _table_content(arrow, table) == _table_content(dlt_only, table)
    columns = arrow[0]
    for (_, column), data_type in expected_columns:  # what the case is about, as dlt decided it
        assert (table, column) in columns, (column, sorted(columns))
        if data_type:
            assert columns[(table, column)][0].startswith(data_type), (column, columns[(table, column)])


# Epoch seconds in columns the resource hints as timestamps (the CRM's date fields): dlt's
# normalizer coerces each int to a UTC instant; the Arrow step builds them as timestamp columns.
EPOCH_HINTS = {"date_created": {"data_type": "timestamp"}, "date_updated": {"data_type": "timestamp"}}
FIRST_DAY, LAST_SECOND = -62135596800, 253402300799  # 0001-01-01T00:00:00Z, 9999-12-31T23:59:59Z
EPOCH_PAGES = [
    [{"id": "t1", "date_created": 1700000000, "date_updated": 1700000500, "tags": ["a"]},
     {"id": "t2", "date_created": 0, "date_updated": None},  # the epoch itself, a null
     {"id": "t3", "date_created": -1, "date_updated": LAST_SECOND, "where": {"city": "Oslo"}}],
    [{"id": "t4", "date_created": FIRST_DAY, "date_updated": 1},
     {"id": "t5", "date_created": None, "date_updated": None}],  # no value in either column
]
EPOCH_PAGES_AGAIN = [  # the next load: newer copies merged over t1 and t2, and a new record
    [{"id": "t1", "date_created": 1700000000, "date_updated": 1800000000, "tags": ["b"], "updated": 2},
     {"id": "t2", "date_created": 0, "date_updated": 1800000001, "updated": 2},
     {"id": "t6", "date_created": 1600000000, "date_updated": None}],
]


def _schema_columns(pipeline: Any, table: str = "things") -> dict[str, dict[str, Any]]:
    """How dlt's schema holds each column (nullable unless it says otherwise)."""
    return {
        name: {"data_type": spec.get("data_type"), "precision": spec.get("precision"),
               "timezone": spec.get("timezone"), "nullable": spec.get("nullable", True)}
        for name, spec in pipeline.default_schema.get_table_columns(table).items()
    }


def _load_both(tmp_path: Path, loads: list[list[list[dict]]], columns: dict[str, dict[str, Any]]) -> list[dict]:
    """Each load's pages through the Arrow step and through dlt's normalizer alone, comparing the
    two warehouses and dlt's two schemas after every load. The Arrow step's metrics per load."""
    pipelines = {
        label: dlt.pipeline(
            pipeline_name=f"epoch_{label}", pipelines_dir=str(tmp_path / label), dataset_name="crm",
            destination=dlt.destinations.duckdb(str(tmp_path / f"{label}.duckdb")),
        )
        for label in ("arrow", "dlt")
    }
    metrics = []
    for pages in loads:
        for label, pipeline in pipelines.items():
            pipeline.run(_awkward_resource(pages, label == "arrow", columns), loader_file_format="parquet")
        metrics.append(_arrow_metrics(pipelines["arrow"])["things"])
        assert metrics[-1]["records_built_with_arrow"] + metrics[-1]["records_left_to_dlt_normalizer"] == sum(
            len(page) for page in pages
        )
        assert_same_warehouse(tmp_path / "arrow.duckdb", tmp_path / "dlt.duckdb")
        for table in pipelines["dlt"].default_schema.data_table_names():
            assert _schema_columns(pipelines["arrow"], table) == _schema_columns(pipelines["dlt"], table), table
    return metrics


def test_hinted_epoch_seconds_are_built_as_dlts_timestamps_in_a_first_and_a_merge_load(tmp_path):
    metrics = _load_both(tmp_path, [EPOCH_PAGES, EPOCH_PAGES_AGAIN], EPOCH_HINTS)
    # every record was built with Arrow, in the second load too (the schema then says timestamp)
    assert [m["records_left_to_dlt_normalizer"] for m in metrics] == [0, 0], metrics

    with duckdb.connect(str(tmp_path / "arrow.duckdb"), read_only=True) as connection:
        columns = _columns(connection)
        rows = dict(
            (row[0], row[1:]) for row in
            connection.execute("SELECT id, date_created, date_updated FROM crm.things").fetchall()
        )
    for column in EPOCH_HINTS:
        assert columns[("things", column)] == ("TIMESTAMP WITH TIME ZONE", "YES")

    def utc(seconds: int) -> datetime:
        return datetime.fromtimestamp(seconds, timezone.utc)

    assert rows["t1"] == (utc(1700000000), utc(1800000000))  # the newer copy's date_updated
    assert rows["t2"] == (utc(0), utc(1800000001))
    assert rows["t3"] == (utc(-1), datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc))
    assert rows["t4"] == (datetime(1, 1, 1, tzinfo=timezone.utc), utc(1))
    assert rows["t5"] == (None, None)
    assert rows["t6"] == (utc(1600000000), None)


def test_a_page_of_epoch_seconds_is_built_whole(tmp_path):
    """pyarrow types the page's ints as int64 in one go; only the epoch columns are cast."""
    schema = dlt.Schema("crm")
    caps = dlt.destinations.duckdb(str(tmp_path / "unused.duckdb")).capabilities()
    hinted = {name: {"name": name, **spec} for name, spec in EPOCH_HINTS.items()}
    lists = ListsAsJson(encode=True)
    types = ColumnTypes(schema, "things", hinted, caps, json_names=lists.columns)
    encoded = lists(copy.deepcopy(EPOCH_PAGES[0]))  # with a `json` hint for `tags`
    first_page = encoded.data
    root, left, mixed = page_table("things", first_page, types, "load", whole_page=True)
    assert (left, mixed) == ([], False)
    assert root.schema.field("date_created").type == pa.timestamp("us", tz="UTC")
    assert root.schema.field("date_updated").type == pa.timestamp("us", tz="UTC")
    assert root.column("date_created").to_pylist()[:2] == [
        datetime.fromtimestamp(1700000000, timezone.utc), datetime.fromtimestamp(0, timezone.utc)
    ]

    # a float in the page: that record is dlt's, the others still Arrow's
    page = [*first_page, {"id": "f", "date_created": 1700000000.5}]
    table, left, mixed = page_table("things", page, ColumnTypes(schema, "things", hinted, caps), "load",
                                    whole_page=True)
    assert (left, mixed) == ([page[-1]], True)
    assert table.num_rows == 3

    # a list the lists step did not encode would be a child table: dlt's normalizer builds that record
    raw = [*first_page[1:], {"id": "l", "tags": ["a"]}]
    table, left, mixed = page_table("things", raw, ColumnTypes(schema, "things", hinted, caps), "load",
                                    whole_page=True)
    assert (left, mixed) == ([raw[-1]], True)
    assert table.num_rows == 2

    # no destination known, no way to tell dlt's timestamp type: left to dlt
    assert not ColumnTypes(schema, "things", hinted, None).epoch


ODD_EPOCH_VALUES = {  # what dlt's normalizer does with them
    "a float": (1700000000.25, None),  # coerced, with its fraction
    "an ISO string": ("2024-05-01T10:00:00+00:00", None),  # parsed
    "a string that is no date": ("soon", ("things", "date_created__v_text")),
    "a bool": (True, ("things", "date_created__v_bool")),
    "seconds past year 9999": (LAST_SECOND + 1, ("things", "date_created__v_bigint")),
    "seconds before year 1": (FIRST_DAY - 1, ("things", "date_created__v_bigint")),
}


ODD_CASES = _case_tables([(case, first) for case in ODD_EPOCH_VALUES for first in (False, True)])


@pytest.fixture(scope="module")
def odd_loads(tmp_path_factory):
    """Every odd value's two loads, each (value, place) in a table of its own, once per path for all
    twelve: the Arrow step's metrics by table and load, both warehouses' content and dlt's two
    schemas after each load (one pair of loads instead of twelve saves ~1.3 s of CPU a case)."""
    root = tmp_path_factory.mktemp("odd_epochs")
    first_loads = {}
    for (case, first), table in ODD_CASES.items():
        odd = {"id": "odd", "date_created": ODD_EPOCH_VALUES[case][0], "date_updated": 1700000000}
        plain = [{"id": f"p{i}", "date_created": 1700000000 + i, "date_updated": None} for i in range(3)]
        first_loads[table] = [[odd, *plain] if first else [*plain[:2], odd, plain[2]], EPOCH_PAGES[1]]
    loads = [first_loads, {table: EPOCH_PAGES_AGAIN for table in first_loads}]
    pipelines = {
        label: dlt.pipeline(
            pipeline_name=f"odd_{label}", pipelines_dir=str(root / label), dataset_name="crm",
            destination=dlt.destinations.duckdb(str(root / f"{label}.duckdb")),
        )
        for label in ("arrow", "dlt")
    }
    after = []
    for pages_by_table in loads:
        for label, pipeline in pipelines.items():
            pipeline.run([_awkward_resource(pages, label == "arrow", EPOCH_HINTS, name=table)
                          for table, pages in pages_by_table.items()], loader_file_format="parquet")
        after.append({
            "metrics": _arrow_metrics(pipelines["arrow"]),
            "records": {table: sum(len(page) for page in pages) for table, pages in pages_by_table.items()},
            "content": {label: warehouse_content(root / f"{label}.duckdb") for label in pipelines},
            "schemas": {label: {table: _schema_columns(pipeline, table) for table in first_loads}
                        for label, pipeline in pipelines.items()},
        })
    return after


@pytest.mark.parametrize("first", [False, True], ids=["mid-page", "first-on-page"])
@pytest.mark.parametrize("case", list(ODD_EPOCH_VALUES))
def test_other_values_in_a_hinted_timestamp_column_are_left_to_dlt(odd_loads, case, first):
    value, variant = ODD_EPOCH_VALUES[case]
    table = ODD_CASES[(case, first)]
    metrics = []
    for load in odd_loads:  # what _load_both checks after each load, for this case's table
        metrics.append(load["metrics"][table])
        assert metrics[-1]["records_built_with_arrow"] + metrics[-1]["records_left_to_dlt_normalizer"] == (
            load["records"][table])
        assert table in load["content"]["dlt"][1]
        assert _table_content(load["content"]["arrow"], table) == _table_content(load["content"]["dlt"], table)
        assert load["schemas"]["arrow"][table] == load["schemas"]["dlt"][table], table
    assert metrics[0]["records_left_to_dlt_normalizer"] == 1, metrics
    assert metrics[1]["records_left_to_dlt_normalizer"] == 0, metrics
    if variant:
        assert (table, variant[1]) in odd_loads[-1]["content"]["arrow"][0]


@pytest.mark.parametrize("hint", [{"data_type": "timestamp", "precision": 3},
                                  {"data_type": "timestamp", "timezone": False}],
                         ids=["milliseconds", "naive"])
def test_a_timestamp_dlt_stores_otherwise_is_left_to_dlt(tmp_path, hint):
    """Epoch seconds are built only as dlt's tz-aware microseconds; other timestamps are dlt's."""
    metrics = _load_both(tmp_path, [EPOCH_PAGES], {"date_created": hint})
    with_seconds = sum(record["date_created"] is not None for page in EPOCH_PAGES for record in page)
    assert metrics[0]["records_left_to_dlt_normalizer"] == with_seconds, metrics


def test_a_timestamp_column_the_resource_does_not_hint_takes_no_epoch_seconds(tmp_path):
    """dlt detected the column as a timestamp from ISO strings: ints there stay dlt's to coerce."""
    loads = [[[{"id": "s1", "seen_at": "2024-05-01T10:00:00+00:00"}]],
             [[{"id": "s2", "seen_at": 1700000000}, {"id": "s3", "seen_at": 1700000001}]]]
    metrics = _load_both(tmp_path, loads, {})
    assert metrics[1]["records_left_to_dlt_normalizer"] == 2, metrics


def test_with_the_step_off_every_record_takes_dlts_normalizer(start_simulator, crm_env, tmp_path, monkeypatch):
    simulator = start_simulator()
    crm_env(simulator)
    monkeypatch.setenv("SOURCES__CRM__ARROW_PAGES", "false")
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(tmp_path / "off.duckdb"))
    pipeline = crm_pipeline()
    pipeline.run(crm(), **run_options(pipeline))

    metrics = _arrow_metrics(pipeline)
    assert set(metrics) == set(RESOURCES)
    assert not any("records_built_with_arrow" in m for m in metrics.values()), metrics
    assert_exact(tmp_path / "off.duckdb", simulator)


def test_outside_a_sync_the_step_builds_the_pages_too(start_simulator, crm_env, tmp_path, monkeypatch):
    """A user's own pipeline, without `sync_tuning()`: the step needs nothing the sync sets up."""
    simulator = start_simulator()
    crm_env(simulator)
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(tmp_path / "plain.duckdb"))
    pipeline = crm_pipeline()
    pipeline.run(crm(), **run_options(pipeline))

    metrics = _arrow_metrics(pipeline)
    assert all(m["records_built_with_arrow"] > 0 for m in metrics.values()), metrics
    assert_exact(tmp_path / "plain.duckdb", simulator)


# Integer `date_*` fields the resource does not declare (epoch_dates.py): hinted as timestamps when
# they first appear, on either path; an opted-out one, text and floats are typed by their values.
DATE_PAGES = [
    [{"id": "u1", "date_created": 1700000000, "n": 1}, {"id": "u2", "date_created": 1700000001}],
    [{"id": "u3", "date_start": 1700000100, "date_note": "soon", "date_seq": 7, "date_end": None},
     {"id": "u4", "date_start": 1700000200, "date_note": "later", "date_seq": 8, "date_end": None}],
    [{"id": "u5", "date_start": 1700000300, "date_end": 1700009999, "date_ratio": 0.5},
     {"id": "u6", "date_start": 1700000301.5, "date_end": 1700010000}],  # a float: dlt's, coerced
]
DATE_PAGES_AGAIN = [  # the next load: the columns now in the stored schema
    [{"id": "u7", "date_start": 1800000000, "date_end": 1800000001, "date_seq": 9, "date_note": "x"},
     {"id": "u3", "date_start": 1800000002, "updated": 2}],
]


def _dated_resource(pages: list[list[dict]], arrow_pages: bool) -> Any:
    from crm_assets.sources.crm.catalog import Endpoint
    from crm_assets.sources.crm.epoch_dates import EpochDates

    endpoint = Endpoint("things", "/things", not_epoch_fields=("date_seq",))

    @dlt.resource(name="things", primary_key="id",
                  write_disposition={"disposition": "merge", "strategy": "delete-insert"},
                  columns={"updated": {"data_type": "bigint", "dedup_sort": "desc"},
                           **{f: {"data_type": "timestamp"} for f in endpoint.timestamp_fields}})
    def things():
        for page in pages:
            yield [{"updated": 1, **copy.deepcopy(record)} for record in page]

    resource = things()
    epoch_dates = EpochDates(endpoint, resource)
    resource.add_step(epoch_dates)
    if arrow_pages:
        resource.apply_hints(columns=ROOT_COLUMNS)
        resource.add_step(ArrowPages(resource, epoch_dates))
    return resource


def test_integer_date_fields_appearing_later_land_as_timestamps_on_both_paths(tmp_path):
    pipelines = {
        label: dlt.pipeline(
            pipeline_name=f"dates_{label}", pipelines_dir=str(tmp_path / label), dataset_name="crm",
            destination=dlt.destinations.duckdb(str(tmp_path / f"{label}.duckdb")),
        )
        for label in ("arrow", "dlt")
    }
    for pages in (DATE_PAGES, DATE_PAGES_AGAIN):
        for label, pipeline in pipelines.items():
            pipeline.run(_dated_resource(pages, label == "arrow"), loader_file_format="parquet")
        metrics = _arrow_metrics(pipelines["arrow"])["things"]
        assert metrics["records_built_with_arrow"] >= sum(len(page) for page in pages) - 1, metrics
        assert_same_warehouse(tmp_path / "arrow.duckdb", tmp_path / "dlt.duckdb")
        assert _schema_columns(pipelines["arrow"]) == _schema_columns(pipelines["dlt"])

    with duckdb.connect(str(tmp_path / "arrow.duckdb"), read_only=True) as connection:
        columns = _columns(connection)
        rows = dict(connection.execute("SELECT id, date_start FROM crm.things").fetchall())
    types = {column: kind for (table, column), (kind, _) in columns.items()}
    assert types["date_start"] == types["date_end"] == "TIMESTAMP WITH TIME ZONE", types
    assert types["date_seq"] == "BIGINT" and types["date_note"] == "VARCHAR", types  # opted out; text
    assert types["date_ratio"] == "DOUBLE", types  # not an integer
    assert rows["u4"] == datetime.fromtimestamp(1700000200, timezone.utc)
    assert rows["u3"] == datetime.fromtimestamp(1800000002, timezone.utc)  # the newer copy
    assert rows["u6"] == datetime.fromtimestamp(1700000301.5, timezone.utc)


def test_the_crm_sources_date_fields_land_as_timestamps_with_the_step_on_and_off(
    start_simulator, crm_env, tmp_path, monkeypatch
):
    """tasks.due_date (declared), invoices.date_due (named date_*, no configuration) and a
    date_start the API starts to send later: timestamps, the same on both paths."""
    simulator = start_simulator({**SMALL_COUNTS, "invoices": 120}, page_cap=40)
    crm_env(simulator)
    invoices = {"invoices": {"path": "/v1/invoices"}}
    _sync(tmp_path, monkeypatch, "arrow", True, resources=invoices)
    _sync(tmp_path, monkeypatch, "dlt", False, resources=invoices)
    assert_same_warehouse(tmp_path / "arrow.duckdb", tmp_path / "dlt.duckdb")

    simulator.mutate("tasks", edit=4, add_field={"name": "date_start", "value": 1700000000})
    simulator.mutate("jobs", insert=2, add_field={"name": "date_closed", "value": 1700000500})
    _sync(tmp_path, monkeypatch, "arrow", True, resources=invoices)
    _sync(tmp_path, monkeypatch, "dlt", False, resources=invoices)
    assert_same_warehouse(tmp_path / "arrow.duckdb", tmp_path / "dlt.duckdb")

    with duckdb.connect(str(tmp_path / "arrow.duckdb"), read_only=True) as connection:
        types = {key: kind for key, (kind, _) in _columns(connection).items()}
        started = connection.execute(
            "SELECT COUNT(*) FROM crm.tasks WHERE date_start = TIMESTAMPTZ '2023-11-14 22:13:20+00'"
        ).fetchone()[0]
    for column in (("tasks", "due_date"), ("invoices", "date_due"), ("tasks", "date_start"),
                   ("jobs", "date_closed")):
        assert types[column] == "TIMESTAMP WITH TIME ZONE", (column, types[column])
    assert started == 4
