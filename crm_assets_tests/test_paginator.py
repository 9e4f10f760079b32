"""`KeysetPaginator` between dlt and the read: the parameters it sends, and configuration it refuses.

Pure and fast: no server. The read itself is tested in test_keyset_read.py.
"""

from __future__ import annotations

import json

import pytest
import requests

from crm_assets.sources.crm import CrmConfigurationError, crm
from crm_assets.sources.crm.keyset import PageRequest
from crm_assets.sources.crm.paginator import UPDATED_SINCE_PARAM, KeysetPaginator, page_params


class _Answer:
    def __init__(self, count: int) -> None:
        self._payload = {"count": count}

    def json(self):
        return self._payload


def _first_request(paginator: KeysetPaginator, params=None) -> requests.Request:
    request = requests.Request("GET", "http://x/v1/jobs", params=dict(params or {}))
    paginator.init_request(request)
    return request


def test_the_first_request_sorts_explicitly_and_filters_nothing():
    request = _first_request(KeysetPaginator("jobs", page_size=1000))
    # the real API family sorts descending by default: the order is always sent
    assert request.params == {"sort_field": "date_updated", "sort_direction": "asc", "from": 0, "size": 1000}


def test_the_incremental_cursor_becomes_an_inclusive_filter_and_never_reaches_the_api():
    request = _first_request(KeysetPaginator("jobs", page_size=500), {UPDATED_SINCE_PARAM: 1_700_000_000})
    assert UPDATED_SINCE_PARAM not in request.params
    assert json.loads(request.params["filter"]) == {"must": [{"range": {"date_updated": {"gte": 1_700_000_000}}}]}


def test_each_page_starts_at_the_head_of_what_is_left():
    paginator = KeysetPaginator("jobs", page_size=3)
    request = _first_request(paginator)
    page = [{"id": f"j{i}", "date_updated": 100 + i} for i in range(3)]
    paginator.update_state(_Answer(10), page)
    paginator.update_request(request)
    assert paginator.has_next_page
    assert request.params["from"] == 0
    assert json.loads(request.params["filter"]) == {"must": [{"range": {"date_updated": {"gte": 102}}}]}

    paginator.update_state(_Answer(1), [page[-1]])  # all that is left: the read is complete
    assert not paginator.has_next_page


def test_a_second_read_on_its_own_holds_date_updated_and_sorts_on_date_created():
    params = page_params(PageRequest("date_created", 5, None, 0, 100, within=("date_updated", 9)))
    assert params["sort_field"] == "date_created"
    assert json.loads(params["filter"])["must"] == [
        {"range": {"date_updated": {"gte": 9}}},
        {"range": {"date_updated": {"lte": 9}}},
        {"range": {"date_created": {"gte": 5}}},
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
    ],
)
def test_bad_configuration_is_refused_before_any_request(kwargs, message):
    with pytest.raises(CrmConfigurationError, match=message):
        crm(**kwargs)
