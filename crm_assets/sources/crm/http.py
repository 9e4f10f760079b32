"""The HTTP session every request of the source goes through: the contract's retry policy and
response checks.

`CrmSession` retries 429/5xx/connection errors (at most `max_retries` times, exponential backoff,
`Retry-After` honoured but never `0`), fails at once on any other 4xx, and checks that a 200 really
is a page of records before dlt sees it. Errors name the resource and the URL path, never the key.

A connection refused, or a host name that does not resolve, before the API has answered any
request of the session is a wrong base URL or an API that is not running: no retry can change
that, so it fails at once, naming the address (`CrmApiError.unreachable`). Once the API has
answered, the same failure is an outage in the middle of a read, and is retried.

Politeness, per API key across every resource of a sync. Every copy of one session (dlt and Dagster
copy a source's session; each resource may read through its own copy) shares one `_Gate`, found by
the session's `token`:

* at most `max_in_flight` requests are on the wire at once (a semaphore; SOURCES__CRM__MAX_IN_FLIGHT,
  default 8), whether dlt's extract threads or a sliced read's workers (slices.py) send them;
* a 429 pauses the whole session, not only the request that got it: no request is sent before the
  time its `Retry-After` names (or the backoff), so every resource slows down together. A 429 is
  the API asking for patience, not a fault: its retries do not count towards `max_retries`, and a
  request gives up on them only once it has waited `RATE_LIMIT_PATIENCE` seconds for 429s alone;
* a sliced read's worker that has already fetched a page hands it over (`hand_over`), and dlt's own
  `send` of exactly that prepared request gets it without a second request (the workers' own
  requests, `send_fresh`, never do); and the resources of
  a sync read at most 2 x `max_in_flight` slices at once (`claim_slices`), each a page ahead of
  dlt at most, so a sync of many big resources stays within bounded memory.
"""

from __future__ import annotations

import json
import logging
import operator
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.exceptions import ChunkedEncodingError, ConnectionError, Timeout

from .catalog import BUILT_IN, Endpoint
from .errors import CrmApiError
from .settings import (
    BACKOFF_FACTOR,
    MAX_IN_FLIGHT,
    MAX_RETRIES,
    MAX_RETRY_DELAY,
    RATE_LIMIT_PATIENCE,
    REQUEST_TIMEOUT,
    RETRY_STATUSES,
)

try:  # orjson ships with dlt; it parses pages several times faster than the stdlib
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

logger = logging.getLogger("crm_assets.sources.crm")

# The sessions (by `CrmSession.token`) that have had an answer from the API. Kept here, not on the
# session: dlt and Dagster copy a source's session, and each resource may read through its own copy
# of one run's session.
_ANSWERED: set[str] = set()
_ANSWERED_LOCK = threading.Lock()


class _Gate:
    """What every copy of one session shares: the requests in flight, the time before which no
    request may be sent (the last 429's Retry-After), and pages a sliced read hands over."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.slots = threading.BoundedSemaphore(max_in_flight)
        self.lock = threading.Lock()
        self.not_before = 0.0  # time.monotonic()
        self.pauses = 0  # 429s that paused the session
        # slice workers the sync's resources may run at once (slices.py): each holds a page ahead
        # of dlt, so this bounds the memory of all slices together
        self.slices_left = 2 * max_in_flight
        self.handed_over: dict[str, deque[requests.Response]] = {}

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.not_before = max(self.not_before, time.monotonic() + seconds)
            self.pauses += 1

    def claim_slices(self, wanted: int) -> int:
        """Slices a resource may read at once: up to `wanted` of what is left, and none (a
        sequential read) where fewer than two are left. Give them back with `release_slices`."""
        with self.lock:
            granted = min(wanted, self.slices_left)
            if granted < 2:
                return 0
            self.slices_left -= granted
            return granted

    def release_slices(self, count: int) -> None:
        with self.lock:
            self.slices_left += count

    def wait_for_pause(self) -> None:
        while True:
            with self.lock:
                delay = self.not_before - time.monotonic()
            if delay <= 0:
                return
            time.sleep(delay)


# Weak: a gate lives as long as some copy of its session has sent a request through it.
_GATES: "weakref.WeakValueDictionary[str, _Gate]" = weakref.WeakValueDictionary()
_GATES_LOCK = threading.Lock()


def _endpoint_for(endpoints: Sequence[Endpoint], url: str) -> tuple[Optional[Endpoint], str]:
    """The endpoint a URL belongs to: the longest path its own path ends with (`/v2/invoices`
    over `/invoices`), below whatever prefix the base URL has."""
    path = urlsplit(url).path
    matching = [e for e in endpoints if ("/" + path.strip("/")).endswith("/" + e.path.strip("/"))]
    return (max(matching, key=lambda e: len(e.path)) if matching else None), path


def _error_text(response: requests.Response) -> str:
    """The API's own error message, short, if the body is the documented JSON error."""
    try:
        body = _loads(response.content)
    except Exception:
        return ""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"][:300]
    return ""


def _connection_failure(exc: Exception) -> str:
    """What went wrong below HTTP, in words: urllib3's own texts are long and nest."""
    text = str(exc)
    if "Failed to resolve" in text or "Name or service not known" in text or "nodename nor servname" in text:
        return "the host name does not resolve"
    if "Connection refused" in text:
        return "the connection was refused"
    if isinstance(exc, Timeout):
        return "no answer within the request timeout"
    return f"the connection failed ({type(exc).__name__})"


def _window_hint(response: requests.Response) -> str:
    """What a 400 to an offset may mean: an API whose result window is smaller than the one the
    read relies on refuses `from + size` beyond it (every count asks at `from=<window>`)."""
    query = parse_qs(urlsplit(response.request.url or "").query) if response.request is not None else {}
    try:
        reach = int(query["from"][0]) + int(query.get("size", ["0"])[0])
    except (KeyError, ValueError):
        return ""
    if reach <= 0:
        return ""
    return (
        f" at from + size = {reach}: if the API's result window is smaller, set "
        "SOURCES__CRM__RESULT_WINDOW to it"
    )


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

    The policy lives in plain attributes listed in `__attrs__`, so the session survives the
    pickling and deep copies that dlt and Dagster make of sources. `endpoints` tell it which
    resource a URL belongs to, and so how to check its pages (records key, primary key).
    """

    __attrs__ = requests.Session.__attrs__ + [
        "endpoints",
        "max_retries",
        "backoff_factor",
        "max_retry_delay",
        "request_timeout",
        "max_in_flight",
        "token",
    ]

    def __init__(
        self,
        max_retries: int = MAX_RETRIES,
        backoff_factor: float = BACKOFF_FACTOR,
        max_retry_delay: float = MAX_RETRY_DELAY,
        request_timeout: float = REQUEST_TIMEOUT,
        endpoints: Sequence[Endpoint] = BUILT_IN,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        super().__init__()
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.endpoints = tuple(endpoints)
        self.max_retries = max_retries
        self.backoff_factor = backoff_factor
        self.max_retry_delay = max_retry_delay
        self.request_timeout = request_timeout
        self.token = uuid.uuid4().hex  # shared by every copy of this session (_ANSWERED)
        self.headers["Accept"] = "application/json"
        self.headers["User-Agent"] = "crm_assets (dlt rest_api)"
        # one kept-alive connection per request in flight (requests keeps 10 a host by default)
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, max_in_flight))
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    @property
    def gate(self) -> _Gate:
        """The gate every copy of this session shares (see the module docstring)."""
        gate = self.__dict__.get("_gate")
        if gate is None:
            with _GATES_LOCK:
                gate = _GATES.get(self.token)
                if gate is None:
                    gate = _GATES[self.token] = _Gate(self.max_in_flight)
            self.__dict__["_gate"] = gate  # not in __attrs__: copies find it again by token
        return gate

    def hand_over(self, prepared_url: str, response: requests.Response) -> None:
        """The answer the next `send` of `prepared_url` gets, already fetched (slices.py)."""
        gate = self.gate
        with gate.lock:
            gate.handed_over.setdefault(prepared_url, deque()).append(response)

    def _handed_over(self, prepared_url: str) -> Optional[requests.Response]:
        gate = self.gate
        with gate.lock:
            waiting = gate.handed_over.get(prepared_url)
            if not waiting:
                return None
            response = waiting.popleft()
            if not waiting:
                del gate.handed_over[prepared_url]
            return response

    @property
    def answered(self) -> bool:
        """The API has answered a request of this session (or of a copy of it)."""
        return self.token in _ANSWERED

    def _answered_now(self) -> None:
        if self.token not in _ANSWERED:
            with _ANSWERED_LOCK:
                _ANSWERED.add(self.token)

    def backoff_seconds(self, retry_number: int) -> float:
        """The wait before retry `retry_number` (1, 2, ...) when the API names none."""
        return min(self.max_retry_delay, self.backoff_factor * (2 ** (retry_number - 1)))

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        """dlt's send: the answer a sliced read's worker handed over for exactly this request, or
        the request itself (`send_fresh`)."""
        handed_over = self._handed_over(request.url or "")
        if handed_over is not None:
            return handed_over  # fetched and checked by a sliced read's worker
        return self.send_fresh(request, **kwargs)

    def send_fresh(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        """One request with the retry policy, then the response checks; never an answer handed
        over. A sliced read's workers send this way: the last slice's second read can ask exactly
        what its first read asked last, and must get the API's answer now, not the earlier one
        still waiting for dlt (whose records a join may have extended with other slices')."""
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.request_timeout
        endpoint, path = _endpoint_for(self.endpoints, request.url or "")
        resource = endpoint.name if endpoint else "crm"
        gate = self.gate
        retry = 0
        rate_limited, limits = 0.0, 0  # seconds this request has waited on 429s, and how many
        while True:
            response: Optional[requests.Response] = None
            gate.wait_for_pause()
            try:
                with gate.slots:
                    # a 429 that came while this request waited for a slot pauses it too
                    gate.wait_for_pause()
                    response = super().send(request, **kwargs)
            except requests.HTTPError as exc:
                # a response hook (dlt's raise_for_status) already turned the answer into an error
                if exc.response is None:
                    raise
                response = exc.response
            except (ConnectionError, Timeout, ChunkedEncodingError) as exc:
                failure = _connection_failure(exc)
                parts = urlsplit(request.url or "")
                address = f"{parts.scheme}://{parts.netloc}"
                unresolvable = "does not resolve" in failure
                if (unresolvable or "refused" in failure) and not self.answered:
                    raise CrmApiError(
                        f"{resource}: {failure} at {address} (GET {path}) before the API answered "
                        "any request: check SOURCES__CRM__BASE_URL and that the API is running",
                        resource=resource, path=path, unresolvable=unresolvable, unreachable=True,
                    ) from None
                if retry >= self.max_retries:
                    raise CrmApiError(
                        f"{resource}: GET {path} failed after {retry} retries: {failure} at "
                        f"{address}; check SOURCES__CRM__BASE_URL",
                        resource=resource,
                        path=path,
                        unresolvable=unresolvable,
                    ) from None
                wait = self.backoff_seconds(retry + 1)
            if response is not None:
                self._answered_now()
                status = response.status_code
                if status == 429 and rate_limited < RATE_LIMIT_PATIENCE:
                    after = _retry_after(response)
                    limits += 1
                    wait = min(self.max_retry_delay, after or self.backoff_seconds(limits))
                    rate_limited += wait
                    gate.pause(wait)  # the whole session waits, every resource of the sync
                    logger.warning(
                        "%s: HTTP 429 from GET %s: the session pauses for %.1fs (%.1fs of %.0fs waited "
                        "on 429s)", resource, path, wait, rate_limited, RATE_LIMIT_PATIENCE,
                    )
                    continue
                if status not in RETRY_STATUSES or retry >= self.max_retries:
                    return self._checked(response, endpoint, resource, path, retry)
                failure = f"HTTP {status}"
                after = _retry_after(response)
                wait = min(self.max_retry_delay, after) if after else self.backoff_seconds(retry + 1)
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
                reason = f"HTTP {status}" + (_window_hint(response) if status == 400 else "")
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
        count = payload.get("count") if isinstance(payload, dict) else None
        if records is None and count == 0 and type(count) is int:
            # nothing matches, said as null or by leaving the list out (APIs that serialize an
            # empty list as null do): nothing can hide in it
            records = payload[endpoint.data_selector] = []
        if not isinstance(records, list):
            raise CrmApiError(
                f"{resource}: GET {path} answered 200 without a '{endpoint.data_selector}' list "
                "of records",
                resource=resource, path=path, status=status,
            )
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise CrmApiError(
                f"{resource}: GET {path} answered 200 without a valid 'count'",
                resource=resource, path=path, status=status,
            )
        key = endpoint.primary_key
        # the usual page, checked in C: records all dicts, their keys all non-empty strings
        usual = set(map(type, records)) <= {dict}
        if usual:
            keys = list(map(operator.methodcaller("get", key), records))
            usual = set(map(type, keys)) <= {str} and all(keys)
        for record in () if usual else records:
            if not isinstance(record, dict) or not isinstance(record.get(key), str) or not record[key]:
                raise CrmApiError(
                    f"{resource}: GET {path} returned a record without a string '{key}' "
                    "(the primary key: SOURCES__CRM__PRIMARY_KEY)",
                    resource=resource, path=path, status=status,
                )
        # Parse once: dlt and the paginator both call `response.json()`.
        response.json = lambda **_: payload  # type: ignore[method-assign]
        return response
