"""`KeysetPaginator` between dlt and the read: the parameters it sends, and configuration it refuses.

Pure and fast: no server. The read itself is tested in test_keyset_read.py.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import requests
from dlt.sources.helpers.rest_client.client import PageData

from crm_assets.sources.crm import CrmApiBehaviourError, CrmConfigurationError, crm
from crm_assets.sources.crm.dated_ahead import CapDatesAhead, RestoreDates
from crm_assets.sources.crm.keyset import HOT_SECONDS, PageRequest
from crm_assets.sources.crm.paginator import UPDATED_SINCE_PARAM, KeysetPaginator, page_params
from crm_assets.sources.crm.slices import SlicedRead, _Done


class _Answer:
    def __init__(self, count: int) -> None:
        self._payload = {"count": count}
        self.url = "http://x/v1/jobs"

    def json(self):
        return self._payload


def _first_request(paginator: KeysetPaginator, params=None) -> requests.Request:
    request = requests.Request("GET", "http://x/v1/jobs", params=dict(params or {}))
    paginator.init_request(request)
    return request


def _past_the_probe(paginator: KeysetPaginator, request: requests.Request, count: int) -> None:
    """Answer the probe's two counts alike: every record has a cursor value."""
    for _ in range(2):
        paginator.update_state(_Answer(count), [])
        paginator.update_request(request)


def test_the_first_requests_count_the_records_with_a_cursor_then_every_record():
    paginator = KeysetPaginator("jobs", page_size=1000)
    request = _first_request(paginator)
    # the real API family sorts descending by default: the order is always sent
    assert request.params["size"] == 0 and request.params["sort_field"] == "date_updated"
    assert request.params["sort_direction"] == "asc"
    assert json.loads(request.params["filter"]) == {"must": [{"range": {"date_updated": {"gt": -1}}}]}
    paginator.update_state(_Answer(7), [])
    paginator.update_request(request)
    # a count is asked at the result window: an API whose window is smaller answers 400
    assert request.params == {"sort_field": "date_created", "sort_direction": "asc", "from": 10_000, "size": 0}
    paginator.update_state(_Answer(7), [])
    paginator.update_request(request)
    # the counts agree: the keyset read, over every record with a cursor value
    assert request.params == {
        "sort_field": "date_updated", "sort_direction": "asc", "from": 0, "size": 1000,
        "filter": json.dumps({"must": [{"range": {"date_updated": {"gt": -1}}}]}, separators=(",", ":")),
    }


def test_the_incremental_cursor_becomes_an_inclusive_filter_and_never_reaches_the_api():
    paginator = KeysetPaginator("jobs", page_size=500)
    request = _first_request(paginator, {UPDATED_SINCE_PARAM: 1_700_000_000})
    assert UPDATED_SINCE_PARAM not in request.params
    _past_the_probe(paginator, request, 3)
    assert json.loads(request.params["filter"]) == {"must": [{"range": {"date_updated": {"gt": 1_699_999_999}}}]}


def test_a_record_dated_after_now_is_named_in_a_warning(caplog):
    """A date hours ahead (a device's clock, an import in another time zone) is the API's data
    gone wrong: worth a look, though the cursor does not follow it (dated_ahead.py)."""
    paginator = KeysetPaginator("jobs", page_size=3)
    request = _first_request(paginator)
    _past_the_probe(paginator, request, 2)
    ahead = paginator.plan.now + 7 * 3600
    with caplog.at_level("WARNING", logger="crm_assets.sources.crm"):
        paginator.update_state(_Answer(2), [{"id": "j1", "date_updated": 100}, {"id": "j2", "date_updated": ahead}])
    assert not paginator.has_next_page
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("jobs: a record has date_updated ") and "after now" in warning
    assert "does not follow it" in warning

    # milliseconds (outside the contract) are named as such; a date past the calendar stays a number
    for newest, shown in ((paginator.plan.now * 1000 - 86_400_000, "(milliseconds?"), (1 << 62, str(1 << 62))):
        caplog.clear()
        paginator = KeysetPaginator("jobs", page_size=3)
        request = _first_request(paginator)
        _past_the_probe(paginator, request, 1)
        with caplog.at_level("WARNING", logger="crm_assets.sources.crm"):
            paginator.update_state(_Answer(1), [{"id": "j1", "date_updated": newest}])
        (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert shown in warning

    caplog.clear()
    paginator = KeysetPaginator("jobs", page_size=3)
    request = _first_request(paginator)
    _past_the_probe(paginator, request, 2)
    with caplog.at_level("WARNING", logger="crm_assets.sources.crm"):
        paginator.update_state(_Answer(2), [{"id": "j1", "date_updated": 100}, {"id": "j2", "date_updated": 200}])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_cursor_after_now_from_an_earlier_version_asks_for_a_full_refresh(caplog):
    """Earlier versions let a record dated ahead carry the cursor; the incremental drops every
    record older than that cursor, so only a full refresh reads what it hides."""
    with caplog.at_level("WARNING", logger="crm_assets.sources.crm"):
        paginator = KeysetPaginator("jobs", page_size=3)
        _first_request(paginator, {UPDATED_SINCE_PARAM: int(time.time()) + 3600})
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("jobs: the cursor is at ") and "full_refresh: true" in warning

    caplog.clear()
    with caplog.at_level("WARNING", logger="crm_assets.sources.crm"):
        _first_request(KeysetPaginator("jobs", page_size=3), {UPDATED_SINCE_PARAM: int(time.time()) - 60})
    assert not caplog.records


def test_around_the_incremental_a_date_after_now_reads_as_the_syncs_start_then_lands_as_it_was():
    """dlt's incremental keeps the largest date it is shown: a date ahead is shown as the read's
    start less the clocks' margin (or the cursor read from, if later: the filter drops anything
    below it), and put back after."""
    for since in (1_700_000_000, None, int(time.time()) - 10):
        paginator = KeysetPaginator("jobs", page_size=3)
        request = _first_request(paginator, {} if since is None else {UPDATED_SINCE_PARAM: since})
        now = paginator.plan.now
        records = [
            {"id": "j1", "date_updated": now - 50},
            {"id": "j2", "date_updated": now + 7 * 3600},
            {"id": "j3", "date_updated": now + HOT_SECONDS},  # within the margin: as it is
            {"id": "j4", "date_updated": None},
            {"id": "j5"},
        ]
        original = [dict(r) for r in records]
        page = PageData(records, request, None, paginator, None)
        shown = CapDatesAhead()(page)
        assert [r.get("date_updated") for r in shown] == [
            now - 50, max(now - HOT_SECONDS, since or 0), now + HOT_SECONDS, None, None
        ]
        assert RestoreDates()(list(shown)) == original
    # not a page of a read (no plan yet): nothing to cap against
    assert CapDatesAhead()([{"id": "j1", "date_updated": 1 << 40}]) == [{"id": "j1", "date_updated": 1 << 40}]


def test_each_page_starts_at_the_head_of_what_is_left():
    paginator = KeysetPaginator("jobs", page_size=3)
    request = _first_request(paginator)
    _past_the_probe(paginator, request, 4)
    page = [{"id": f"j{i}", "date_updated": 100 + i} for i in range(4)]
    paginator.update_state(_Answer(4), page[:3])
    paginator.update_request(request)
    assert paginator.has_next_page
    assert request.params["from"] == 0
    assert json.loads(request.params["filter"]) == {"must": [{"range": {"date_updated": {"gt": 101}}}]}

    paginator.update_state(_Answer(2), page[2:])  # all that is left: the read is complete
    assert not paginator.has_next_page


def test_an_answer_out_of_order_fails_naming_the_resource_the_behaviour_and_the_path():
    paginator = KeysetPaginator("jobs", page_size=3)
    request = _first_request(paginator)
    _past_the_probe(paginator, request, 10)
    page = [{"id": "j1", "date_updated": 105}, {"id": "j2", "date_updated": 101}]
    with pytest.raises(CrmApiBehaviourError) as failure:
        paginator.update_state(_Answer(10), page)
    message = str(failure.value)
    assert message.startswith("jobs: the API did not sort on date_updated as asked: GET /v1/jobs (")
    assert "id='j2' (date_updated=101) after id='j1' (date_updated=105)" in message


class _Page(_Answer):
    def __init__(self, records: list) -> None:
        super().__init__(len(records))
        self._payload["results"] = records


class _Session:
    """Takes what the paginator hands over for dlt's next request."""

    max_in_flight = 8

    def __init__(self) -> None:
        self.handed: list = []

    def hand_over(self, url, response) -> None:
        self.handed.append((url, response))


def test_pages_the_slices_have_fetched_reach_dlt_as_one_page_waiting_for_none():
    read = SlicedRead(lambda: None, None, None, None, None, SimpleNamespace(requests=1), None)
    read.slices = SimpleNamespace(reads=[None, None], requests=3, records_read=6, newest_second=None)
    read._room = [threading.Semaphore(0), threading.Semaphore(0)]
    read.running = 2
    pages = [({"from": 0, "page": n}, f"http://x/v1/jobs?page={n}", _Page([{"id": f"j{n}{k}"} for k in range(2)]))
             for n in range(3)]
    for index, page in zip((0, 1, 0), pages):
        read.pages.put((index, page))
    paginator = KeysetPaginator("jobs", page_size=3)
    paginator.session, paginator.sliced = _Session(), read
    request = requests.Request("GET", "http://x/v1/jobs", params={})

    paginator.update_state(None, [])  # the three pages waiting, not a fourth one
    paginator.update_request(request)
    assert request.params == {"from": 0, "page": 0}  # the first page's request: its answer waits there
    [(url, answer)] = paginator.session.handed
    assert url == pages[0][1]
    assert [r["id"] for r in answer.json()["results"]] == ["j00", "j01", "j10", "j11", "j20", "j21"]
    # each slice may fetch again: one page ahead for slice 2, two for slice 1 (both its pages taken)
    assert read._room[1].acquire(blocking=False) and not read._room[1].acquire(blocking=False)
    assert read._room[0].acquire(blocking=False) and read._room[0].acquire(blocking=False)

    read.pages.put(_Done(0))
    read.pages.put(_Done(1))
    paginator.update_state(None, [])
    assert not paginator.has_next_page


def test_a_second_read_on_its_own_holds_date_updated_and_sorts_on_date_created():
    params = page_params(PageRequest("date_created", 5, None, 0, 100, within=("date_updated", 9)))
    assert params["sort_field"] == "date_created"
    assert json.loads(params["filter"])["must"] == [
        {"range": {"date_updated": {"gt": 8}}},
        {"range": {"date_updated": {"lt": 10}}},
        {"range": {"date_created": {"gt": 4}}},
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_url": None, "api_key": "k"}, "SOURCES__CRM__BASE_URL"),
        ({"base_url": "api.example.com", "api_key": "k"}, r"an http\(s\) URL"),
        ({"base_url": "http://127.0.0.1:99999", "api_key": "k"}, "invalid port: set SOURCES__CRM__BASE_URL"),
        ({"base_url": "http://api example.com", "api_key": "k"}, "no spaces.*SOURCES__CRM__BASE_URL"),
        ({"base_url": "http://127.0.0.1:1", "api_key": None}, "SOURCES__CRM__API_KEY"),
        ({"base_url": "http://127.0.0.1:1", "api_key": "k", "page_sizes": {"tasks": -5}}, "from 3 to 1000"),
        ({"base_url": "http://127.0.0.1:1", "api_key": "k", "page_sizes": {"tasks": 2}}, "from 3 to 1000"),
        ({"base_url": "http://127.0.0.1:1", "api_key": "k", "page_sizes": {"tasks": 5000}}, "from 3 to 1000"),
        ({"base_url": "http://127.0.0.1:1", "api_key": "k", "page_sizes": {"task": 5}}, "unknown resource"),
        ({"base_url": "http://127.0.0.1:1", "api_key": "k", "schema_contract": "strict"}, "SCHEMA_CONTRACT"),
        ({"base_url": "http://127.0.0.1:1", "api_key": "k", "result_window": 1}, "SOURCES__CRM__RESULT_WINDOW"),
    ],
)
def test_bad_configuration_is_refused_before_any_request(kwargs, message):
    with pytest.raises(CrmConfigurationError, match=message):
        crm(**kwargs)
