"""Which resources are synced, with which key: configuration, checked before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crm_assets.sources.crm import BUILT_IN, CrmConfigurationError, build_endpoints, configured_endpoints, crm
from crm_assets.sources.crm.catalog import Endpoint

INVOICES = {"path": "/v1/invoices", "data_selector": "results"}


def test_the_defaults_are_the_five_built_in_resources_keyed_by_id():
    endpoints = build_endpoints()
    assert [e.name for e in endpoints] == ["jobs", "contacts", "tasks", "activities", "files"]
    assert endpoints == BUILT_IN
    assert {e.primary_key for e in endpoints} == {"id"}
    assert {e.name: e.timestamp_fields for e in endpoints if e.timestamp_fields != ("date_created", "date_updated")} == {
        "tasks": ("date_created", "date_updated", "due_date")  # the simulator's tasks have it
    }


def test_one_primary_key_for_every_resource_and_resources_added_or_changed_field_by_field():
    endpoints = {
        e.name: e
        for e in build_endpoints(
            "jnid",
            {
                "invoices": {**INVOICES, "epoch_fields": ["date_due"]},
                "tasks": {"page_size": 100},
                "files": {"primary_key": "file_id"},
            },
        )
    }
    assert list(endpoints) == ["jobs", "contacts", "tasks", "activities", "files", "invoices"]
    assert endpoints["invoices"] == Endpoint("invoices", "/v1/invoices", "results", "jnid", 1000, ("date_due",))
    assert endpoints["invoices"].timestamp_fields == ("date_created", "date_updated", "date_due")
    assert endpoints["tasks"].page_size == 100 and endpoints["tasks"].path == "/v1/tasks"
    assert endpoints["tasks"].primary_key == "jnid"
    assert endpoints["files"].primary_key == "file_id" and endpoints["files"].data_selector == "files"
    assert endpoints["activities"].data_selector == "activity"


@pytest.mark.parametrize(
    ("primary_key", "resources", "page_sizes", "message"),
    [
        ("Jnid", None, None, "SOURCES__CRM__PRIMARY_KEY"),
        ("", None, None, "SOURCES__CRM__PRIMARY_KEY"),
        (None, ["invoices"], None, "SOURCES__CRM__RESOURCES"),
        (None, {"invoices": {"data_selector": "results"}}, None, "'invoices' in SOURCES__CRM__RESOURCES"),
        (None, {"invoices": {**INVOICES, "page": 5}}, None, "unknown setting(s) 'page'"),
        (None, {"Invoices": INVOICES}, None, "must be a table name"),
        (None, {"work__orders": INVOICES}, None, "must be a table name"),
        (None, {"2invoices": INVOICES}, None, "must be a table name"),
        (None, {"invoices": {**INVOICES, "page_size": 5000}}, None, "page_size must be a whole number from 3 to 1000"),
        (None, {"invoices": {**INVOICES, "page_size": "100"}}, None, "page_size"),
        (None, {"jobs": {"result_window": 2}}, None, "'jobs' in SOURCES__CRM__RESOURCES (or [sources.crm.resources.<name>] "
         "in .dlt/config.toml): result_window must be the API's result window"),
        (None, {"jobs": {"result_window": "5000"}}, None, "result_window must be"),
        (None, {"invoices": {"path": "v1/invoices"}}, None, "path must be the endpoint's URL path"),
        (None, {"invoices": {"path": "/v1/invoices?x=1"}}, None, "path must be"),
        (None, {"invoices": {**INVOICES, "epoch_fields": "date_due"}}, None, "epoch_fields must be a list"),
        (None, {"invoices": {**INVOICES, "not_epoch_fields": "date_due"}}, None, "not_epoch_fields must be a list"),
        (None, {"invoices": {**INVOICES, "epoch_fields": ["date_due"], "not_epoch_fields": ["date_due"]}}, None,
         "not_epoch_fields holds 'date_due', which epoch_fields also holds"),
        (None, {"jobs": {"not_epoch_fields": ["date_updated"]}}, None,
         "not_epoch_fields holds 'date_updated', which every record has as epoch seconds"),
        (None, {"invoices": {**INVOICES, "data_selector": ""}}, None, "data_selector must be a non-empty"),
        (None, {"invoices": "/v1/invoices"}, None, "expected a table of settings"),
        (None, None, {"invoices": 100}, "SOURCES__CRM__PAGE_SIZES names an unknown resource 'invoices'"),
        (None, None, {"tasks": 2}, "SOURCES__CRM__PAGE_SIZES['tasks']"),
        (None, {"jobs_again": {"path": "/v1/jobs/"}}, None, "'jobs' and 'jobs_again' have the same path"),
    ],
)
def test_bad_configuration_is_refused_naming_the_setting(primary_key, resources, page_sizes, message):
    with pytest.raises(CrmConfigurationError) as raised:
        build_endpoints(primary_key, resources, page_sizes)
    assert message in str(raised.value)


def test_the_result_window_is_every_resources_unless_a_resource_sets_its_own():
    assert {e.result_window for e in build_endpoints()} == {10_000}  # as documented
    endpoints = {e.name: e for e in build_endpoints(None, {"tasks": {"result_window": 8000}}, {"files": 50}, 500)}
    assert {name: e.result_window for name, e in endpoints.items()} == {
        "jobs": 500, "contacts": 500, "tasks": 8000, "activities": 500, "files": 500,
    }
    # a page never reaches past the window
    assert (endpoints["jobs"].read_size, endpoints["tasks"].read_size, endpoints["files"].read_size) == (500, 1000, 50)
    for bad in (0, 2, True, "5000"):
        with pytest.raises(CrmConfigurationError, match="SOURCES__CRM__RESULT_WINDOW"):
            build_endpoints(result_window=bad)


def test_the_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SOURCES__CRM__PRIMARY_KEY", "jnid")
    monkeypatch.setenv("SOURCES__CRM__RESOURCES", '{"invoices": {"path": "/v1/invoices", "data_selector": "results"}}')
    monkeypatch.setenv("SOURCES__CRM__RESULT_WINDOW", "5000")
    endpoints = configured_endpoints()
    assert [e.name for e in endpoints][-1] == "invoices"
    assert {e.primary_key for e in endpoints} == {"jnid"}
    assert {e.result_window for e in endpoints} == {5000}


def test_the_settings_come_from_config_toml(tmp_path: Path):
    # dlt reads .dlt/ of the working folder once per process: ask a fresh one
    (tmp_path / ".dlt").mkdir()
    (tmp_path / ".dlt" / "config.toml").write_text(
        '[sources.crm]\nprimary_key = "jnid"\n\n'
        '[sources.crm.resources.invoices]\npath = "/v1/invoices"\nepoch_fields = ["date_due"]\n\n'
        "[sources.crm.resources.tasks]\npage_size = 250\n"
    )
    program = (
        "from crm_assets.sources.crm import configured_endpoints\n"
        "for e in configured_endpoints(): print(e)\n"
    )
    listed = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=True).stdout
    assert repr(Endpoint("invoices", "/v1/invoices", primary_key="jnid", epoch_fields=("date_due",))) in listed
    assert "name='tasks', path='/v1/tasks', data_selector='results', primary_key='jnid', page_size=250" in listed


def test_json_that_does_not_parse_names_the_setting(monkeypatch):
    monkeypatch.setenv("SOURCES__CRM__RESOURCES", '{"invoices": {"path": "/v1/invoices"')
    with pytest.raises(CrmConfigurationError, match="SOURCES__CRM__RESOURCES"):
        configured_endpoints()


def test_the_source_has_one_resource_per_endpoint_with_its_key_and_timestamp_columns():
    source = crm(
        base_url="http://crm.invalid", api_key="k", primary_key="jnid",
        resources={"invoices": {**INVOICES, "epoch_fields": ["date_due"]}},
    )
    assert list(source.resources) == ["jobs", "contacts", "tasks", "activities", "files", "invoices"]
    invoices = source.resources["invoices"].compute_table_schema()
    assert invoices["columns"]["jnid"]["primary_key"] is True
    assert {name: column["data_type"] for name, column in invoices["columns"].items()
            if name.startswith("date_")} == {"date_created": "timestamp", "date_updated": "timestamp",
                                             "date_due": "timestamp"}


def test_the_source_refuses_bad_resource_settings_naming_them():
    with pytest.raises(CrmConfigurationError, match=r"resource 'invoices' in SOURCES__CRM__RESOURCES.*needs a path"):
        crm(base_url="http://crm.invalid", api_key="k", resources={"invoices": {"data_selector": "results"}})


def test_the_cli_sync_names_a_setting_that_does_not_parse(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOURCES__")}
    env.update(SOURCES__CRM__BASE_URL="http://127.0.0.1:9", SOURCES__CRM__API_KEY="k",
               SOURCES__CRM__RESOURCES="{not json", DLT_DATA_DIR=str(tmp_path / "dlt"))
    completed = subprocess.run([sys.executable, "-m", "crm_assets.sources"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert "crm sync failed" in completed.stderr and "SOURCES__CRM__RESOURCES" in completed.stderr


def test_the_session_tells_resources_apart_by_the_longest_matching_path():
    from crm_assets.sources.crm.http import _endpoint_for

    endpoints = build_endpoints(resources={"invoices": {"path": "/invoices"}, "invoices_v2": {"path": "/v2/invoices"}})
    by_url = {url: (_endpoint_for(endpoints, url)[0] or Endpoint("none", "/")).name for url in (
        "https://api.example.com/api1/v2/invoices?from=0", "https://api.example.com/invoices",
        "https://api.example.com/v1/jobs", "https://api.example.com/v1/myjobs")}
    assert by_url == {"https://api.example.com/api1/v2/invoices?from=0": "invoices_v2",
                      "https://api.example.com/invoices": "invoices",
                      "https://api.example.com/v1/jobs": "jobs", "https://api.example.com/v1/myjobs": "none"}


def test_integer_date_fields_are_epoch_seconds_unless_a_resource_opts_them_out():
    endpoints = {e.name: e for e in build_endpoints(resources={
        "invoices": {**INVOICES, "not_epoch_fields": ["date_sequence"]},
        "tasks": {"not_epoch_fields": ["due_date"]},  # a built-in epoch field, opted out
    })}
    invoices, tasks, jobs = endpoints["invoices"], endpoints["tasks"], endpoints["jobs"]
    assert invoices.is_epoch_field("date_due") and invoices.is_epoch_field("date_created")
    assert not invoices.is_epoch_field("date_sequence") and not invoices.is_epoch_field("due")
    assert not invoices.is_epoch_field("date_info__x")  # a field of a nested object named date_info
    assert BUILT_IN[2].is_epoch_field("due_date") and not tasks.is_epoch_field("due_date")
    assert tasks.timestamp_fields == ("date_created", "date_updated")
    assert jobs.is_epoch_field("date_start")
