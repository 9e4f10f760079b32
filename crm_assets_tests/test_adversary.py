"""The whole pipeline against the simulator's adversary (docs/api-contract.md, "Listings change
while they are read"), on DuckDB and PostgreSQL.

For each kind of change, and all of them at once with 5% faults and dropped connections:
- every record that was in the API for the whole sync lands once, with the API's values;
- nothing lands that the API never had;
- the sync takes at most 3x the requests of an undisturbed sync of the same data, plus a constant.

Resources of more than 16 pages are read in parallel slices (slices.py): at 10 records a page,
jobs and contacts are, so these syncs check the sliced read too (the test says it was sliced).
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import requests
from dagster import AssetKey

from crm_assets.sources.crm import BUILT_IN
from crm_assets.sources.crm.keyset import SPARE_REQUESTS, KeysetRead
from crm_assets.sources.crm.paginator import page_params

from .conftest import API_KEY, RESOURCES, SMALL_COUNTS, api_state, failure_message, run_sync

PAGE_SIZE = 20  # many pages, so each change mode fires many times in one sync
WINDOW = 10_000  # the API's result window

MODES = {
    "repeat": {"repeat_every": 3},
    "insert": {"insert_every": 3},
    "delete": {"delete_every": 3},
    "all_with_faults": {
        "repeat_every": 4,
        "insert_every": 3,
        "delete_every": 5,
        "count_capped": True,
        "fault_every": 20,
        "fault_kinds": ["500", "502", "503", "504", "429", "drop"],
        "retry_after": 0,
    },
}


SLICED_PAGE_SIZE = 10  # jobs and contacts: 24 and 31 pages, read in slices


def _small_pages(monkeypatch, sliced: tuple[str, ...] = ()) -> None:
    sizes = {r: SLICED_PAGE_SIZE if r in sliced else PAGE_SIZE for r in RESOURCES}
    monkeypatch.setenv("SOURCES__CRM__PAGE_SIZES", json.dumps(sizes))


def _pages_served(simulator) -> dict[str, int]:
    return {r: simulator.stats()["statuses"][r].get("200", 0) for r in RESOURCES}


def _undisturbed_pages(start_simulator, sliced: tuple[str, ...] = ()) -> dict[str, int]:
    """Pages an undisturbed read of the same data takes, per resource (the same reader, no sync)."""
    calm = start_simulator()
    pages = {}
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {API_KEY}"
        for resource in RESOURCES:
            endpoint = {e.name: e for e in BUILT_IN}[resource]
            read = KeysetRead(resource, SLICED_PAGE_SIZE if resource in sliced else PAGE_SIZE)
            while not read.done:
                body = session.get(calm.url + endpoint.path, params=page_params(read.request())).json()
                read.take(body[endpoint.data_selector], body["count"])
            pages[resource] = read.requests
    return pages


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_record_present_throughout_lands_once_within_the_request_bound(
    start_simulator, crm_env, any_warehouse, monkeypatch, caplog, mode
):
    caplog.set_level(logging.INFO, logger="crm_assets.sources.crm")
    _small_pages(monkeypatch, sliced=("jobs", "contacts"))
    undisturbed = _undisturbed_pages(start_simulator, sliced=("jobs", "contacts"))

    simulator = start_simulator()
    crm_env(simulator)
    before = {r: set(simulator.ids(r)) for r in RESOURCES}
    simulator.configure(**MODES[mode])

    result = run_sync()

    assert result.success, failure_message(result)
    sliced = set(re.findall(r"(\w+): reading date_updated >= 0 in [2-8] slice", caplog.text))
    assert sliced == {"jobs", "contacts"}, sliced
    simulator.configure(repeat_every=None, insert_every=None, delete_every=None, fault_every=None)
    for resource in RESOURCES:
        ids = any_warehouse.table_ids(resource)
        assert len(ids) == len(set(ids)), f"{resource}: an id landed twice"
        now = api_state(simulator, resource)
        stayed = before[resource] & set(now)
        landed = any_warehouse.table_state(resource)
        missing = stayed - set(landed)
        assert not missing, f"{resource}: records present throughout did not land: {sorted(missing)[:5]}"
        assert {i: landed[i] for i in stayed} == {i: now[i] for i in stayed}, resource
        never = set(landed) - simulator.ids_ever(resource)
        assert not never, f"{resource}: landed ids the API never had: {sorted(never)[:5]}"
        pages = _pages_served(simulator)[resource]
        assert pages <= 3 * undisturbed[resource] + SPARE_REQUESTS, (resource, pages, undisturbed[resource])
    if mode == "delete" or mode == "all_with_faults":
        assert sum(len(before[r] - set(simulator.ids(r))) for r in RESOURCES) > 0  # deletes did happen


def test_a_count_capped_at_the_window_does_not_end_the_read(start_simulator, crm_env, any_warehouse):
    # search backends stop counting at the result window: 12,500 contacts, `count` says 10,000
    simulator = start_simulator({**SMALL_COUNTS, "contacts": 12_500}, count_capped=True, page_cap=700)
    crm_env(simulator)

    result = run_sync(selection=[AssetKey(["crm", "contacts"])])

    assert result.success, failure_message(result)
    any_warehouse.assert_exact(simulator, resources=["contacts"])
    assert len(any_warehouse.table_ids("contacts")) == 12_500


def test_a_bulk_edit_of_more_than_a_page_in_one_second_lands_exactly(
    start_simulator, crm_env, any_warehouse, monkeypatch
):
    _small_pages(monkeypatch)
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync(selection=[AssetKey(["crm", "contacts"])]).success

    simulator.mutate("contacts", edit=230)  # one second of date_updated: more than 11 pages
    simulator.configure(delete_every=4, repeat_every=5)
    before = set(simulator.ids("contacts"))
    result = run_sync(selection=[AssetKey(["crm", "contacts"])])

    assert result.success, failure_message(result)
    stayed = before & set(simulator.ids("contacts"))
    landed = any_warehouse.table_state("contacts")
    now = api_state(simulator, "contacts")
    assert {i: landed[i] for i in stayed} == {i: now[i] for i in stayed}


def test_a_burst_beyond_the_window_in_one_second_of_both_dates_fails_naming_it(
    start_simulator, crm_env, warehouse, monkeypatch
):
    simulator = start_simulator()
    crm_env(simulator)
    simulator.mutate("files", insert=WINDOW + 10)  # an import: one second, both dates

    result = run_sync(selection=[AssetKey(["crm", "files"])], raise_on_error=False)

    assert not result.success
    message = failure_message(result)
    assert "files" in message and f"at least {WINDOW} records share" in message


def test_a_hard_delete_mid_read_ends_in_bounded_time(start_simulator, crm_env, warehouse, monkeypatch):
    """The read that once looped forever: a record deleted while a resource is being read."""
    _small_pages(monkeypatch)
    simulator = start_simulator(delete_every=2)
    crm_env(simulator)

    result = run_sync(selection=[AssetKey(["crm", "contacts"])])

    assert result.success, failure_message(result)
    requests = simulator.stats()["requests"]["contacts"]
    assert requests <= 3 * (SMALL_COUNTS["contacts"] // (PAGE_SIZE - 1) + 1) + SPARE_REQUESTS
