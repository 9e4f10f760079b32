"""`KeysetPaginator`: dlt's REST API source driving a resource's `ReadPlan` over HTTP.

It turns each step of the plan (reach.py: a probe for records without a cursor, their ranges, then
the keyset read of keyset.py) into the API's parameters (`filter`, `from`, `size`, an explicit
ascending sort) and hands each answer back. dlt's incremental passes its cursor in through
`UPDATED_SINCE_PARAM`; it becomes the keyset read's lower bound. An answer that is not what was
asked for (order, filter, offset, field types) fails the read, naming the URL path.

Given the sync's session (`session`, set by `crm_resources`), a resource of more than a few pages
is read in parallel slices (slices.py): the plan ends after the probe with the count to slice,
the slices are planned and read on worker threads, and each next request dlt sends is set to a page
a worker has already fetched, which the session hands back (`CrmSession.hand_over`). Without a
session (or with SOURCES__CRM__MAX_IN_FLIGHT=1) every resource is read sequentially, as before.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional
from urllib.parse import urlsplit

import requests
from dlt.sources.helpers.rest_client.paginators import BasePaginator

from .catalog import DEFAULT_PRIMARY_KEY, Endpoint
from .errors import CrmApiBehaviourError
from .keyset import HOT_SECONDS, KeysetRead, PageRequest
from .reach import ReadPlan
from .slices import SlicedRead, SlicePlan, Slices
from .settings import CREATED_FIELD, CURSOR_FIELD, RESULT_WINDOW

logger = logging.getLogger("crm_assets.sources.crm")

# Request parameter through which dlt's incremental hands its cursor to the paginator, which
# folds it into the `filter` JSON. It never reaches the API.
UPDATED_SINCE_PARAM = "crm_updated_since"
PROGRESS_EVERY = 20  # pages between two progress lines in the log
# A sliced read hands dlt up to this many pages its workers have already fetched as one page: dlt
# pays a fixed cost per page it extracts (its schema computed again, an Arrow table written: about
# 2.5 ms, a quarter of a 1,000-record page's work), and the sync's steps pay theirs per page too.
# Only pages already waiting are joined, so nothing waits longer and memory stays within a few pages.
PAGES_AT_ONCE = 4


def range_clause(field: str, op: str, value: int) -> dict[str, Any]:
    return {"range": {field: {op: value}}}


def between(field: str, lowest: Optional[int], highest: Optional[int]) -> list[dict[str, Any]]:
    """`lowest <= field <= highest` (None: unbounded), sent as `gt lowest - 1` and `lt highest + 1`:
    whole seconds, the same range. An API that gets a bound's inclusiveness wrong then either serves
    a second outside the range, which every page's check shows, or nothing changes; asked `gte` and
    `lte`, one that took them for `gt` and `lt` would leave the bounds' own seconds out, unseen."""
    clauses = []
    if lowest is not None:
        clauses.append(range_clause(field, "gt", lowest - 1))
    if highest is not None:
        clauses.append(range_clause(field, "lt", highest + 1))
    return clauses


def encode_filter(clauses: list[dict[str, Any]]) -> str:
    """The API's filter parameter. Built here, after dlt's `str.format` placeholder expansion,
    so its braces are never mistaken for placeholders."""
    return json.dumps({"must": clauses}, separators=(",", ":"))


def page_params(page: PageRequest, result_window: int = RESULT_WINDOW) -> dict[str, Any]:
    """The query parameters of one page of a keyset read. A count (`size=0`) is asked at
    `from=<result window>`: `count` is exact only below the window, so each count also shows that
    the API's window is at least the one the read relies on (one smaller answers 400)."""
    clauses = []
    if page.within is not None:
        field, value = page.within
        clauses += between(field, value, value)
    if page.floor is not None:
        clauses += between(page.floor[0], page.floor[1], None)
    clauses += between(page.field, page.lowest, page.highest)
    params: dict[str, Any] = {"sort_field": page.field, "sort_direction": "desc" if page.descending else "asc"}
    if clauses:
        params["filter"] = encode_filter(clauses)
    params["from"] = page.offset if page.size else result_window
    params["size"] = page.size
    return params


def _utc(epoch: int) -> str:
    """A date for the log; one past the platform's calendar stays a number rather than fail the read."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    except (OverflowError, OSError, ValueError):
        return f"{epoch} (epoch seconds)"


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
        # the sync's CrmSession (crm_resources sets it): the slices' workers send through it
        self.session: Any = None
        self.sliced: Optional[SlicedRead] = None
        self._static: dict[str, Any] = {}  # the endpoint's own parameters, sent with every page
        self._request: Optional[requests.Request] = None
        self._path = ""
        self._ready: Optional[tuple[dict[str, Any], str, requests.Response]] = None
        self._selector = "results"  # the key of a page's records (a sliced read's)
        self._logged = 0  # requests of the sliced read at its last progress line

    @classmethod
    def of(cls, endpoint: Endpoint) -> "KeysetPaginator":
        """The paginator of a configured resource: its page size within its result window."""
        return cls(endpoint.name, endpoint.read_size, result_window=endpoint.result_window,
                   key_field=endpoint.primary_key)

    def init_request(self, request: requests.Request) -> None:
        params = request.params if isinstance(request.params, dict) else {}
        since = params.pop(UPDATED_SINCE_PARAM, None)
        self._static = dict(params)
        self._request = request  # dlt's request: the slices' workers send its URL, headers, auth, hooks
        self.sliced, self._ready = None, None
        # inclusive: a record edited in the cursor's own second is read again, not missed
        self.plan = ReadPlan(
            self.resource, self.page_size, since=None if since is None else int(since), now=int(time.time()),
            result_window=self.result_window, cursor_field=CURSOR_FIELD, created_field=CREATED_FIELD,
            key_field=self.key_field, max_slices=self.session.max_in_flight if self.session is not None else 1,
            claim_slices=self.session.gate.claim_slices if self.session is not None else None,
        )
        if since is not None and int(since) > self.plan.now + HOT_SECONDS:
            # left by a version whose cursor followed a record dated ahead: the incremental drops
            # every record older than it, so only reading from scratch gets back what it hid
            logger.warning(
                "%s: the cursor is at %s, after now (%s): edits made before then are not read "
                "until that time. Reload this asset once with a full refresh (launchpad config "
                "`full_refresh: true`)", self.resource, _utc(int(since)), _utc(self.plan.now),
            )
        self._has_next_page = True
        request.params = params
        self.update_request(request)

    def update_request(self, request: requests.Request) -> None:
        if self.sliced is not None:
            if self._ready is not None:
                params, url, response = self._ready
                self._ready = None
                # exactly the worker's parameters: dlt's prepared URL is the one its answer waits at
                request.params = dict(params)
                self.session.hand_over(url, response)
            return
        if self.plan is None or self.plan.done:
            return
        request.params.pop("filter", None)
        request.params.update(page_params(self.plan.request(), self.result_window))

    def update_state(self, response: requests.Response, data: Optional[list[Any]] = None) -> None:
        if self.sliced is not None:
            self._next_sliced()
            return
        plan = self.plan
        assert plan is not None, "init_request comes first"
        try:
            plan.take(data or [], response.json()["count"])
        except CrmApiBehaviourError as error:
            raise error.at(urlsplit(response.url or "").path) from None
        # (the audit's RangeReads, a plan of its own, never slices)
        if plan.done and getattr(plan, "sliced", None) is not None:
            self._start_slices(plan, response)
            self._next_sliced()
            return
        if plan.done:
            self._has_next_page = False
            logger.info(
                "%s: read complete: %d records in %d requests", self.resource, plan.records_read, plan.requests
            )
            self._dated_ahead(plan.newest_second)
        elif plan.requests % PROGRESS_EVERY == 0:
            logger.info(
                "%s: %d records read in %d requests, now at %s",
                self.resource, plan.records_read, plan.requests, plan.describe(),
            )

    # -- sliced ----------------------------------------------------------------------------------

    def _start_slices(self, plan: ReadPlan, response: requests.Response) -> None:
        assert plan.sliced is not None and self.session is not None
        since = max(plan.since or 0, 0)
        slices = plan.slices
        path = urlsplit(response.url or "").path
        endpoint = next((e for e in self.session.endpoints if e.name == self.resource), None)
        selector = self._selector = endpoint.data_selector if endpoint is not None else "results"
        self._logged = 0

        def answer_of(answer: requests.Response) -> tuple[list[Any], int]:
            payload = answer.json()
            return payload[selector], payload["count"]

        def slices_of(ranges: list[tuple[int, Optional[int]]]) -> Slices:
            return Slices(
                self.resource, self.page_size, ranges, result_window=self.result_window,
                cursor_field=CURSOR_FIELD, tie_field=CREATED_FIELD, key_field=self.key_field,
                hot_after=plan.hot_after,
            )

        assert self._request is not None
        gate = self.session.gate
        self.sliced = SlicedRead(
            lambda: gate.release_slices(slices), self.session, self._request, lambda page: {**self._static, **page_params(page, self.result_window)}, answer_of,
            SlicePlan(self.resource, self.page_size, since=since, total=plan.sliced, slices=slices,
                      result_window=self.result_window, cursor_field=CURSOR_FIELD),
            slices_of,
        )
        self._path = path
        try:
            self.sliced.start()
        except CrmApiBehaviourError as error:
            raise error.at(path) from None

    def _next_sliced(self) -> None:
        sliced = self.sliced
        assert sliced is not None
        try:
            self._ready = self._joined(sliced.next_pages(PAGES_AT_ONCE))
        except CrmApiBehaviourError as error:
            raise error.at(self._path) from None
        slices = sliced.slices
        assert slices is not None
        if self._ready is None:
            self._has_next_page = False
            logger.info(
                "%s: read complete in %d slices: %d records in %d requests (%d planning the slices) in %.1fs",
                self.resource, len(slices.reads), slices.records_read, slices.requests, sliced.plan.requests,
                time.monotonic() - sliced.began,
            )
            self._dated_ahead(slices.newest_second)
        elif slices.requests >= self._logged + PROGRESS_EVERY:
            self._logged = slices.requests
            logger.info("%s: %d records read in %d slices, %d requests", self.resource, slices.records_read,
                        len(slices.reads), slices.requests)

    def _dated_ahead(self, newest: Optional[int]) -> None:
        """Name a record dated after now: the API's data (a device's clock, an import from another
        time zone) deserves a look. The cursor does not follow it (dated_ahead.py); the record is
        read again by every sync until that time."""
        if newest is None:
            return
        assert self.plan is not None
        if newest <= self.plan.now + HOT_SECONDS:
            return
        # past a hundred times now (the year 5600): milliseconds of any date since 1977
        unit = " (milliseconds? dates are read as epoch seconds)" if newest > self.plan.now * 100 else ""
        logger.warning(
            "%s: a record has %s %s%s, after now (%s). The cursor does not follow it; each "
            "sync reads the record again until then",
            self.resource, CURSOR_FIELD, _utc(newest), unit, _utc(self.plan.now),
        )

    def _joined(
        self, pages: list[tuple[dict[str, Any], str, requests.Response]]
    ) -> Optional[tuple[dict[str, Any], str, requests.Response]]:
        """Pages a sliced read fetched, as one: the first page's request, whose answer holds the
        records of all of them (every one already checked by its slice, `Slices.take`)."""
        if len(pages) < 2:
            return pages[0] if pages else None
        params, url, response = pages[0]
        first = response.json()
        records = list(first[self._selector])
        for _, _, other in pages[1:]:
            records.extend(other.json()[self._selector])
        joined = {**first, self._selector: records}
        response.json = lambda **_: joined  # type: ignore[method-assign]
        return params, url, response

    def __str__(self) -> str:
        return f"KeysetPaginator({self.resource}, {self.plan.describe() if self.plan else 'not started'})"
