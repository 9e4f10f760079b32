"""Lists land in the warehouse's JSON type (crm/lists_as_json.py): DuckDB `JSON`, PostgreSQL `json`,
with the Arrow step on and off, with no warning per page; the README's query unnests `tags`; a
warehouse holding lists as JSON text (the version before) is refused with the full refresh."""

from __future__ import annotations

import gc
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import dlt
import pytest
from dagster import AssetKey

from crm_assets.sources.crm import CrmConfigurationError, configured_endpoints, crm
from crm_assets.sources.crm.lists_as_json import JsonText, ListsAsJson
from crm_assets.sources.crm_pipeline import crm_pipeline
from crm_assets.sources.destination import run_options
from crm_assets.sources.readback import refuse_earlier_layout
from crm_assets.sources.tuning import sync_tuning

from .conftest import failure_message, run_sync
from .warehouses import LIST_FIELDS, assert_lists_as_in_api, query

README = Path(__file__).resolve().parent.parent / "README.md"
JSON_TYPES = {"duckdb": "JSON", "postgres": "json"}


def readme_unnest_queries() -> dict[str, str]:
    """The README's queries unnesting `tags`, by warehouse: the ```sql block after the line that
    names them, DuckDB's first."""
    match = re.search(r"unnests `tags`[^`]*?```sql\n(.*?)^```", README.read_text(), re.S | re.M)
    assert match, "README: no ```sql block after 'unnests `tags`'"
    duckdb_query, postgres_query = [line for line in match.group(1).splitlines() if line.strip()]
    return {"duckdb": duckdb_query, "postgres": postgres_query}


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _sync(arrow_pages: bool) -> Any:
    """One sync through dlt, as `python -m crm_assets.sources` runs it; dlt's warnings and Python's
    caught."""
    caught = _Warnings()
    dlt_logger = logging.getLogger("dlt")
    dlt_logger.addHandler(caught)
    # earlier tests' garbage is collected now, not during the sync: a finalizer's warning
    # ("Implicitly cleaning up <TemporaryDirectory ...>") would be theirs, not the sync's
    gc.collect()
    try:
        with warnings.catch_warnings(record=True) as python_warnings, sync_tuning():
            warnings.simplefilter("always")
            pipeline = crm_pipeline()
            refuse_earlier_layout(pipeline, configured_endpoints())
            pipeline.run(crm(arrow_pages=arrow_pages), **run_options(pipeline))
    finally:
        dlt_logger.removeHandler(caught)
    assert [r.getMessage() for r in caught.records] == []
    assert [str(w.message) for w in python_warnings if not issubclass(w.category, DeprecationWarning)] == []
    return pipeline


@pytest.mark.parametrize("arrow_pages", [True, False], ids=["arrow", "dlt-normalizer"])
def test_lists_land_in_json_columns_on_both_warehouses_without_a_warning_per_page(
    start_simulator, crm_env, any_warehouse, arrow_pages
):
    simulator = start_simulator(page_cap=40)  # several pages per table
    crm_env(simulator)
    name = "postgres" if hasattr(any_warehouse, "url") else "duckdb"

    pipeline = _sync(arrow_pages)
    simulator.mutate("jobs", edit=9, insert=4)  # new lists, changed lists: the JSON columns are stored now
    simulator.mutate("contacts", edit=5)
    _sync(arrow_pages)

    types = dict(
        ((table, column), data_type) for table, column, data_type in any_warehouse.query(
            "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'crm'"
        )
    )
    for table, fields in LIST_FIELDS.items():
        for field in fields:
            assert types[(table, field)] == JSON_TYPES[name], (table, field, types[(table, field)])
    assert types[("jobs", "location__geo__lat")] in ("DOUBLE", "double precision")  # objects still flatten
    # the API's lists, empty ones and lists of objects (related) included; no child table
    assert_lists_as_in_api(any_warehouse.query, simulator)
    jobs = simulator.records("jobs")
    assert any(job["tags"] == [] for job in jobs) and any(job["related"] for job in jobs)
    if arrow_pages:
        info = pipeline.last_trace.last_extract_info
        metrics = info.metrics[info.loads_ids[0]][0]["resource_metrics"]
        assert metrics["contacts"].custom_metrics["records_built_with_arrow"] > 0

    # the README's query: one row per tag
    tagged = sorted((job["id"], tag) for job in jobs for tag in job["tags"])
    assert sorted(any_warehouse.query(readme_unnest_queries()[name])) == tagged


def test_the_lists_step_decides_a_field_by_its_first_value(tmp_path):
    from dlt.common.normalizers.naming.snake_case import NamingConvention

    lists = ListsAsJson(json_columns={"payload"}, encode=True, naming=NamingConvention())
    page = [
        {"id": "a", "tags": ["x", {"k": 1}], "note": "text", "where": {"aliases": []},
         "payload": {"a": [1]}},
        {"id": "b", "tags": [], "note": ["later", "a list"], "where": {"aliases": ["y"]}},
    ]
    item = lists(page)
    assert item.meta.hints["columns"].keys() == {"tags", "where__aliases"}  # hinted `json`
    assert lists.columns == {"payload", "tags", "where__aliases"}
    first, second = item.data
    assert type(first["tags"]) is JsonText and json.loads(first["tags"]) == ["x", {"k": 1}]
    assert second["tags"] == "[]" and json.loads(second["where"]["aliases"]) == ["y"]
    assert first["payload"] == {"a": [1]}  # a declared JSON column keeps its object whole
    # `note` was text first: its list is JSON text in that column, as a type change
    assert type(second["note"]) is str and json.loads(second["note"]) == ["later", "a list"]
    assert lists.other_values_in_json_columns  # the payload object: the Arrow step checks record by record

    plain = ListsAsJson(naming=NamingConvention())  # the Arrow step off: dlt's normalizer gets the lists
    assert plain([{"id": "c", "tags": ["z"]}]).data == [{"id": "c", "tags": ["z"]}]


def _load_lists_as_text(simulator) -> None:
    """jobs and contacts as the version before loaded them: lists as JSON text in text columns."""

    @dlt.source(name="crm")  # the source's name is the schema's, whose resources a full refresh drops
    def text_lists_crm():
        def earlier(name: str):
            @dlt.resource(name=name, primary_key="id",
                          write_disposition={"disposition": "merge", "strategy": "delete-insert"},
                          columns={"date_created": {"data_type": "timestamp"},
                                   "date_updated": {"data_type": "timestamp"}})
            def records():
                yield [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                       for r in simulator.records(name)]
            return records

        return earlier("jobs"), earlier("contacts")

    pipeline = crm_pipeline()
    pipeline.run(text_lists_crm(), **run_options(pipeline))


TEXT_LISTS_FOUND = "crm.contacts.tags, crm.jobs.related, crm.jobs.tags hold lists as JSON text"


def test_a_warehouse_with_lists_as_json_text_is_refused_with_the_full_refresh(
    start_simulator, crm_env, warehouse
):
    """The version before kept lists as JSON text in text columns: such a table is refused before
    any request, then a full refresh moves it over."""
    simulator = start_simulator({"jobs": 60, "contacts": 40, "tasks": 0, "activities": 0, "files": 0})
    crm_env(simulator)
    _load_lists_as_text(simulator)
    assert query(warehouse, "SELECT data_type FROM information_schema.columns WHERE table_schema = 'crm' "
                            "AND table_name = 'jobs' AND column_name = 'tags'") == [("VARCHAR",)]
    requests = sum(simulator.stats()["requests"].values())
    selection = [AssetKey(["crm", "jobs"]), AssetKey(["crm", "contacts"])]

    failed = run_sync(selection=selection, raise_on_error=False)

    assert not failed.success
    message = failure_message(failed)
    assert TEXT_LISTS_FOUND in message
    assert "--assets crm/jobs,crm/contacts" in message and "full_refresh" in message
    assert sum(simulator.stats()["requests"].values()) == requests  # nothing was requested
    refreshed = run_sync(selection=selection, run_config={"ops": {"crm_sync_assets": {"config": {"full_refresh": True}}}})
    assert refreshed.success
    assert query(warehouse, "SELECT data_type FROM information_schema.columns WHERE table_schema = 'crm' "
                            "AND table_name = 'jobs' AND column_name = 'tags'") == [("JSON",)]
    assert_lists_as_in_api(lambda sql: query(warehouse, sql), simulator, resources=["jobs", "contacts"])
    assert run_sync(selection=selection).success  # and the JSON columns are not refused


def test_lists_as_json_text_are_found_in_postgres_too(start_simulator, crm_env, pg_warehouse):
    simulator = start_simulator({"jobs": 60, "contacts": 40, "tasks": 0, "activities": 0, "files": 0})
    crm_env(simulator)
    _load_lists_as_text(simulator)
    assert pg_warehouse.query("SELECT data_type FROM information_schema.columns WHERE table_schema = 'crm' "
                              "AND table_name = 'jobs' AND column_name = 'tags'") == [("character varying",)]

    with pytest.raises(CrmConfigurationError, match=re.escape(TEXT_LISTS_FOUND)):
        refuse_earlier_layout(crm_pipeline(), configured_endpoints())
