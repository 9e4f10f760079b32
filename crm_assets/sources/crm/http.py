"""Every HTTP quirk of the CRM API in one place: retries, response checks and pagination.

* `CrmSession` is the `requests` session the REST API source sends through. It retries
  429/5xx/connection errors (at most `max_retries` times, exponential backoff, `Retry-After`
  honoured but never `0`), fails at once on any other 4xx, and checks that a 200 really is a
  page of records before dlt sees it. Errors name the resource and the URL path, never the key.
* `WindowedOffsetPaginator` reads a resource completely despite the API's traps: it advances
  `from` by the records it received (pages can be capped below `size`), stops on `count` or an
  empty page, and moves to a new `date_created` window before `from + size` passes the
  10,000-record result window.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

import requests
from dlt.sources.helpers.rest_client.paginators import BasePaginator
from requests.exceptions import ChunkedEncodingError, ConnectionError, Timeout

from .settings import (
    BACKOFF_FACTOR,
    CURSOR_FIELD,
    PAGE_CONCURRENCY,
    ENDPOINTS,
    MAX_RETRIES,
    MAX_RETRY_DELAY,
    PRIMARY_KEY,
    REQUEST_TIMEOUT,
    RESULT_WINDOW,
    RETRY_STATUSES,
    WINDOW_FIELD,
    Endpoint,
)

try:  # orjson ships with dlt; it parses pages several times faster than the stdlib
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

logger = logging.getLogger("crm_assets.sources.crm")

# Internal request parameter through which dlt's incremental hands its cursor to the paginator,
# which folds it into the `filter` JSON. It never reaches the API.
UPDATED_SINCE_PARAM = "crm_updated_since"


class CrmError(Exception):
    """Base class of the errors this source raises on purpose."""


class CrmConfigurationError(CrmError):
    """The source is not configured well enough to make a single request."""


class CrmApiError(CrmError):
    """The API answered something the source cannot use."""

    def __init__(self, message: str, *, resource: str, path: str, status: Optional[int] = None):
        super().__init__(message)
        self.resource = resource
        self.path = path
        self.status = status


class CrmIncompleteReadError(CrmError):
    """The API's answers make a complete read of a resource impossible."""


def _endpoint_for(url: str) -> tuple[Optional[Endpoint], str]:
    path = urlsplit(url).path
    for endpoint in ENDPOINTS:
        if path.rstrip("/").endswith(endpoint.path):
            return endpoint, path
    return None, path


def _error_text(response: requests.Response) -> str:
    """The API's own error message, short, if the body is the documented JSON error."""
    try:
        body = _loads(response.content)
    except Exception:
        return ""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"][:300]
    return ""


def _retry_after(response: requests.Response) -> Optional[float]:
    header = response.headers.get("Retry-After", "").strip()
    try:
        seconds = float(header)
    except ValueError:
        return None
    # `Retry-After: 0` (or garbage) would make us hammer a server that just said "slow down".
    return seconds if seconds > 0 else None


class CrmSession(requests.Session):
    """A `requests.Session` with the contract's retry policy and response checks built in.

    It also fetches pages ahead: a paginator that knows which pages come next (the API reports
    `count`) asks `prefetch()` for them, and they are fetched on a small thread pool while dlt
    processes the current page. The paginator's own request sequence is unchanged, so a wrong
    guess (a page shorter than expected) only costs a wasted request, never a record.

    The policy lives in plain attributes listed in `__attrs__`, so the session survives the
    pickling and deep copies that dlt and Dagster make of sources; the pool is made on demand.
    """

    __attrs__ = requests.Session.__attrs__ + [
        "max_retries",
        "backoff_factor",
        "max_retry_delay",
        "request_timeout",
        "page_concurrency",
    ]

    def __init__(
        self,
        max_retries: int = MAX_RETRIES,
        backoff_factor: float = BACKOFF_FACTOR,
        max_retry_delay: float = MAX_RETRY_DELAY,
        request_timeout: float = REQUEST_TIMEOUT,
        page_concurrency: int = PAGE_CONCURRENCY,
    ) -> None:
        super().__init__()
        self.max_retries = max_retries
        self.backoff_factor = backoff_factor
        self.max_retry_delay = max_retry_delay
        self.request_timeout = request_timeout
        self.page_concurrency = page_concurrency
        self.headers["Accept"] = "application/json"
        self.headers["User-Agent"] = "crm_assets (dlt rest_api)"

    # -- pages fetched ahead -------------------------------------------------------------------

    def _prefetch_state(self) -> tuple[threading.Lock, dict[str, tuple[int, Future]]]:
        state = self.__dict__.get("_prefetched")
        if state is None:
            state = self.__dict__.setdefault("_prefetched", (threading.Lock(), {}))
        return state

    def _pool(self) -> ThreadPoolExecutor:
        lock, _ = self._prefetch_state()
        with lock:
            pool = self.__dict__.get("_prefetch_pool")
            if pool is None:
                workers = max(1, self.page_concurrency) * len(ENDPOINTS)
                # one connection per worker, kept alive
                adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=workers + 4)
                self.mount("http://", adapter)
                self.mount("https://", adapter)
                pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crm-prefetch")
                self.__dict__["_prefetch_pool"] = pool
            return pool

    def prefetch(self, owner: int, requests_ahead: list[requests.PreparedRequest], **kwargs: Any) -> None:
        """Start fetching these requests (if not already under way) for paginator `owner`."""
        if self.page_concurrency <= 1 or time.monotonic() < self.__dict__.get("_paused_until", 0.0):
            return
        lock, inflight = self._prefetch_state()
        pool = self._pool()
        for prepared in requests_ahead:
            with lock:
                if prepared.url in inflight:
                    continue
                inflight[prepared.url] = (owner, pool.submit(self._fetch, prepared, **kwargs))

    def discard_prefetched(self, owner: int) -> None:
        """Forget the pages fetched ahead for a paginator that is done (wrong guesses)."""
        lock, inflight = self._prefetch_state()
        with lock:
            for url in [url for url, (who, _) in inflight.items() if who == owner]:
                inflight.pop(url)[1].cancel()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        lock, inflight = self._prefetch_state()
        with lock:
            ahead = inflight.pop(request.url or "", None)
        if ahead is not None and not ahead[1].cancelled():
            response = ahead[1].result()
            response.crm_prefetched = True  # type: ignore[attr-defined]
            return response
        return self._fetch(request, **kwargs)

    def _backoff(self, retry_number: int) -> float:
        return min(self.max_retry_delay, self.backoff_factor * (2 ** (retry_number - 1)))

    def _fetch(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        """One request with the retry policy, then the response checks."""
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.request_timeout
        endpoint, path = _endpoint_for(request.url or "")
        resource = endpoint.name if endpoint else "crm"
        retry = 0
        while True:
            response: Optional[requests.Response] = None
            try:
                response = super().send(request, **kwargs)
            except requests.HTTPError as exc:
                # a response hook (dlt's raise_for_status) already turned the answer into an error
                if exc.response is None:
                    raise
                response = exc.response
            except (ConnectionError, Timeout, ChunkedEncodingError) as exc:
                failure = type(exc).__name__
                if retry >= self.max_retries:
                    raise CrmApiError(
                        f"{resource}: GET {path} failed after {retry} retries ({failure})",
                        resource=resource,
                        path=path,
                    ) from None
                wait = self._backoff(retry + 1)
            if response is not None:
                if response.status_code not in RETRY_STATUSES or retry >= self.max_retries:
                    return self._checked(response, endpoint, resource, path, retry)
                failure = f"HTTP {response.status_code}"
                after = _retry_after(response)
                wait = min(self.max_retry_delay, after) if after else self._backoff(retry + 1)
                if response.status_code == 429:
                    # rate limited: stop fetching ahead for a while, the API wants fewer requests
                    self.__dict__["_paused_until"] = time.monotonic() + 2 * wait
            retry += 1
            logger.warning(
                "%s: %s from GET %s, retry %d of %d in %.1fs",
                resource, failure, path, retry, self.max_retries, wait,
            )
            time.sleep(wait)

    def _checked(
        self,
        response: requests.Response,
        endpoint: Optional[Endpoint],
        resource: str,
        path: str,
        retries: int,
    ) -> requests.Response:
        status = response.status_code
        if status != 200:
            detail = _error_text(response)
            if status == 401:
                reason = "the API key was rejected (401 Unauthorized): check SOURCES__CRM__API_KEY"
            elif status == 403:
                reason = "the API key has no access to this resource (403 Forbidden)"
            elif status in RETRY_STATUSES:
                reason = f"HTTP {status} after {retries} retries"
            else:
                reason = f"HTTP {status}"
            message = f"{resource}: GET {path} failed: {reason}"
            raise CrmApiError(
                message + (f" - API says: {detail}" if detail else ""),
                resource=resource, path=path, status=status,
            )
        if endpoint is None:
            return response
        try:
            payload = _loads(response.content)
        except ValueError:
            kind = response.headers.get("Content-Type", "unknown content type")
            raise CrmApiError(
                f"{resource}: GET {path} answered 200 with a body that is not JSON ({kind})",
                resource=resource, path=path, status=status,
            ) from None
        records = payload.get(endpoint.data_selector) if isinstance(payload, dict) else None
        if not isinstance(records, list):
            raise CrmApiError(
                f"{resource}: GET {path} answered 200 without a '{endpoint.data_selector}' list "
                "of records",
                resource=resource, path=path, status=status,
            )
        count = payload.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise CrmApiError(
                f"{resource}: GET {path} answered 200 without a valid 'count'",
                resource=resource, path=path, status=status,
            )
        for record in records:
            if not isinstance(record, dict) or not isinstance(record.get(PRIMARY_KEY), str) or not record[PRIMARY_KEY]:
                raise CrmApiError(
                    f"{resource}: GET {path} returned a record without a string '{PRIMARY_KEY}'",
                    resource=resource, path=path, status=status,
                )
        # Parse once: dlt and the paginator both call `response.json()`.
        response.json = lambda **_: payload  # type: ignore[method-assign]
        response.crm_session = self  # type: ignore[attr-defined]  # lets the paginator prefetch
        return response


def range_clause(field: str, op: str, value: int) -> dict[str, Any]:
    return {"range": {field: {op: value}}}


def encode_filter(clauses: list[dict[str, Any]]) -> str:
    """The API's filter parameter. Built here, after dlt's `str.format` placeholder expansion,
    so its braces are never mistaken for placeholders."""
    return json.dumps({"must": clauses}, separators=(",", ":"))


class WindowedOffsetPaginator(BasePaginator):
    """Offset pagination that cannot lose records (api-contract.md rules 1-4).

    Records are listed by `date_created` ascending (ties on `id`). `from` advances by the records
    actually received. Before `from + size` would pass the result window, the listing continues
    in a new window, `date_created >= <last date_created read>`, from offset 0: each window holds
    at most 10,000 records, records sharing the boundary second are read again (the merge on `id`
    absorbs them) rather than risk skipping one, and a resource of any size is read completely.
    Only if a single second holds a whole window's worth of records is that impossible, and the
    read fails saying so.
    """

    def __init__(self, resource: str, page_size: int, result_window: int = RESULT_WINDOW) -> None:
        super().__init__()
        if not 0 < page_size <= result_window:
            raise CrmConfigurationError(f"{resource}: page size must be between 1 and {result_window}, got {page_size}")
        self.resource = resource
        self.page_size = page_size
        self.result_window = result_window
        self._reset()

    def _reset(self) -> None:
        self._has_next_page = True
        self._fixed_clauses: list[dict[str, Any]] = []
        self._window_start: Optional[int] = None
        self._offset = 0
        self.windows = 1
        self.pages = 0
        self.records_received = 0
        self.refetched = 0
        self.total: Optional[int] = None
        self._count: Optional[int] = None  # the current window's count
        self._stride = self.page_size  # records a page actually holds (a cap shows on page 1)
        self._session: Optional[CrmSession] = None
        self._sent: Optional[requests.PreparedRequest] = None

    def init_request(self, request: requests.Request) -> None:
        if self._session is not None:
            self._session.discard_prefetched(id(self))
        self._reset()
        params = request.params if isinstance(request.params, dict) else {}
        since = params.pop(UPDATED_SINCE_PARAM, None)
        if since is not None:
            # inclusive: a record edited in the same second as the cursor is read again, not missed
            self._fixed_clauses.append(range_clause(CURSOR_FIELD, "gte", int(since)))
        params["sort_field"] = WINDOW_FIELD
        params["sort_direction"] = "asc"
        request.params = params
        self.update_request(request)

    def update_request(self, request: requests.Request) -> None:
        clauses = list(self._fixed_clauses)
        if self._window_start is not None:
            clauses.append(range_clause(WINDOW_FIELD, "gte", self._window_start))
        if clauses:
            request.params["filter"] = encode_filter(clauses)
        else:
            request.params.pop("filter", None)
        request.params["from"] = self._offset
        request.params["size"] = min(self.page_size, self.result_window - self._offset)
        self._fetch_ahead(request.params)

    def _fetch_ahead(self, params: dict[str, Any]) -> None:
        """Ask the session for the pages that will most likely be requested next."""
        session, sent, count = self._session, self._sent, self._count
        if session is None or sent is None or count is None or not self._has_next_page:
            return
        base = urlunsplit(urlsplit(sent.url or "")._replace(query=""))
        ahead: list[requests.PreparedRequest] = []
        offset = self._offset
        while len(ahead) < session.page_concurrency and offset < min(count, self.result_window):
            size = min(self.page_size, self.result_window - offset)
            # same keys in the same order as the real request, so the URLs match exactly
            guess = dict(params, **{"from": offset, "size": size})
            prepared = sent.copy()
            prepared.prepare_url(base, guess)
            ahead.append(prepared)
            offset += min(self._stride, size)
        session.prefetch(id(self), ahead)

    def update_state(self, response: requests.Response, data: Optional[list[Any]] = None) -> None:
        count = response.json()["count"]
        received = len(data or [])
        self._session = getattr(response, "crm_session", None)
        self._sent = getattr(response, "request", None)
        if getattr(response, "crm_prefetched", False) and self._count is not None and count < self._count:
            # This page was fetched ahead, before the listing grew (records inserted, offset
            # drift). Positions have shifted since, so a record could sit between the previous
            # page and this one: read this page again, fresh, instead of moving on.
            self.refetched += 1
            if self._session is not None:
                self._session.discard_prefetched(id(self))
            logger.info("%s: listing changed while reading ahead; re-reading from=%d", self.resource, self._offset)
            return
        self.pages += 1
        if self.total is None:
            self.total = count
        self._count = count
        if received:
            self._stride = received
        if received == 0:
            self._finish()
            if self._offset < count:
                raise CrmIncompleteReadError(
                    f"{self.resource}: the API returned an empty page at from={self._offset} while "
                    f"its count says {count} records match; refusing to report a partial read"
                )
            return
        self.records_received += received
        self._offset += received
        if self._offset >= count:
            self._finish()
            return
        if self._offset >= self.result_window:
            self._next_window(data[-1])
        if self.pages % 20 == 0:
            logger.info(
                "%s: %d records read in %d pages (%s matching, window %d)",
                self.resource, self.records_received, self.pages, self.total, self.windows,
            )

    def _finish(self) -> None:
        self._has_next_page = False
        if self._session is not None:
            self._session.discard_prefetched(id(self))

    def _next_window(self, last_record: dict[str, Any]) -> None:
        last = last_record.get(WINDOW_FIELD)
        if not isinstance(last, int) or isinstance(last, bool):
            raise CrmIncompleteReadError(
                f"{self.resource}: record {last_record.get(PRIMARY_KEY)!r} has no integer "
                f"'{WINDOW_FIELD}'; cannot continue past the API's {self.result_window}-record window"
            )
        if self._window_start is not None and last <= self._window_start:
            raise CrmIncompleteReadError(
                f"{self.resource}: more than {self.result_window} records share "
                f"{WINDOW_FIELD}={last}; the API's result window makes reading them all impossible"
            )
        self._window_start = last
        self._offset = 0
        self._count = None  # unknown until the new window's first page
        self.windows += 1
        logger.info(
            "%s: result window reached after %d records; continuing from %s >= %d",
            self.resource, self.records_received, WINDOW_FIELD, last,
        )

    def __str__(self) -> str:
        return f"WindowedOffsetPaginator({self.resource}, from={self._offset}, window={self.windows})"


def find_crm_error(exc: BaseException) -> Optional[CrmError]:
    """The `CrmError` behind an exception that dlt (or Dagster) has wrapped, if there is one."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, CrmError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
