"""Property-based: whatever a server sends, the session either hands dlt a well-formed page or
fails with an error that names the resource and the URL path. Nothing else gets through."""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_assets.sources.crm.http import CrmApiError, CrmSession
from crm_assets.sources.crm import BUILT_IN

ENDPOINT = {endpoint.name: endpoint for endpoint in BUILT_IN}["activities"]  # records under "activity"
PATH = "/v1/activities"

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
records = st.lists(
    st.one_of(
        st.fixed_dictionaries({"id": st.text(max_size=10)}, optional={"name": scalars}),
        st.fixed_dictionaries({"id": json_values}),
        json_values,
    ),
    max_size=5,
)
pages = st.fixed_dictionaries(
    {},
    optional={"count": st.integers(min_value=-3, max_value=10**6) | json_values,
              ENDPOINT.data_selector: records | json_values,
              "results": records},
)
bodies = st.one_of(
    pages.map(lambda page: json.dumps(page).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    pages.map(lambda page: json.dumps(page).encode()[: max(1, len(json.dumps(page)) // 2)]),
    st.binary(max_size=64),
    st.just(b"<html><body>502 Bad Gateway</body></html>"),
)


def _response(status: int, body: bytes) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.url = f"http://crm.test{PATH}?from=0&size=100"
    response.headers["Content-Type"] = "application/json"
    return response


@settings(max_examples=400, deadline=None)
@given(status=st.sampled_from([200, 200, 200, 400, 401, 403, 404, 409, 422, 500, 503]), body=bodies)
def test_every_answer_is_a_valid_page_or_an_error_naming_resource_and_path(status, body):
    session = CrmSession()
    try:
        checked = session._checked(_response(status, body), ENDPOINT, "activities", PATH, 0)
    except CrmApiError as error:
        assert str(error).startswith("activities: GET /v1/activities")
        assert error.resource == "activities" and error.path == PATH
        return
    assert status == 200
    page = checked.json()
    assert isinstance(page["count"], int) and page["count"] >= 0
    assert isinstance(page[ENDPOINT.data_selector], list)
    for record in page[ENDPOINT.data_selector]:
        assert isinstance(record, dict) and isinstance(record["id"], str) and record["id"]


def test_an_empty_answer_may_send_null_or_no_list_but_only_with_a_count_of_0():
    session = CrmSession()

    def checked(body: dict) -> dict:
        return session._checked(_response(200, json.dumps(body).encode()), ENDPOINT, "activities", PATH, 0).json()

    # APIs that serialize an empty list as null, or leave it out: nothing can hide behind a count of 0
    assert checked({"count": 0, "activity": None}) == {"count": 0, "activity": []}
    assert checked({"count": 0}) == {"count": 0, "activity": []}
    for body in ({"count": 2, "activity": None}, {"count": 2}, {"count": "0"}, {"count": False}):
        with pytest.raises(CrmApiError, match="activities: GET /v1/activities answered 200 without a 'activity' list"):
            checked(body)
