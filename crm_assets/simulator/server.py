"""The HTTP side of the simulator: the CRM API contract, opt-in faults and loopback admin endpoints.

Standard library only.  ``ThreadingHTTPServer`` speaking HTTP/1.1 with an exact Content-Length on
every response, so clients can keep connections alive.  One lock guards all mutable state (of one
account, when the simulator serves many: each is a ``SimulatedAccount`` with its own); record
generation for a page happens under it, JSON encoding and socket writes do not.
"""

from __future__ import annotations

import copy
import dataclasses
import hmac
import json
import random
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from .data import DEFAULT_COUNTS, KEY_FIELDS, KNOWN_RESOURCES, OPTIONAL_RESOURCES, RESOURCES, Store, account_seed
from .query import DIRECTIONS, NO_BOUNDS, SORT_FIELDS, Drift, QueryError, parse_filter, plan

try:  # optional speed-up; the output is the same JSON
    import orjson

    def _dumps(obj: Any) -> bytes:
        try:
            return orjson.dumps(obj)
        except TypeError:  # e.g. a non-str dict key in an add_field value: let json coerce it
            return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
except ImportError:  # pragma: no cover - depends on the environment
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


FAULT_KINDS = ("429", "500", "502", "503", "504", "drop")
CORRUPT_KINDS = ("html", "no_key", "truncated")
_HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


@dataclass
class SimulatorConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    api_key: str = "demo-key"
    seed: int = 42
    # The five resources always (missing ones get their DEFAULT_COUNTS); an optional resource
    # (OPTIONAL_RESOURCES: invoices) is served only when named here, e.g. {"invoices": 400}.
    counts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COUNTS))
    # "id" (the contract) or "jnid" (the real API family): the name of each record's own key, same
    # values. References (job_id, related[].id) keep their names. Set at start, not live.
    key_field: str = "id"
    # resource -> the path it is served at instead of its own (REAL_FAMILY_PATHS: invoices under
    # /v2, as the real API family has them). Set at start, not live.
    paths: dict[str, str] = field(default_factory=dict)
    result_window: int = 10_000
    max_size: int = 1000
    default_size: int = 10
    # The sort a request gets when it names none (live-configurable, like default_size). The
    # defaults keep what existing clients were tested against; the real API family reportedly sorts
    # by date_updated desc, so "date_updated" + "desc" plays it: a client must send both explicitly.
    default_sort_field: str = "date_created"  # date_created | date_updated
    default_sort_direction: str = "asc"  # asc | desc
    # --- live-configurable (POST /_admin/config, CrmSimulator.configure) ---
    page_cap: Optional[int] = None  # silently return at most this many records per page
    page_caps: dict[str, int] = field(default_factory=dict)  # per-resource override of page_cap
    fault_every: Optional[int] = None  # every N-th data request of a resource gets a fault
    fault_kinds: list[str] = field(default_factory=lambda: list(FAULT_KINDS))
    retry_after: int = 1  # seconds, sent with 429
    # A 429 storm: for this many seconds from when it is set (at start or by configure), every data
    # request answers 429 with Retry-After: retry_after. 0: none.
    storm_seconds: float = 0
    latency_ms: float = 0
    drift_every: Optional[int] = None  # every N-th page (from > 0) of a listing drifts by one
    # The adversary (docs/api-contract.md, "Listings change while they are read"): before every
    # N-th page of a resource, a change; each opt-in, seeded, deterministic.
    repeat_every: Optional[int] = None  # the page starts with the previous page's last record
    insert_every: Optional[int] = None  # a new record at a random position of every order
    delete_every: Optional[int] = None  # a hard delete, alternately before and after `from`
    count_capped: bool = False  # `count` stops at the result window, as search backends do
    fail_resources: dict[str, int] = field(default_factory=dict)  # resource -> status, always
    corrupt: dict[str, str] = field(default_factory=dict)  # resource -> html | no_key | truncated
    forbidden: list[str] = field(default_factory=list)  # resources answering 403
    # An API that does not do what it is asked: resource names, or ["*"] for every served resource.
    # The parameter is not read at all for them, so a bad value is no 400 either.
    ignore_sort: list[str] = field(default_factory=list)  # the default sort, whatever is asked
    ignore_filter: list[str] = field(default_factory=list)  # the whole resource, count included
    ignore_from: list[str] = field(default_factory=list)  # every page from the head, count as asked
    exclusive_bounds: list[str] = field(default_factory=list)  # gte read as gt, lte as lt
    page_count: list[str] = field(default_factory=list)  # `count` is the answer's own length (0 for size=0)
    # `fields=a,b` keeps only those keys of each record, as the real API family documents; off, the
    # parameter is unknown and ignored like any other.
    fields_param: bool = False
    # Fields whose names normalize to the same column, each with its own value, on every record of
    # these resources (or ["*"]): what custom-field-heavy CRMs send (`with_colliding_fields`).
    colliding_fields: list[str] = field(default_factory=list)
    verbose: bool = False  # one stderr line per request
    # A revoked key: every data request answers 401, as a wrong key does (live, so a test can revoke
    # one account's key between syncs).
    revoked: bool = False
    # Prepended to every record id and reference, so ids never repeat between accounts. Set at start.
    id_prefix: str = ""
    # --- many accounts from one process (set at start) ---
    # Account names (slugs). Each is served under its own path prefix, http://host:port/<name>/v1/...
    # and /<name>/_admin/..., with its own key (key-<name>), data (a seed derived from `seed` and the
    # name; ids prefixed "<name>-"), stats and live config; every other field here is each account's
    # default. Empty: one account at the root, as always.
    accounts: list[str] = field(default_factory=list)
    # name -> the fields that differ for that account, e.g. {"b": {"api_key": "k", "revoked": True}}
    account_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


ACCOUNT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# What an account cannot set for itself: the server's own fields.
_SERVER_FIELDS = ("host", "port", "accounts", "account_overrides")

LIVE_FIELDS = ("page_cap", "page_caps", "fault_every", "fault_kinds", "retry_after", "storm_seconds", "latency_ms",
               "drift_every", "repeat_every", "insert_every", "delete_every", "count_capped", "fail_resources", "corrupt", "forbidden", "verbose",
               "result_window", "max_size", "default_size", "default_sort_field", "default_sort_direction",
               "ignore_sort", "ignore_filter", "ignore_from", "exclusive_bounds", "page_count", "fields_param",
               "colliding_fields", "revoked")


def _check_config(c: SimulatorConfig) -> None:
    """Raise ValueError on nonsense, so a typo in a test fails loudly instead of doing nothing."""
    # Accept any iterable for the list fields (e.g. a set), but store JSON-friendly lists.
    c.forbidden = sorted(set(c.forbidden))
    for name in ("ignore_sort", "ignore_filter", "ignore_from", "exclusive_bounds", "page_count", "colliding_fields"):
        if isinstance(getattr(c, name), str):  # "jobs" would otherwise read as j, o, b, s
            raise ValueError(f'{name} must be a list of resources or ["*"], got {getattr(c, name)!r}')
        setattr(c, name, sorted(set(getattr(c, name))))
    c.fault_kinds = [str(k) for k in c.fault_kinds]
    def pos_int(name: str, v: Any, minimum: int = 1, optional: bool = True) -> None:
        if v is None and optional:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}{' or null' if optional else ''}, got {v!r}")

    served = _served(c)

    def resources(name: str, names: Any) -> None:
        bad = [r for r in names if r not in served]
        if bad:
            hint = " (an optional resource is served only when counts names it)" if (
                set(bad) & set(OPTIONAL_RESOURCES)) else ""
            raise ValueError(f"{name}: unknown resources {bad}; known: {served}{hint}")

    pos_int("page_cap", c.page_cap)
    resources("page_caps", c.page_caps)
    for r, v in c.page_caps.items():
        pos_int(f"page_caps[{r}]", v, optional=False)
    # fault_every=1 would fault every retry too; fail_resources is the tool for "always fails".
    pos_int("fault_every", c.fault_every, minimum=2)
    if not c.fault_kinds or any(k not in FAULT_KINDS for k in c.fault_kinds):
        raise ValueError(f"fault_kinds must be a non-empty list of {list(FAULT_KINDS)}, got {c.fault_kinds!r}")
    pos_int("retry_after", c.retry_after, minimum=0, optional=False)
    if isinstance(c.storm_seconds, bool) or not isinstance(c.storm_seconds, (int, float)) or c.storm_seconds < 0:
        raise ValueError(f"storm_seconds must be a number >= 0, got {c.storm_seconds!r}")
    if not isinstance(c.latency_ms, (int, float)) or c.latency_ms < 0:
        raise ValueError(f"latency_ms must be a number >= 0, got {c.latency_ms!r}")
    pos_int("drift_every", c.drift_every)
    for name in ("repeat_every", "insert_every", "delete_every"):
        pos_int(name, getattr(c, name))
    if not isinstance(c.count_capped, bool):
        raise ValueError(f"count_capped must be true or false, got {c.count_capped!r}")
    resources("fail_resources", c.fail_resources)
    for r, v in c.fail_resources.items():
        pos_int(f"fail_resources[{r}]", v, minimum=400, optional=False)
    resources("corrupt", c.corrupt)
    if any(v not in CORRUPT_KINDS for v in c.corrupt.values()):
        raise ValueError(f"corrupt values must be one of {list(CORRUPT_KINDS)}")
    resources("forbidden", c.forbidden)
    resources("ignore_sort", [r for r in c.ignore_sort if r != "*"])
    resources("ignore_filter", [r for r in c.ignore_filter if r != "*"])
    resources("ignore_from", [r for r in c.ignore_from if r != "*"])
    resources("exclusive_bounds", [r for r in c.exclusive_bounds if r != "*"])
    resources("page_count", [r for r in c.page_count if r != "*"])
    resources("colliding_fields", [r for r in c.colliding_fields if r != "*"])
    if not isinstance(c.revoked, bool):
        raise ValueError(f"revoked must be true or false, got {c.revoked!r}")
    if not isinstance(c.id_prefix, str):
        raise ValueError(f"id_prefix must be a string, got {c.id_prefix!r}")
    if not isinstance(c.fields_param, bool):
        raise ValueError(f"fields_param must be true or false, got {c.fields_param!r}")
    pos_int("result_window", c.result_window, optional=False)
    pos_int("max_size", c.max_size, optional=False)
    pos_int("default_size", c.default_size, minimum=0, optional=False)
    if c.default_sort_field not in SORT_FIELDS:
        raise ValueError(f"default_sort_field must be one of {list(SORT_FIELDS)}, got {c.default_sort_field!r}")
    if c.default_sort_direction not in DIRECTIONS:
        raise ValueError(f"default_sort_direction must be one of {list(DIRECTIONS)}, got {c.default_sort_direction!r}")
    if c.key_field not in KEY_FIELDS:
        raise ValueError(f"key_field must be one of {list(KEY_FIELDS)}, got {c.key_field!r}")
    bad = [r for r in c.counts if r not in KNOWN_RESOURCES]
    if bad:
        raise ValueError(f"counts: unknown resources {bad}; known: {list(KNOWN_RESOURCES)}")
    for r, v in c.counts.items():
        pos_int(f"counts[{r}]", v, minimum=0, optional=False)
    resources("paths", c.paths)
    served_paths = [c.paths.get(r, KNOWN_RESOURCES[r][0]) for r in served]
    if any(not isinstance(p, str) or not p.startswith("/") or "?" in p for p in c.paths.values()) or (
            len(set(served_paths)) != len(served_paths)):
        raise ValueError(f"paths must map served resources to distinct URL paths like '/v2/invoices', got {c.paths!r}")


def _served(c: SimulatorConfig) -> list[str]:
    """The resources a config serves: the five, then any optional one its counts name."""
    return list(RESOURCES) + [r for r in OPTIONAL_RESOURCES if r in c.counts]


def _account_configs(c: SimulatorConfig) -> dict[str, SimulatorConfig]:
    """Each account's config: `c` with the account's key, seed and id prefix, then its overrides."""
    if isinstance(c.accounts, str):
        raise ValueError(f"accounts must be a list of names, got {c.accounts!r}")
    names = list(c.accounts)
    bad = [n for n in names if not isinstance(n, str) or not ACCOUNT_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"account names must match {ACCOUNT_NAME.pattern}, got {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"account names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    unknown = sorted(set(c.account_overrides) - set(names))
    if unknown:
        raise ValueError(f"account_overrides name accounts not in accounts: {unknown}")
    base = dataclasses.replace(c, accounts=[], account_overrides={})
    settable = {f.name for f in dataclasses.fields(SimulatorConfig)} - set(_SERVER_FIELDS)
    out = {}
    for name in names:
        over = copy.deepcopy(dict(c.account_overrides.get(name, {})))
        wrong = sorted(set(over) - settable)
        if wrong:
            raise ValueError(f"account {name!r}: cannot set {wrong}; settable: {sorted(settable)}")
        if "counts" in over:  # the resources it names; the others keep every account's counts
            over["counts"] = {**c.counts, **over["counts"]}
        own = {"api_key": f"key-{name}", "seed": account_seed(c.seed, name), "id_prefix": f"{name}-"}
        out[name] = dataclasses.replace(base, **{**own, **over})
    return out


def with_colliding_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of `record` with fields whose names dlt's default naming maps to one column, each
    with a value of its own (its name and the record's key): `Status` next to `status` (added when
    the record has none), `first-name` before `first_name`, and `custom` holding `Region` before
    `region`."""
    key = record.get("id", record.get("jnid"))
    out = dict(record)
    out.setdefault("status", f"status {key}")
    out["Status"] = f"Status {key}"
    out["first-name"] = f"first-name {key}"
    out["first_name"] = f"first_name {key}"
    out["custom"] = {"Region": f"Region {key}", "region": f"region {key}"}
    return out


def _names(resources: list[str], resource: str) -> bool:
    """Whether a config's list of resources (["*"]: all of them) names this one."""
    return resource in resources or "*" in resources


def _empty_stats(resources: list[str]) -> dict[str, dict]:
    # Keyed by the served resources only, so stats without invoices look exactly as they always did.
    return {
        "requests": {r: 0 for r in resources},  # every /v1 request, whatever the outcome
        "records_served": {r: 0 for r in resources},  # records in well-formed 200 pages
        "count_requests": {r: 0 for r in resources},  # size=0 requests
        "statuses": {r: {} for r in resources},  # resource -> {"200": n, "429": n, "drop": n, ...}
        "peak_in_flight": 0,  # the most /v1 requests being answered at once
    }


class _Reply(Exception):
    """Raised inside request handling to answer with a given status and body."""

    def __init__(self, status: int, body: bytes, ctype: str = "application/json", headers=()):
        super().__init__(status)
        self.status, self.body, self.ctype, self.headers = status, body, ctype, list(headers)


def _error(status: int, message: str, headers=()) -> _Reply:
    return _Reply(status, _dumps({"error": message}), headers=headers)


def _int_param(params: dict[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise _error(400, f"parameter {name!r} must be a non-negative integer") from None
    if value < 0:
        raise _error(400, f"parameter {name!r} must be a non-negative integer")
    return value


class CrmSimulator:
    """A local CRM API. ``CrmSimulator(SimulatorConfig(...)).start()``; ``.url``; ``.stop()``."""

    def __init__(self, config: Optional[SimulatorConfig] = None):
        config = copy.deepcopy(config) if config is not None else SimulatorConfig()
        given = config.counts
        config.counts = {r: int(given.get(r, DEFAULT_COUNTS[r])) for r in RESOURCES}
        config.counts.update({r: int(given[r]) for r in OPTIONAL_RESOURCES if r in given})
        _check_config(config)
        account_configs = _account_configs(config)
        self._initial = copy.deepcopy(config)  # what /_admin/reset goes back to
        self.config = config
        self._lock = threading.RLock()
        self._store = Store(config.seed, config.counts, config.key_field, config.id_prefix)
        # name -> (path, records key) of what this simulator serves; any other path is a 404.
        self.resources: dict[str, tuple[str, str]] = {
            r: (config.paths.get(r, KNOWN_RESOURCES[r][0]), KNOWN_RESOURCES[r][1]) for r in _served(config)
        }
        self._paths = {path: (name, key) for name, (path, key) in self.resources.items()}
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._conns: set[socket.socket] = set()
        self._reset_runtime()
        # Each account is a simulator of its own without a server: this one's handler routes
        # /<name>/... to it, so it has its own lock, data, stats and config.
        self._accounts: dict[str, SimulatedAccount] = {
            name: SimulatedAccount(self, name, c) for name, c in account_configs.items()}

    # ------------------------------------------------------------------ accounts
    @property
    def accounts(self) -> list[str]:
        """The account names this simulator serves (none: it serves one account at the root)."""
        return list(self._accounts)

    def account(self, name: str) -> "SimulatedAccount":
        """Account `name`, with the test helpers of a simulator: configure, mutate, ids, records,
        stats, reset, url."""
        try:
            return self._accounts[name]
        except KeyError:
            raise ValueError(f"no account {name!r}; accounts: {self.accounts}") from None

    def account_url(self, name: str) -> str:
        """The base URL of account `name`: its API is at account_url(name) + "/v1/jobs"."""
        return self.account(name).url

    def _single(self, what: str) -> None:
        if self._accounts:
            raise ValueError(f"this simulator serves accounts {self.accounts}: use account(name).{what}")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "CrmSimulator":
        if self._server is not None:
            return self
        self._index_for_reads()
        self._storm_until = time.monotonic() + self.config.storm_seconds if self.config.storm_seconds else 0.0
        server_cls = _Server6 if ":" in self.config.host else _Server
        self._server = server_cls((self.config.host, self.config.port), _Handler)
        self._server.sim = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="crm-simulator", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("simulator is not started")
        host, port = self._server.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Kept-alive connections would otherwise keep being served by their handler threads.
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "CrmSimulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ admin (Python API)
    def configure(self, **kw: Any) -> dict[str, Any]:
        """Apply live config changes; returns the live config. With accounts: to every account,
        and returns {name: live config}."""
        unknown = set(kw) - set(LIVE_FIELDS)
        if unknown:
            raise ValueError(f"not live-configurable: {sorted(unknown)}; allowed: {list(LIVE_FIELDS)}")
        if self._accounts:
            return {name: a.configure(**kw) for name, a in self._accounts.items()}
        with self._lock:
            new = dataclasses.replace(self.config, **copy.deepcopy(kw))
            _check_config(new)
            self.config = new
            if "fault_every" in kw or "fault_kinds" in kw:
                self._fault_counters = {r: 0 for r in self.resources}  # restart the cycle predictably
            if "drift_every" in kw:
                self._drift = {}
            if "storm_seconds" in kw:
                self._storm_until = time.monotonic() + new.storm_seconds if new.storm_seconds else 0.0
            if {"repeat_every", "insert_every", "delete_every"} & set(kw):
                self._pages = {r: 0 for r in self.resources}
            return self._live_config()

    def mutate(self, resource: str, edit: int = 0, insert: int = 0, deactivate: int = 0,
               add_field: Optional[dict] = None, null_cursor: Optional[int] = None,
               missing_cursor: Optional[int] = None, silent_edit: Optional[int] = None,
               delete: Optional[int] = None, dated_ahead: Optional[int] = None) -> dict[str, list[str]]:
        """See Store.mutate: the kinds, and the reply's keys (the last five only when given)."""
        self._single("mutate")
        with self._lock:
            return self._store.mutate(resource, edit=edit, insert=insert, deactivate=deactivate,
                                      add_field=add_field, null_cursor=null_cursor,
                                      missing_cursor=missing_cursor, silent_edit=silent_edit,
                                      delete=delete, dated_ahead=dated_ahead)

    def reset(self) -> None:
        """Back to the seeded data and the config given at construction; clears stats. With
        accounts: every account."""
        for a in self._accounts.values():
            a.reset()
        with self._lock:
            self.config = copy.deepcopy(self._initial)
            self._store.reset()
            self._reset_runtime()
            self._index_for_reads()

    def stats(self) -> dict[str, dict]:
        """Requests, statuses and records served per resource. With accounts: {name: stats}."""
        if self._accounts:
            return {name: a.stats() for name, a in self._accounts.items()}
        with self._lock:
            return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        for a in self._accounts.values():
            a.reset_stats()
        with self._lock:
            self._stats = _empty_stats(list(self.resources))

    def ids(self, resource: str) -> list[str]:
        """All current ids of a resource, in (date_created, id) order."""
        self._single("ids")
        ds = self._dataset(resource)
        with self._lock:
            return [ds.record_id(i) for i in ds.order_by("date_created")[1]]

    def ids_ever(self, resource: str) -> set[str]:
        """Every id the resource has had, hard-deleted ones included."""
        self._single("ids_ever")
        ds = self._dataset(resource)
        with self._lock:
            return {ds.record_id(i) for i in range(ds.total)}

    def records(self, resource: str) -> list[dict[str, Any]]:
        """All current records of a resource (copies), in (date_created, id) order."""
        self._single("records")
        ds = self._dataset(resource)
        with self._lock:
            records = [copy.deepcopy(ds.get(i)) for i in ds.order_by("date_created")[1]]
            if _names(self.config.colliding_fields, resource):
                records = [with_colliding_fields(r) for r in records]
            return records

    # ------------------------------------------------------------------ internals
    def _index_for_reads(self) -> None:
        """Sort every resource on date_updated now, not on the first request (clients read in
        that order; at a million records the sort takes seconds)."""
        if self._accounts:  # each account sorts its own on its first request: 100 start at once
            return
        with self._lock:
            for ds in self._store.datasets.values():
                ds.order_by("date_updated")

    def _reset_runtime(self) -> None:
        self._stats = _empty_stats(list(self.resources))
        self._in_flight = 0
        self._storm_until = 0.0  # time.monotonic() until which every data request answers 429
        self._fault_counters = {r: 0 for r in self.resources}
        self._drift: dict[tuple, Drift] = {}
        self._pages = {r: 0 for r in self.resources}  # data pages served, for the adversary's cadence
        self._deletes = {r: 0 for r in self.resources}
        self._last_served: dict[str, dict] = {}
        self._random = random.Random(self.config.seed)

    def _dataset(self, resource: str):
        if resource not in self.resources:
            raise ValueError(f"unknown resource {resource!r}; known: {list(self.resources)}")
        return self._store.datasets[resource]

    def _live_config(self) -> dict[str, Any]:
        return {k: copy.deepcopy(getattr(self.config, k)) for k in LIVE_FIELDS}

    def _count(self, resource: str, status: str, records: int = 0) -> None:
        with self._lock:
            st = self._stats["statuses"][resource]
            st[status] = st.get(status, 0) + 1
            self._stats["records_served"][resource] += records

    # -- the API proper ------------------------------------------------------
    def _serve_counted(self, h: "_Handler", resource: str, key: str, params: dict[str, str]) -> Optional[_Reply]:
        with self._lock:
            self._in_flight += 1
            self._stats["peak_in_flight"] = max(self._stats["peak_in_flight"], self._in_flight)
        try:
            return self._serve_data(h, resource, key, params)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _serve_data(self, h: "_Handler", resource: str, key: str, params: dict[str, str]) -> Optional[_Reply]:
        """Answer a /v1 listing; returns None when the connection must be dropped."""
        cfg = self.config  # one consistent snapshot for the whole request
        with self._lock:
            self._stats["requests"][resource] += 1
        if cfg.latency_ms:
            time.sleep(cfg.latency_ms / 1000)

        supplied = h.headers.get("Authorization", "")
        expected = f"Bearer {cfg.api_key}"
        if cfg.revoked or not hmac.compare_digest(supplied.encode("utf-8", "replace"), expected.encode("utf-8")):
            return _error(401, "missing or invalid API key" if supplied else "missing Authorization header")
        if resource in cfg.forbidden:
            return _error(403, f"this API key has no access to {resource}")
        if resource in cfg.fail_resources:
            return self._fault_reply(str(cfg.fail_resources[resource]), cfg)
        if time.monotonic() < self._storm_until:
            return self._fault_reply("429", cfg)

        start = 0 if _names(cfg.ignore_from, resource) else _int_param(params, "from", 0)
        size = _int_param(params, "size", cfg.default_size)
        if start + size > cfg.result_window:
            return _error(400, f"result window is too large, from + size must be less than or equal to: "
                               f"[{cfg.result_window}] but was [{start + size}]. See the scroll api for a "
                               f"more efficient way to request large data sets.")
        if _names(cfg.ignore_filter, resource):
            bounds = NO_BOUNDS
        else:
            try:
                bounds = parse_filter(params.get("filter"), exclusive=_names(cfg.exclusive_bounds, resource))
            except QueryError as exc:
                return _error(400, str(exc))
        if _names(cfg.ignore_sort, resource):
            sort_field, direction = cfg.default_sort_field, cfg.default_sort_direction
        else:
            sort_field = params.get("sort_field", cfg.default_sort_field)
            direction = params.get("sort_direction", cfg.default_sort_direction)
            if sort_field not in SORT_FIELDS:
                return _error(400, f"sort_field must be one of {list(SORT_FIELDS)}")
            if direction not in DIRECTIONS:
                return _error(400, f"sort_direction must be one of {list(DIRECTIONS)}")
        # Top-level keys only; `fields=` naming nothing is the whole record, as no parameter is.
        fields = {f.strip() for f in params.get("fields", "").split(",")} - {""} if cfg.fields_param else None

        with self._lock:
            if size == 0:
                self._stats["count_requests"][resource] += 1
            elif cfg.fault_every:
                # Deterministic faults: the N-th, 2N-th, ... data request gets the next fault kind;
                # the request after it (the client's retry) is served normally.
                n = self._fault_counters[resource] = self._fault_counters[resource] + 1
                if n % cfg.fault_every == 0:
                    kind = cfg.fault_kinds[(n // cfg.fault_every - 1) % len(cfg.fault_kinds)]
                    return self._fault_reply(kind, cfg)

            ds = self._store.datasets[resource]
            cap = cfg.page_caps.get(resource, cfg.page_cap)
            take = min(size, cfg.max_size, cap if cap is not None else size)
            repeat = False
            if size > 0:
                n = self._pages[resource] = self._pages[resource] + 1
                self._change_listing(resource, ds, cfg, n, bounds, sort_field, direction == "desc", start)
                repeat = bool(cfg.repeat_every and n % cfg.repeat_every == 0 and take >= 2
                              and resource in self._last_served)
            listing = plan(ds, bounds, sort_field, direction == "desc")
            lkey = (resource, bounds, sort_field, direction)
            drift = self._drift.get(lkey)
            if size > 0 and start == 0:  # a listing (re)starts: forget its shift
                self._drift.pop(lkey, None)
                drift = None
            elif size > 0 and cfg.drift_every:
                drift = self._drift.setdefault(lkey, Drift())
                drift.pages += 1
                count_now = len(listing) + len(drift.events)
                # take >= 2: a page made only of the duplicate would never let the client progress.
                if drift.pages % cfg.drift_every == 0 and start < count_now and take >= 2:
                    drift.events.append(start)
            count = len(listing) + (len(drift.events) if drift else 0)
            records = []
            for v in range(start, min(start + take - repeat, count)):
                real = drift.to_real(v) if drift else v
                if 0 <= real < len(listing):
                    records.append(ds.get(listing.at(real)))
            if repeat:  # the previous page's last record again at the head; nothing shifted
                records.insert(0, self._last_served[resource])
            if records:
                self._last_served[resource] = records[-1]
            if cfg.count_capped:
                count = min(count, cfg.result_window)
            if _names(cfg.page_count, resource):
                count = len(records)

        if _names(cfg.colliding_fields, resource):
            records = [with_colliding_fields(r) for r in records]
        if fields:  # a key the record lacks stays absent
            records = [{k: v for k, v in r.items() if k in fields} for r in records]
        corrupt = cfg.corrupt.get(resource) if size > 0 else None
        if corrupt == "html":
            return _Reply(200, b"<!DOCTYPE html><html><body><h1>Maintenance</h1></body></html>", "text/html")
        if corrupt == "no_key":
            return _Reply(200, _dumps({"count": count, "data": records}))
        body = _dumps({"count": count, key: records})
        if corrupt == "truncated":
            return _Reply(200, body[: max(1, len(body) // 2)])
        h.records_in_reply = len(records)
        return _Reply(200, body)

    def _change_listing(self, resource: str, ds, cfg: SimulatorConfig, n: int, bounds, sort_field: str,
                        desc: bool, start: int) -> None:
        """The adversary's change before the n-th page of a resource, if one is due."""
        rng = self._random
        live = ds.total - len(ds.deleted)
        if cfg.insert_every and n % cfg.insert_every == 0 and live:
            a, b = self._random_live(ds), self._random_live(ds)
            updated = ds.date_updated(b)
            # b without a date_updated (mutate's null_cursor, missing_cursor): then the new record
            # is an import never edited since, updated when it was created.
            ds.insert_anywhere(ds.date_created(a), ds.date_created(a) if updated is None else updated)
        if cfg.delete_every and n % cfg.delete_every == 0 and live > 1:
            self._deletes[resource] += 1
            listing = plan(ds, bounds, sort_field, desc)
            before = self._deletes[resource] % 2 == 1
            if before and 0 < start <= len(listing):
                victim = listing.at(rng.randrange(start))
            elif not before and start < len(listing):
                victim = listing.at(rng.randrange(start, len(listing)))
            else:  # nothing on that side of `from` in this listing: anywhere in the resource
                victim = self._random_live(ds)
            ds.delete(victim)

    def _random_live(self, ds) -> int:
        while True:
            i = self._random.randrange(ds.total)
            if i not in ds.deleted:
                return i

    def _fault_reply(self, kind: str, cfg: SimulatorConfig) -> Optional[_Reply]:
        if kind == "drop":
            return None
        status = int(kind)
        if status == 502:  # gateways answer in HTML, not JSON
            return _Reply(502, _HTML_502, "text/html")
        if status == 429:
            return _error(429, "rate limit exceeded", headers=[("Retry-After", str(cfg.retry_after))])
        return _error(status, f"simulated error {status}")

    # -- admin ----------------------------------------------------------------
    def _serve_admin(self, method: str, path: str, params: dict[str, str], body: Any) -> _Reply:
        route = (method, path)
        if self._accounts:  # the routes about every account; the rest are each account's own
            if route == ("GET", "/_admin/accounts"):
                return _Reply(200, _dumps({"accounts": self.accounts}))
            if route == ("GET", "/_admin/config"):
                return _Reply(200, _dumps({name: a._live_config() for name, a in self._accounts.items()}))
            if route not in {("GET", "/_admin/stats"), ("POST", "/_admin/stats/reset"),
                             ("POST", "/_admin/config"), ("POST", "/_admin/reset")}:
                return _error(404, f"no admin route {method} {path} for all accounts: "
                                   f"/<account>/_admin/... serves one account's")
        if route == ("GET", "/_admin/stats"):
            return _Reply(200, _dumps(self.stats()))
        if route == ("POST", "/_admin/stats/reset"):
            self.reset_stats()
            return _Reply(200, _dumps({"ok": True}))
        if route == ("GET", "/_admin/config"):
            with self._lock:
                return _Reply(200, _dumps(self._live_config()))
        if route == ("POST", "/_admin/config"):
            if not isinstance(body, dict):
                return _error(400, "expected a JSON object")
            return _Reply(200, _dumps(self.configure(**body)))
        if route == ("POST", "/_admin/mutate"):
            if not isinstance(body, dict) or "resource" not in body:
                return _error(400, 'expected {"resource": ..., "edit": n, "insert": n, "deactivate": n}')
            args = {k: body[k] for k in ("edit", "insert", "deactivate", "null_cursor", "missing_cursor",
                                         "silent_edit", "delete", "dated_ahead") if k in body}
            for k, v in args.items():
                if not isinstance(v, int) or isinstance(v, bool):
                    return _error(400, f"{k} must be an integer")
            return _Reply(200, _dumps(self.mutate(body["resource"], add_field=body.get("add_field"), **args)))
        if route == ("POST", "/_admin/reset"):
            self.reset()
            return _Reply(200, _dumps({"ok": True}))
        if route == ("GET", "/_admin/ids"):
            resource = params.get("resource", "")
            ds = self._dataset(resource)
            with self._lock:
                recs = [ds.get(i) for i in ds.order_by("date_created")[1]]
                key = ds.key_field  # "id" or "jnid"; the reply's shape is the same either way
                return _Reply(200, _dumps({"ids": [r[key] for r in recs],
                                           "active": {r[key]: r["is_active"] for r in recs}}))
        if route == ("GET", "/_admin/records"):
            resource = params.get("resource", "")
            self._dataset(resource)
            with self._lock:
                ds = self._store.datasets[resource]
                recs = [ds.get(i) for i in ds.order_by("date_created")[1]]
                body_bytes = _dumps({"count": len(recs), "records": recs})
            return _Reply(200, body_bytes)
        return _error(404, f"no admin route {method} {path}")


class SimulatedAccount(CrmSimulator):
    """One account of a simulator serving many (SimulatorConfig.accounts): the test helpers of a
    simulator (configure, mutate, ids, records, stats, reset), served by that simulator under
    /<name>; it has no server of its own."""

    def __init__(self, server: CrmSimulator, name: str, config: SimulatorConfig):
        super().__init__(config)
        self.name = name
        self._server_of = server

    def start(self) -> "SimulatedAccount":
        raise RuntimeError(f"account {self.name!r} is served by its simulator: start that one")

    @property
    def url(self) -> str:
        return f"{self._server_of.url}/{self.name}"

    def _index_for_reads(self) -> None:
        pass  # its first request sorts its records: a hundred accounts start in no time


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries Content-Length
    server_version = "CrmSimulator/1.0"
    disable_nagle_algorithm = True  # small replies on kept-alive connections: no Nagle delays
    records_in_reply = 0
    target: Optional[CrmSimulator] = None  # the account a request is for (the simulator: no accounts)

    @property
    def sim(self) -> CrmSimulator:
        return self.server.sim  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.sim._lock:
            self.sim._conns.add(self.connection)

    def finish(self) -> None:
        with self.sim._lock:
            self.sim._conns.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self.records_in_reply = 0
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        # First value wins for repeated params; blank values are kept (so "from=" is a 400).
        params = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        resource = None
        target: Optional[CrmSimulator] = self.sim
        if self.sim._accounts and not path.startswith("/_admin/"):  # /<account>/v1/jobs, /<account>/_admin/...
            name, _, rest = path[1:].partition("/")
            target, path = self.sim._accounts.get(name), "/" + rest
        self.target = target
        try:
            if target is None:
                reply: Optional[_Reply] = _error(404, f"no such account: {name!r}")
            elif path in target._paths:
                resource, key = target._paths[path]
                if method != "GET":
                    reply = _error(405, "method not allowed")
                else:
                    reply = target._serve_counted(self, resource, key, params)
            elif path.startswith("/_admin/"):
                try:
                    body = json.loads(raw) if raw.strip() else {}
                except ValueError:
                    raise _error(400, "request body is not valid JSON") from None
                reply = target._serve_admin(method, path, params, body)
            else:
                reply = _error(404, f"no such endpoint: {path}")
        except _Reply as r:
            reply = r
        except (ValueError, TypeError) as exc:  # bad admin input (e.g. unknown resource)
            reply = _error(400, str(exc))
        except Exception as exc:  # a simulator bug: say so loudly, on stderr and in the reply
            traceback.print_exc(file=sys.stderr)
            reply = _error(500, f"internal simulator error: {type(exc).__name__}: {exc}")

        if reply is None:  # "drop": close the connection without any response
            if resource:
                target._count(resource, "drop")
            self.close_connection = True
            self.log_message('"%s" dropped', self.requestline)
            return
        if resource:
            ok_page = reply.status == 200 and reply.ctype == "application/json"
            target._count(resource, str(reply.status), self.records_in_reply if ok_page else 0)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.ctype)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # Only the request line and status are logged; never headers (the Authorization token).
        if (self.target or self.sim).config.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class _Server6(_Server):
    address_family = socket.AF_INET6
