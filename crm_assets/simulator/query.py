"""Filter parsing, query planning and the offset-drift model.

A query is reduced to integer half-open bounds ``[lo, hi)`` per date field plus a sort.  The common
case (date_created bounds only, sorted on date_created, in an ``ordered`` dataset) becomes an index
range found by binary search, because index order == (date_created, id) order (see data.py).
Otherwise the dataset's order on the sort field (built once per dataset version) is cut by binary
search on that field's bounds and filtered on the other's; the result is cached per query.

A record without a date_updated (null or absent) is treated as Elasticsearch treats a missing
value: no range on date_updated matches it, and a listing sorted on date_updated serves it after
every record with a value, in both directions (``missing: _last``), ties broken on id in the
listing's direction like any other tie.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from typing import Any, Optional, Sequence

from .data import Dataset

FIELDS = ("date_created", "date_updated")
SORT_FIELDS = FIELDS
DIRECTIONS = ("asc", "desc")
Bounds = tuple[tuple[Optional[int], Optional[int]], tuple[Optional[int], Optional[int]]]
NO_BOUNDS: Bounds = ((None, None), (None, None))
_CACHE_SIZE = 16


class QueryError(ValueError):
    """A bad request parameter; the server answers 400 with this message."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# An API whose inclusive bounds exclude their own value
EXCLUSIVE = {"gte": "gt", "lte": "lt"}


def parse_filter(text: Optional[str], exclusive: bool = False) -> Bounds:
    """``{"must":[{"range":{"date_updated":{"gte":1700000000}}}, ...]}`` -> integer bounds.
    `exclusive`: read `gte` as `gt` and `lte` as `lt`, as an API that gets them wrong does."""
    read_as = EXCLUSIVE if exclusive else {}
    if text is None or text.strip() == "":
        return NO_BOUNDS
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise QueryError(f"filter is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise QueryError("filter must be a JSON object")
    unknown = set(doc) - {"must"}
    if unknown:
        raise QueryError(f"unsupported filter keys: {sorted(unknown)}")
    clauses = doc.get("must", [])
    if isinstance(clauses, dict):  # Elasticsearch accepts a single clause without the list
        clauses = [clauses]
    if not isinstance(clauses, list):
        raise QueryError("filter.must must be a list of clauses")
    bounds = {f: [None, None] for f in FIELDS}

    def tighten(field: str, lo: Optional[int] = None, hi: Optional[int] = None) -> None:
        b = bounds[field]
        if lo is not None:
            b[0] = lo if b[0] is None else max(b[0], lo)
        if hi is not None:
            b[1] = hi if b[1] is None else min(b[1], hi)

    for clause in clauses:
        if not isinstance(clause, dict) or set(clause) != {"range"} or not isinstance(clause["range"], dict):
            raise QueryError(f"unsupported filter clause (only range is supported): {json.dumps(clause)}")
        for field, ops in clause["range"].items():
            if field not in FIELDS:
                raise QueryError(f"range filter on unsupported field {field!r}; use one of {list(FIELDS)}")
            if not isinstance(ops, dict) or not ops:
                raise QueryError(f"range on {field} needs operators gte/gt/lte/lt")
            for op, value in ops.items():
                if not _is_number(value):
                    raise QueryError(f"range {field}.{op} must be a number, got {json.dumps(value)}")
                # Fields hold integers, so every operator becomes an integer half-open bound.
                op = read_as.get(op, op)
                if op == "gte":
                    tighten(field, lo=math.ceil(value))
                elif op == "gt":
                    tighten(field, lo=math.floor(value) + 1)
                elif op == "lte":
                    tighten(field, hi=math.floor(value) + 1)
                elif op == "lt":
                    tighten(field, hi=math.ceil(value))
                else:
                    raise QueryError(f"unsupported range operator {op!r}; use gte, gt, lte or lt")
    return (tuple(bounds["date_created"]), tuple(bounds["date_updated"]))  # type: ignore[return-value]


class IndexRange:
    """Records lo..hi-1 in index order (or reversed): the fast path, O(1) per position."""

    def __init__(self, lo: int, hi: int, desc: bool):
        self.lo, self.hi, self.desc = lo, max(lo, hi), desc

    def __len__(self) -> int:
        return self.hi - self.lo

    def at(self, pos: int) -> int:
        return self.hi - 1 - pos if self.desc else self.lo + pos


class IndexList:
    """An explicit (cached) list of record indices: the scanning path."""

    def __init__(self, indices: list[int]):
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def at(self, pos: int) -> int:
        return self.indices[pos]


class OrderSlice:
    """Positions lo..hi-1 of a sorted index list (or reversed), without copying it."""

    def __init__(self, indices: list[int], lo: int, hi: int, desc: bool):
        self.indices, self.lo, self.hi, self.desc = indices, lo, max(lo, hi), desc

    def __len__(self) -> int:
        return self.hi - self.lo

    def at(self, pos: int) -> int:
        return self.indices[self.hi - 1 - pos if self.desc else self.lo + pos]


class Chain:
    """One listing, then another: the records with a value of the sort field, then those without."""

    def __init__(self, head, tail):
        self.head, self.tail, self.split = head, tail, len(head)

    def __len__(self) -> int:
        return self.split + len(self.tail)

    def at(self, pos: int) -> int:
        return self.head.at(pos) if pos < self.split else self.tail.at(pos - self.split)


def plan(ds: Dataset, bounds: Bounds, sort_field: str, desc: bool):
    """The ordered listing of record indices matching a query."""
    (dc_lo, dc_hi), (du_lo, du_hi) = bounds
    if ds.ordered and not ds.deleted and du_lo is None and du_hi is None and sort_field == "date_created":
        # date_created is non-decreasing in the index, so its bounds are two binary searches.
        positions = range(ds.total)
        lo = 0 if dc_lo is None else bisect_left(positions, dc_lo, key=ds.date_created)
        hi = ds.total if dc_hi is None else bisect_left(positions, dc_hi, key=ds.date_created)
        return IndexRange(lo, hi, desc)

    values, indices = ds.order_by(sort_field)
    own, other = ((dc_lo, dc_hi), (du_lo, du_hi)) if sort_field == "date_created" else ((du_lo, du_hi), (dc_lo, dc_hi))
    lo = 0 if own[0] is None else bisect_left(values, own[0])
    hi = len(values) if own[1] is None else bisect_left(values, own[1])
    # Records without a value of the sort field (indices[len(values):]) are listed only when no
    # range is on that field, and after all the others.
    valueless = own == (None, None) and len(indices) > len(values)
    if other == (None, None):
        listing = OrderSlice(indices, lo, hi, desc)
        return Chain(listing, OrderSlice(indices, len(values), len(indices), desc)) if valueless else listing

    key = (ds.version, bounds, sort_field, desc)
    cached = ds.query_cache.get(key)
    if cached is None:
        value = ds.date_created if sort_field == "date_updated" else ds.date_updated
        olo = -math.inf if other[0] is None else other[0]
        ohi = math.inf if other[1] is None else other[1]
        # `v is not None`: a range on date_updated never matches a record without one.
        cached = [i for i in indices[lo:hi] if (v := value(i)) is not None and olo <= v < ohi]
        if desc:
            cached.reverse()  # reversing an ascending (key, id) order gives descending on both
        if valueless:
            rest = [i for i in indices[len(values):] if olo <= value(i) < ohi]
            cached += rest[::-1] if desc else rest
        if len(ds.query_cache) >= _CACHE_SIZE:
            ds.query_cache.pop(next(iter(ds.query_cache)))
        ds.query_cache[key] = cached
    return IndexList(cached)


class Drift:
    """Offset drift for one listing (resource + filter + sort).

    Each event is a virtual position ``p`` at which a duplicate of the record then at ``p - 1``
    was inserted.  Positions at or after ``p`` shift by one and ``count`` grows by one, so a client
    that advances ``from`` by the records it received sees a duplicate but never skips a record.
    """

    def __init__(self) -> None:
        self.events: list[int] = []
        self.pages = 0  # page requests with from > 0 since the listing (re)started

    def to_real(self, v: int) -> int:
        for p in reversed(self.events):  # undo the newest insertion first
            if v == p:
                v = p - 1
            elif v > p:
                v -= 1
        return v
