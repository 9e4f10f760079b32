"""The whole pipeline against an API that does not do what it is asked (docs/api-contract.md, "What
the read relies on"), on DuckDB and PostgreSQL: each sync lands every record exactly, or fails
saying what the API did, naming the resource and the URL path. Never a green run with records
missing.
"""

from __future__ import annotations

import re

import pytest
from dagster import AssetKey

from .conftest import RESOURCES, SMALL_COUNTS, failure_message, run_sync
from .warehouses import assert_exact, table_ids


@pytest.mark.parametrize("ignored_by", [["contacts"], ["*"]], ids=["one_resource", "every_resource"])
def test_an_api_that_ignores_the_requested_order_fails_the_run_naming_it(
    start_simulator, crm_env, any_warehouse, ignored_by
):
    # it serves its own order, date_created ascending, whatever the request asks
    simulator = start_simulator(ignore_sort=ignored_by)
    crm_env(simulator)

    result = run_sync(raise_on_error=False)

    assert not result.success
    named = re.search(
        r"(\w+): the API did not sort on date_updated as asked: GET /v1/(\w+) \(.*\) returned "
        r"id='\w+' \(date_updated=\d+\) after id='\w+' \(date_updated=\d+\)",
        failure_message(result),
    )
    assert named is not None and named.group(1) == named.group(2)
    assert named.group(1) == "contacts" if ignored_by == ["contacts"] else named.group(1) in RESOURCES


def test_an_api_that_ignores_the_sort_after_edits_fails_rather_than_landing_part(
    start_simulator, crm_env, any_warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync().success
    for resource in RESOURCES:
        simulator.mutate(resource, edit=30)
    simulator.configure(ignore_sort=["*"])

    result = run_sync(raise_on_error=False)

    assert not result.success
    assert "the API did not sort on date_updated as asked" in failure_message(result)


def test_an_api_that_ignores_the_filter_fails_saying_so(start_simulator, crm_env, any_warehouse):
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync(selection=[AssetKey(["crm", "jobs"])]).success
    simulator.mutate("jobs", edit=5)
    simulator.configure(ignore_filter=["jobs"])

    result = run_sync(selection=[AssetKey(["crm", "jobs"])], raise_on_error=False)

    assert not result.success
    message = failure_message(result)
    assert "jobs: the API did not apply the requested filter: GET /v1/jobs (date_updated >= " in message
    assert "with date_updated=" in message
    assert "kept changing" not in message  # the read says what the API did, not a guess


def test_an_api_that_ignores_from_fails_rather_than_landing_part_of_a_busy_second(
    start_simulator, crm_env, warehouse
):
    # an import of 120 files in one second of both dates, 50 a page: that second is walked by offset
    simulator = start_simulator(page_cap=50)
    crm_env(simulator)
    files = [AssetKey(["crm", "files"])]
    assert run_sync(selection=files).success
    before = sorted(table_ids(warehouse, "files"))
    simulator.mutate("files", insert=120)
    simulator.configure(ignore_from=["files"])

    result = run_sync(selection=files, raise_on_error=False)

    assert not result.success
    assert re.search(
        r"files: the API served more records than its count leaves from the offset asked: GET /v1/files "
        r"\(date_updated = \d+ and date_created = \d+, .*from=(\d+)\) returned \d+ records with count=\d+, "
        r"where from=\1 leaves \d+ \(and a record served again at its head\) \(an API that ignores 'from'",
        failure_message(result),
    )
    assert sorted(table_ids(warehouse, "files")) == before  # none of the import landed


def test_an_api_whose_count_is_the_pages_own_length_fails_rather_than_landing_its_first_page(
    start_simulator, crm_env, warehouse
):
    """`count` as the number of records in the answer (0 when asked for none): every read would end
    on its first page, green, with 50 jobs of 240. Looking beyond that page shows more; read once
    more, the range ends as short again, and the run fails saying what the API did."""
    simulator = start_simulator(page_cap=50, page_count=["jobs"])
    crm_env(simulator)

    result = run_sync(selection=[AssetKey(["crm", "jobs"])], raise_on_error=False)

    assert not result.success
    assert re.search(
        r"jobs: the API counts fewer records than it lists: GET /v1/jobs \(date_updated >= \d+ and "
        r"date_updated <= \d+, .*\) returned id='job\w+' \(date_updated=\d+\) with count=\d+, past "
        r"id='job\w+', where its counts had ended the read, and again",
        failure_message(result),
    )


def test_an_api_with_a_smaller_result_window_fails_naming_the_setting_and_lands_exactly_with_it(
    start_simulator, crm_env, warehouse, monkeypatch
):
    """A search index set to a 2,000-record window, whose counts stop there too: they look exact
    below the documented 10,000, so the probe took 2,000 with a cursor and 2,000 in all for
    "every record has one", and the five jobs without a `date_updated` went unread in a green run.
    Each count is asked at `from=10000`, which such an API refuses, naming the setting; set, the
    sync lands every record, and stays exact."""
    simulator = start_simulator(dict(SMALL_COUNTS, jobs=3000), result_window=2000, count_capped=True)
    crm_env(simulator)
    changed = simulator.mutate("jobs", null_cursor=3, missing_cursor=2)
    assert len(changed["null_cursor"] + changed["missing_cursor"]) == 5

    result = run_sync(selection=[AssetKey(["crm", "jobs"])], raise_on_error=False)

    assert not result.success
    assert re.search(
        r"jobs: GET /v1/jobs failed: HTTP 400 at from \+ size = 10000: if the API's result window is "
        r"smaller, set SOURCES__CRM__RESULT_WINDOW to it - API says: result window is too large",
        failure_message(result),
    )

    monkeypatch.setenv("SOURCES__CRM__RESULT_WINDOW", "2000")
    result = run_sync()
    assert result.success, failure_message(result)
    assert_exact(warehouse, simulator)
    simulator.mutate("jobs", edit=30, null_cursor=1)
    assert run_sync().success
    assert_exact(warehouse, simulator)


def test_an_api_whose_gte_and_lte_exclude_their_own_second_loses_nothing(start_simulator, crm_env, warehouse):
    """The read asks `gt` and `lt` the second next to each bound: taken for `gt` and `lt`, `gte` and
    `lte` would leave out the rest of the second a page ended in, and a bulk second (asked as
    `gte T` and `lte T`) whole, in a green run."""
    simulator = start_simulator(page_cap=50, exclusive_bounds=["*"])
    crm_env(simulator)
    assert run_sync().success
    simulator.mutate("files", insert=120)  # one second of both dates, over two pages
    simulator.mutate("contacts", edit=80)  # one second of date_updated

    result = run_sync()

    assert result.success, failure_message(result)
    assert_exact(warehouse, simulator)


@pytest.mark.parametrize("arrow_pages", [True, False], ids=["arrow", "dlt_normalizer"])
def test_records_without_a_cursor_value_land_and_stay_exact(
    start_simulator, crm_env, any_warehouse, monkeypatch, arrow_pages
):
    monkeypatch.setenv("SOURCES__CRM__ARROW_PAGES", str(arrow_pages).lower())
    simulator = start_simulator()
    crm_env(simulator)
    without = {}
    for resource in ("jobs", "tasks"):
        changed = simulator.mutate(resource, null_cursor=3, missing_cursor=2)
        without[resource] = changed["null_cursor"] + changed["missing_cursor"]

    assert run_sync().success
    any_warehouse.assert_exact(simulator)

    # incremental: they are read again (the probe still finds them); one of them gets a cursor
    simulator.mutate("jobs", edit=4)
    simulator.mutate("tasks", null_cursor=1)
    result = run_sync()

    assert result.success, failure_message(result)
    any_warehouse.assert_exact(simulator)
    landed = any_warehouse.table_state("tasks")
    assert all(landed[key][1] is None for key in without["tasks"] if key in landed)
