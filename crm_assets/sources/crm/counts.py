"""Cheap questions to the API: how many records match, without reading them (`size=0`)."""

from __future__ import annotations

from typing import Optional, Union

from .catalog import Endpoint, configured_endpoints
from .config import connection_settings
from .errors import CrmIncompleteReadError
from .http import CrmSession
from .paginator import between, encode_filter, range_clause
from .settings import CREATED_FIELD, CURSOR_FIELD

# The most `size=0` requests an exact count of a listing beyond the result window may take: about
# two a halving of its `date_created` span, enough for several hundred thousand records.
MAX_COUNT_REQUESTS = 64


def count_records(
    resource: Union[str, Endpoint],
    *,
    updated_after: Optional[int] = None,
    updated_before: Optional[int] = None,
    base_url: Optional[str] = None,
    api_key: Optional[str] = None,
    session: Optional[CrmSession] = None,
) -> int:
    """The API's `count` for a resource, optionally only records with `date_updated > updated_after`
    and `date_updated < updated_before`.

    The resource and connection settings default to the source's configuration; the session
    applies the same retry policy and error messages as a sync.
    """
    endpoint = resource if isinstance(resource, Endpoint) else _configured(resource)
    if base_url is None or api_key is None:
        base_url, api_key = connection_settings()
    # at `from=<result window>`, as every count (paginator.page_params says why)
    params: dict[str, object] = {"size": 0, "from": endpoint.result_window}
    clauses = [range_clause(CURSOR_FIELD, op, int(value))
               for op, value in (("gt", updated_after), ("lt", updated_before)) if value is not None]
    if clauses:
        params["filter"] = encode_filter(clauses)
    own_session = session is None
    session = session or CrmSession(endpoints=[endpoint])
    try:
        response = session.get(
            base_url.rstrip("/") + endpoint.path,
            params=params,
            headers={"Authorization": f"Bearer {api_key}"},
        )
        return int(response.json()["count"])
    finally:
        if own_session:
            session.close()


def count_every_record(
    resource: Union[str, Endpoint],
    *,
    base_url: Optional[str] = None,
    api_key: Optional[str] = None,
) -> int:
    """How many records a resource holds, beyond the result window too.

    A `count` at the window may be only a lower bound (the API stops counting there), so such a
    listing is counted again in `date_created` ranges between its first and last record's, each
    halved until it counts below the window, and the parts are summed. Like any count of a listing
    in use, it is exact only while the listing holds still."""
    endpoint = resource if isinstance(resource, Endpoint) else _configured(resource)
    if base_url is None or api_key is None:
        base_url, api_key = connection_settings()
    url = base_url.rstrip("/") + endpoint.path
    headers = {"Authorization": f"Bearer {api_key}"}
    session = CrmSession(endpoints=[endpoint])

    window = endpoint.result_window

    def answer(params: dict[str, object]) -> dict:
        if params.get("size") == 0:  # at `from=<result window>`, as every count (paginator.page_params)
            params = {**params, "from": window}
        return session.get(url, params=params, headers=headers).json()

    try:
        total = int(answer({"size": 0})["count"])
        if total < window:
            return total
        # the span to halve: the first and the last record's date_created
        span = []
        for direction in ("asc", "desc"):
            records = answer({"size": 1, "sort_field": CREATED_FIELD, "sort_direction": direction})
            span.append((records.get(endpoint.data_selector) or [{}])[0].get(CREATED_FIELD))
        requests, counted, pending = 3, 0, [tuple(span)]
        while pending:
            low, high = pending.pop()
            if type(low) is not int or type(high) is not int or low > high or requests >= MAX_COUNT_REQUESTS:
                raise CrmIncompleteReadError(
                    f"{endpoint.name}: the API counts {total} records, as many as its result window, "
                    f"and {requests} requests could not count them in {CREATED_FIELD} ranges"
                )
            part = int(answer({"size": 0, "filter": encode_filter(between(CREATED_FIELD, low, high))})["count"])
            requests += 1
            if part < window:
                counted += part
            elif low >= high:
                raise CrmIncompleteReadError(
                    f"{endpoint.name}: {part} records or more share {CREATED_FIELD}={low}, too many "
                    f"for the API's result window to count"
                )
            else:
                middle = (low + high) // 2
                pending += [(low, middle), (middle + 1, high)]
        return counted
    finally:
        session.close()


def _configured(name: str) -> Endpoint:
    for endpoint in configured_endpoints():
        if endpoint.name == name:
            return endpoint
    raise KeyError(f"no resource {name!r} is configured")
