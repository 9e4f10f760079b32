"""The paginator's rules on hand-made pages, for cases no well-behaved server produces."""

from __future__ import annotations

import json

import pytest
import requests

from crm_assets.sources.crm import CrmConfigurationError, CrmIncompleteReadError, crm
from crm_assets.sources.crm.http import UPDATED_SINCE_PARAM, WindowedOffsetPaginator


class _Page:
    def __init__(self, count: int) -> None:
        self._payload = {"count": count}

    def json(self):
        return self._payload


def _records(start: int, n: int, date_created=lambda i: 1_600_000_000 + i):
    return [{"id": f"r{i:06d}", "date_created": date_created(i)} for i in range(start, start + n)]


def _first_request(paginator: WindowedOffsetPaginator, params=None) -> requests.Request:
    request = requests.Request("GET", "http://x/v1/jobs", params=dict(params or {}))
    paginator.init_request(request)
    return request


def test_offset_advances_by_records_received_not_by_the_size_asked():
    paginator = WindowedOffsetPaginator("jobs", page_size=1000)
    request = _first_request(paginator)
    assert request.params["from"] == 0 and request.params["size"] == 1000
    assert request.params["sort_field"] == "date_created"

    paginator.update_state(_Page(2500), _records(0, 250))
    paginator.update_request(request)
    assert request.params["from"] == 250
    assert paginator.has_next_page


def test_stops_when_count_is_reached():
    paginator = WindowedOffsetPaginator("jobs", page_size=100)
    _first_request(paginator)
    paginator.update_state(_Page(100), _records(0, 100))
    assert not paginator.has_next_page


def test_an_empty_page_before_count_is_reached_is_an_error_not_a_silent_end():
    paginator = WindowedOffsetPaginator("jobs", page_size=100)
    _first_request(paginator)
    paginator.update_state(_Page(300), _records(0, 100))
    with pytest.raises(CrmIncompleteReadError, match="jobs: the API returned an empty page"):
        paginator.update_state(_Page(300), [])


def test_the_last_page_of_a_window_is_shrunk_to_fit_and_the_next_window_starts_at_its_last_date():
    paginator = WindowedOffsetPaginator("tasks", page_size=1000, result_window=2500)
    request = _first_request(paginator)
    paginator.update_state(_Page(6000), _records(0, 1000))
    paginator.update_state(_Page(6000), _records(1000, 1000))
    paginator.update_request(request)
    assert request.params["from"] == 2000 and request.params["size"] == 500  # from + size <= window

    last_page = _records(2000, 500)
    paginator.update_state(_Page(6000), last_page)
    paginator.update_request(request)
    assert request.params["from"] == 0
    clause = json.loads(request.params["filter"])["must"]
    assert clause == [{"range": {"date_created": {"gte": last_page[-1]["date_created"]}}}]


def test_the_incremental_cursor_becomes_an_inclusive_date_updated_filter_with_intact_braces():
    paginator = WindowedOffsetPaginator("jobs", page_size=10)
    request = _first_request(paginator, {UPDATED_SINCE_PARAM: 1_700_000_000})
    assert UPDATED_SINCE_PARAM not in request.params
    assert json.loads(request.params["filter"]) == {
        "must": [{"range": {"date_updated": {"gte": 1_700_000_000}}}]
    }


def test_a_window_that_cannot_move_forward_fails_loudly():
    paginator = WindowedOffsetPaginator("files", page_size=100, result_window=200)
    _first_request(paginator)
    same_second = lambda i: 1_650_000_000  # noqa: E731 - every record created in one second
    paginator.update_state(_Page(1000), _records(0, 100, same_second))
    paginator.update_state(_Page(1000), _records(100, 100, same_second))  # opens window 2
    paginator.update_state(_Page(900), _records(0, 100, same_second))
    with pytest.raises(CrmIncompleteReadError, match="more than 200 records share date_created"):
        paginator.update_state(_Page(900), _records(100, 100, same_second))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_url": None, "api_key": "k"}, "SOURCES__CRM__BASE_URL"),
        ({"base_url": "api.example.com", "api_key": "k"}, r"an http\(s\) URL"),
        ({"base_url": "http://127.0.0.1:1", "api_key": None}, "SOURCES__CRM__API_KEY"),
        ({"base_url": "http://127.0.0.1:1", "api_key": "k", "page_sizes": {"tasks": -5}}, "from 1 to 1000"),
        ({"base_url": "http://127.0.0.1:1", "api_key": "k", "page_sizes": {"tasks": 5000}}, "from 1 to 1000"),
        ({"base_url": "http://127.0.0.1:1", "api_key": "k", "page_sizes": {"task": 5}}, "unknown resource"),
    ],
)
def test_bad_configuration_is_refused_before_any_request(kwargs, message):
    with pytest.raises(CrmConfigurationError, match=message):
        crm(**kwargs)


def test_a_page_fetched_ahead_before_the_listing_grew_is_read_again_not_trusted():
    paginator = WindowedOffsetPaginator("jobs", page_size=100)
    request = _first_request(paginator)
    paginator.update_state(_Page(501), _records(0, 100))  # the listing grew to 501 meanwhile

    stale = _Page(500)  # fetched ahead earlier, when the count was still 500
    stale.crm_prefetched = True
    paginator.update_state(stale, _records(100, 100))
    paginator.update_request(request)

    assert request.params["from"] == 100 and paginator.refetched == 1
    paginator.update_state(_Page(501), _records(99, 100))  # the fresh read
    paginator.update_request(request)
    assert request.params["from"] == 200
