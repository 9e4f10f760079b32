"""Cheap questions to the API: how many records match, without reading them (`size=0`)."""

from __future__ import annotations

from typing import Optional, Union

from .catalog import Endpoint, configured_endpoints
from .config import connection_settings
from .http import CrmSession
from .paginator import encode_filter, range_clause
from .settings import CURSOR_FIELD


def count_records(
    resource: Union[str, Endpoint],
    *,
    updated_after: Optional[int] = None,
    base_url: Optional[str] = None,
    api_key: Optional[str] = None,
    session: Optional[CrmSession] = None,
) -> int:
    """The API's `count` for a resource, optionally only records with `date_updated > updated_after`.

    The resource and connection settings default to the source's configuration; the session
    applies the same retry policy and error messages as a sync.
    """
    endpoint = resource if isinstance(resource, Endpoint) else _configured(resource)
    if base_url is None or api_key is None:
        base_url, api_key = connection_settings()
    params: dict[str, object] = {"size": 0}
    if updated_after is not None:
        params["filter"] = encode_filter([range_clause(CURSOR_FIELD, "gt", int(updated_after))])
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


def _configured(name: str) -> Endpoint:
    for endpoint in configured_endpoints():
        if endpoint.name == name:
            return endpoint
    raise KeyError(f"no resource {name!r} is configured")
