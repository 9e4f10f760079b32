"""The audit's reads of the API: a listing of every resource, and reads of the ranges that hold
the records the warehouse lacks. No Dagster and no warehouse here (sources/audit.py compares and
repairs).

The listing is the sync's own read of a whole resource (`ReadPlan(since=None)`, reach.py: the
probe for records without a cursor, their `date_created` ranges, then the keyset read), so it has
the same proof of completeness. Where the API honours a field selection it asks only for
`fields=<primary key>,date_updated,date_created` (and `is_active` under `hard_delete`): the read
needs the three, the comparison the first two. `SOURCES__CRM__AUDIT_FIELDS=false` leaves the
parameter out; an API that ignores it answers whole records, and the audit then has every record
in hand anyway.

Both reads are dlt resources of the `crm` source built like the sync's (`_resource_config`,
`crm_resources`: same tables, hints and processing steps) but without the incremental cursor, so
the sync's cursor state is not touched. Right after the read, `AuditPages` notes every record's
key and `date_updated` in a `Listing` and passes on only whole records (of the wanted keys, for a
repair read): a field-selected record must never reach a table, where it would blank every other
column.
"""

from __future__ import annotations

import bisect
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import dlt
import requests
from dlt.common.configuration.inject import with_config
from dlt.extract.items_transform import ItemTransform
from dlt.sources import DltResource

from . import _resource_config, crm_resources, crm_session
from .catalog import Endpoint, build_endpoints
from .config import check_settings
from .errors import CrmConfigurationError
from .keyset import KeysetRead, PageRequest
from .paginator import UPDATED_SINCE_PARAM, KeysetPaginator
from .settings import BACKOFF_FACTOR, CREATED_FIELD, CURSOR_FIELD, MAX_RETRIES, REQUEST_TIMEOUT, RESULT_WINDOW

# The share of a table's (unmarked) rows one audit may mark or remove; more stops the audit for
# that table, which is left unchanged: a wrong key or an empty answer must not wipe a warehouse.
DEFAULT_MAX_GONE_SHARE = 0.1
MAX_GONE_SHARE_SETTING = "SOURCES__CRM__AUDIT_MAX_GONE_SHARE"
FIELDS_SETTING = "SOURCES__CRM__AUDIT_FIELDS"
FIELDS_PARAM = "fields"


@dataclass(frozen=True)
class AuditSettings:
    endpoints: tuple[Endpoint, ...]
    base_url: str
    api_key: str
    hard_delete: bool = False
    schema_contract: Optional[str] = None
    arrow_pages: bool = True
    audit_fields: bool = True
    audit_max_gone_share: float = DEFAULT_MAX_GONE_SHARE
    max_retries: int = MAX_RETRIES
    backoff_factor: float = BACKOFF_FACTOR
    request_timeout: float = REQUEST_TIMEOUT


@with_config(sections=("sources", "crm"))
def audit_settings(
    base_url: Optional[str] = dlt.config.value,
    api_key: Optional[str] = dlt.secrets.value,
    page_sizes: Optional[dict[str, int]] = None,
    primary_key: Optional[str] = None,
    resources: Optional[dict[str, Any]] = None,
    hard_delete: bool = False,
    schema_contract: Optional[str] = None,
    arrow_pages: bool = True,
    audit_fields: bool = True,
    audit_max_gone_share: float = DEFAULT_MAX_GONE_SHARE,
    max_retries: int = MAX_RETRIES,
    backoff_factor: float = BACKOFF_FACTOR,
    request_timeout: float = REQUEST_TIMEOUT,
    result_window: Optional[int] = None,
) -> AuditSettings:
    """The source's settings (the same `[sources.crm]` ones a sync reads) and the audit's own,
    checked."""
    endpoints = build_endpoints(primary_key, resources, page_sizes, result_window)
    root = check_settings(base_url, api_key)
    share = audit_max_gone_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise CrmConfigurationError(
            f"audit_max_gone_share must be a share between 0 and 1 (0.1: a tenth of a table), got "
            f"{share!r}: set {MAX_GONE_SHARE_SETTING}"
        )
    crm_session(endpoints, schema_contract, max_retries, backoff_factor, request_timeout)  # checks them
    return AuditSettings(
        endpoints, root, str(api_key), bool(hard_delete), schema_contract, bool(arrow_pages),
        bool(audit_fields), float(share), max_retries, backoff_factor, request_timeout,
    )


def listing_fields(endpoint: Endpoint, hard_delete: bool) -> tuple[str, ...]:
    """The fields the listing asks for: the read needs all three; under `hard_delete` a record
    listed as inactive belongs to no table, so the audit must see `is_active` too."""
    fields = (endpoint.primary_key, CURSOR_FIELD, CREATED_FIELD)
    return fields + ("is_active",) if hard_delete else fields


class Listing:
    """What the API listed for one resource: key -> `date_updated` (None: the record has none),
    the `date_created` of records without one, the keys listed as inactive, and whether any page
    came back whole (the API ignored the field selection)."""

    def __init__(self, resource: str, key_field: str) -> None:
        self.resource = resource
        self.key_field = key_field
        self.updated: dict[str, Optional[int]] = {}
        self.created_without_cursor: dict[str, int] = {}
        # every listed record's date_created: how many records a date_created range holds
        self.created_seconds = array("q")
        self.inactive: set[str] = set()
        self.whole_records = 0
        self.partial_records = 0
        self.kept = 0  # records passed on to the table
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> "Listing":
        return self  # dlt may copy the resources; the listing is filled where it was made

    def note(self, records: Sequence[dict[str, Any]], asked: frozenset[str]) -> list[bool]:
        """Note a page's records; returns, for each, whether it is whole."""
        key_field, whole = self.key_field, []
        with self._lock:
            for record in records:
                key = record.get(key_field)
                if type(key) is not str:
                    whole.append(False)
                    continue
                updated = record.get(CURSOR_FIELD)
                updated = updated if type(updated) is int else None
                self.updated[key] = updated
                created = record.get(CREATED_FIELD)
                if type(created) is int:
                    self.created_seconds.append(created)
                    if updated is None:
                        self.created_without_cursor[key] = created
                if record.get("is_active") is False:
                    self.inactive.add(key)
                else:
                    self.inactive.discard(key)
                is_whole = not record.keys() <= asked
                whole.append(is_whole)
            count = sum(whole)
            self.whole_records += count
            self.partial_records += len(whole) - count
        return whole


class AuditPages(ItemTransform):  # type: ignore[type-arg]
    """The step right after the read: notes every record in the `Listing`, passes on the whole
    ones (only `wanted` keys, when given), drops the field-selected ones."""

    def __init__(self, listing: Listing, asked: Iterable[str], wanted: Optional[set[str]] = None) -> None:
        super().__init__(lambda item: item)
        self.listing = listing
        self.asked = frozenset(asked)
        self.wanted = wanted

    def __deepcopy__(self, memo: dict) -> "AuditPages":
        return self

    def __call__(self, item: Any, meta: Any = None) -> Any:
        if not isinstance(item, list):
            item = [item]
        records = [record for record in item if isinstance(record, dict)]
        whole = self.listing.note(records, self.asked)
        key_field, wanted = self.listing.key_field, self.wanted
        kept = [
            record for record, is_whole in zip(records, whole)
            if is_whole and (wanted is None or record.get(key_field) in wanted)
        ]
        with self.listing._lock:
            self.listing.kept += len(kept)
        return kept or None


# -- the repair's reads: ranges of date_updated (and of date_created for records without one) --

Range = tuple[str, int, int]  # (field, lowest, highest), inclusive


class RangeReads:
    """One keyset read per range, one after the other; the plan interface `KeysetPaginator`
    drives (request, take, done, requests, records_read, describe), as `ReadPlan`'s."""

    def __init__(self, resource: str, page_size: int, ranges: Sequence[Range], *, result_window: int,
                 key_field: str) -> None:
        self.resource = resource
        self.reads = [
            KeysetRead(
                resource, page_size, since=lowest, until=highest, result_window=result_window,
                cursor_field=field_, tie_field=CREATED_FIELD if field_ == CURSOR_FIELD else None,
                key_field=key_field,
            )
            for field_, lowest, highest in ranges
        ]
        self.key_field = key_field
        self._at = 0
        self._last_served: Any = None
        self.done = not self.reads

    @property
    def requests(self) -> int:
        return sum(read.requests for read in self.reads)

    @property
    def records_read(self) -> int:
        return sum(read.records_read for read in self.reads)

    @property
    def newest_second(self) -> None:
        return None  # ranges read again for a repair say nothing of the incremental cursor

    def request(self) -> PageRequest:
        return self.reads[self._at].request()

    def describe(self) -> str:
        return self.reads[self._at].describe() if not self.done else "done"

    def take(self, records: Sequence[dict[str, Any]], count: int) -> None:
        head_repeated = bool(records) and records[0].get(self.key_field) == self._last_served
        if records:
            self._last_served = records[-1].get(self.key_field)
        read = self.reads[self._at]
        read.take(records, count, head_repeated)
        if read.done:
            self._at += 1
            self.done = self._at >= len(self.reads)


class RangePaginator(KeysetPaginator):
    """`KeysetPaginator` reading given ranges instead of the whole resource."""

    def __init__(self, resource: str, page_size: int, ranges: Sequence[Range],
                 result_window: int = RESULT_WINDOW, key_field: str = "id") -> None:
        super().__init__(resource, page_size, result_window=result_window, key_field=key_field)
        self.ranges = tuple(ranges)

    def init_request(self, request: requests.Request) -> None:
        params = request.params if isinstance(request.params, dict) else {}
        params.pop(UPDATED_SINCE_PARAM, None)
        self.plan = RangeReads(  # type: ignore[assignment]
            self.resource, self.page_size, self.ranges, result_window=self.result_window,
            key_field=self.key_field,
        )
        self._has_next_page = not self.plan.done
        request.params = params
        self.update_request(request)


def group_seconds(wanted: Iterable[int], listed_sorted: Sequence[int], page_size: int) -> list[tuple[int, int]]:
    """Ranges covering the `wanted` seconds. Two neighbours share a range while at most a page of
    other listed records lies between them (`listed_sorted`: every listed second, sorted): reading
    them costs less than a read of its own."""
    ranges: list[tuple[int, int]] = []
    for second in sorted(set(wanted)):
        if ranges:
            low, high = ranges[-1]
            between = bisect.bisect_left(listed_sorted, second) - bisect.bisect_right(listed_sorted, high)
            if between <= page_size:
                ranges[-1] = (low, second)
                continue
        ranges.append((second, second))
    return ranges


def repair_ranges(listing: Listing, keys: Iterable[str], page_size: int) -> list[Range]:
    """The ranges to read again for `keys` of the listing: their `date_updated` seconds, grouped;
    records without one by their `date_created`."""
    updated, created = [], []
    for key in keys:
        value = listing.updated.get(key)
        if value is not None:
            updated.append(value)
        elif key in listing.created_without_cursor:
            created.append(listing.created_without_cursor[key])
    ranges: list[Range] = []
    if updated:
        listed = sorted(v for v in listing.updated.values() if v is not None)
        ranges += [(CURSOR_FIELD, low, high) for low, high in group_seconds(updated, listed, page_size)]
    if created:  # a date_created range holds records with a cursor too: every listed one counts
        listed = sorted(listing.created_seconds)
        ranges += [(CREATED_FIELD, low, high) for low, high in group_seconds(created, listed, page_size)]
    return ranges


@dataclass
class AuditRead:
    """A source of the audit's reads, and the listings its pages fill."""

    source: Any
    listings: dict[str, Listing] = field(default_factory=dict)


def audit_source(
    settings: AuditSettings,
    endpoints: Sequence[Endpoint],
    *,
    ranges: Optional[dict[str, list[Range]]] = None,
    wanted: Optional[dict[str, set[str]]] = None,
) -> AuditRead:
    """The `crm` source reading `endpoints` for the audit: their whole listing, or (`ranges`) only
    the given ranges, keeping the `wanted` keys."""
    session = crm_session(
        settings.endpoints, settings.schema_contract, settings.max_retries, settings.backoff_factor,
        settings.request_timeout,
    )
    configs, steps, listings = [], {}, {}
    for endpoint in endpoints:
        asked = listing_fields(endpoint, settings.hard_delete)
        params = {FIELDS_PARAM: ",".join(asked)} if settings.audit_fields else {}
        if ranges is None:
            paginator = KeysetPaginator.of(endpoint)
        else:
            paginator = RangePaginator(
                endpoint.name, endpoint.read_size, ranges[endpoint.name],
                result_window=endpoint.result_window, key_field=endpoint.primary_key,
            )
            params = {}  # whole records: they are what the repair loads
        configs.append(_resource_config(
            endpoint, settings.hard_delete, settings.schema_contract, incremental=False,
            paginator=paginator, params=params,
        ))
        listing = listings[endpoint.name] = Listing(endpoint.name, endpoint.primary_key)
        steps[endpoint.name] = AuditPages(
            listing, asked if params else (), None if wanted is None else wanted[endpoint.name]
        )

    @dlt.source(name="crm", section="crm")
    def crm_audit() -> Iterator[DltResource]:
        yield from crm_resources(
            settings.base_url, settings.api_key, session, configs, arrow_pages=settings.arrow_pages,
            first_steps=steps,
        )

    return AuditRead(crm_audit(), listings)
