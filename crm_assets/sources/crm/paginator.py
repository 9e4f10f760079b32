"""`KeysetPaginator`: dlt's REST API source driving a resource's `ReadPlan` over HTTP.

It turns each step of the plan (reach.py: a probe for records without a cursor, their ranges, then
the keyset read of keyset.py) into the API's parameters (`filter`, `from`, `size`, an explicit
ascending sort) and hands each answer back. dlt's incremental passes its cursor in through
`UPDATED_SINCE_PARAM`; it becomes the keyset read's lower bound. An answer that is not what was
asked for (order, filter, field types) fails the read, naming the URL path.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional
from urllib.parse import urlsplit

import requests
from dlt.sources.helpers.rest_client.paginators import BasePaginator

from .catalog import DEFAULT_PRIMARY_KEY
from .errors import CrmApiBehaviourError
from .keyset import KeysetRead, PageRequest
from .reach import ReadPlan
from .settings import CREATED_FIELD, CURSOR_FIELD, RESULT_WINDOW

logger = logging.getLogger("crm_assets.sources.crm")

# Request parameter through which dlt's incremental hands its cursor to the paginator, which
# folds it into the `filter` JSON. It never reaches the API.
UPDATED_SINCE_PARAM = "crm_updated_since"
PROGRESS_EVERY = 20  # pages between two progress lines in the log


def range_clause(field: str, op: str, value: int) -> dict[str, Any]:
    return {"range": {field: {op: value}}}


def encode_filter(clauses: list[dict[str, Any]]) -> str:
    """The API's filter parameter. Built here, after dlt's `str.format` placeholder expansion,
    so its braces are never mistaken for placeholders."""
    return json.dumps({"must": clauses}, separators=(",", ":"))


def page_params(page: PageRequest) -> dict[str, Any]:
    """The query parameters of one page of a keyset read."""
    clauses = []
    if page.within is not None:
        field, value = page.within
        clauses += [range_clause(field, "gte", value), range_clause(field, "lte", value)]
    if page.floor is not None:
        clauses.append(range_clause(page.floor[0], "gte", page.floor[1]))
    if page.lowest is not None:
        clauses.append(range_clause(page.field, "gte", page.lowest))
    if page.highest is not None:
        clauses.append(range_clause(page.field, "lte", page.highest))
    params: dict[str, Any] = {"sort_field": page.field, "sort_direction": "desc" if page.descending else "asc"}
    if clauses:
        params["filter"] = encode_filter(clauses)
    params["from"] = page.offset
    params["size"] = page.size
    return params


class KeysetPaginator(BasePaginator):
    """Reads a resource (reach.py, keyset.py) and stops only on proof of a complete read."""

    def __init__(
        self,
        resource: str,
        page_size: int,
        result_window: int = RESULT_WINDOW,
        key_field: str = DEFAULT_PRIMARY_KEY,
    ) -> None:
        super().__init__()
        self.resource = resource
        self.page_size = page_size
        self.key_field = key_field
        self.result_window = result_window
        # refuses a bad page size now, not at the first request
        KeysetRead(resource, page_size, result_window=result_window)
        # made per read in init_request: it holds a generator, which cannot be copied or pickled
        self.plan: Optional[ReadPlan] = None

    def init_request(self, request: requests.Request) -> None:
        params = request.params if isinstance(request.params, dict) else {}
        since = params.pop(UPDATED_SINCE_PARAM, None)
        # inclusive: a record edited in the cursor's own second is read again, not missed
        self.plan = ReadPlan(
            self.resource, self.page_size, since=None if since is None else int(since), now=int(time.time()),
            result_window=self.result_window, cursor_field=CURSOR_FIELD, created_field=CREATED_FIELD,
            key_field=self.key_field,
        )
        self._has_next_page = True
        request.params = params
        self.update_request(request)

    def update_request(self, request: requests.Request) -> None:
        if self.plan is None or self.plan.done:
            return
        request.params.pop("filter", None)
        request.params.update(page_params(self.plan.request()))

    def update_state(self, response: requests.Response, data: Optional[list[Any]] = None) -> None:
        plan = self.plan
        assert plan is not None, "init_request comes first"
        try:
            plan.take(data or [], response.json()["count"])
        except CrmApiBehaviourError as error:
            raise error.at(urlsplit(response.url or "").path) from None
        if plan.done:
            self._has_next_page = False
            logger.info(
                "%s: read complete: %d records in %d requests", self.resource, plan.records_read, plan.requests
            )
        elif plan.requests % PROGRESS_EVERY == 0:
            logger.info(
                "%s: %d records read in %d requests, now at %s",
                self.resource, plan.records_read, plan.requests, plan.describe(),
            )

    def __str__(self) -> str:
        return f"KeysetPaginator({self.resource}, {self.plan.describe() if self.plan else 'not started'})"
