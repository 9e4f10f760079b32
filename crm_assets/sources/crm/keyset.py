"""A read of one listing that proves its own completeness while the listing changes under it.

No HTTP and no dlt here: `KeysetRead` says which page to ask for next (`request()`) and learns from
each answer (`take()`), so the whole algorithm is tested against an adversarial in-memory listing
(crm_assets_tests/test_keyset_read.py) and driven over HTTP by `KeysetPaginator` (paginator.py).

Records are read in the order of their cursor field (`date_updated`), ties broken on the primary
key, which the API sorts on. A record's key is `(cursor, id)`. The read keeps one fact proved,
`newest`: every record that was in the listing for the whole read and whose key is <= `newest` has
been read. It moves `newest` only over a page that connects to it:

* a page at `from=0` of `cursor >= T` (with `T` <= the cursor of `newest`) is the head of what is
  left, so it holds every record up to its own largest key;
* a page at `from > 0` is a contiguous run of the listing; if it holds a key <= `newest`, nothing
  between `newest` and its largest key can be missing from it. A page that does not connect
  (records removed before it shifted the listing back) is asked for again further back.

The read ends only on a page that holds at least as many distinct matching records as the API's
`count` for that same answer: the page then holds all that is left. A `count` at the result window
is only a lower bound and never ends a read. An end on a page as long as pages come rests on the
count alone, so a read given `hot_after` checks it one step beyond (`_ask_beyond`).

Every page normally starts at `from=0` of `cursor >= <cursor of newest>`, so no offset is trusted
and the 10,000-record result window does not matter. A second of `date_updated` that fills a page
(a bulk edit) is read as a listing of its own, `date_updated = T` in `date_created` order; a second
of `date_created` inside it that fills a page is walked by offset, each page starting at `newest`
(or one before it, when the previous answer ended on it: see `_walk_on`), and its end shown by its
last position holding nothing newer than `newest`.

The API may serve the previous answer's last record again at the head of a page. Such a record
belongs to no run of the page, so it is set aside wherever it could connect a page, move `newest`
or count towards the end (it may have been deleted since).

Reading in `date_updated` order also keeps the incremental cursor safe: an edit moves a record to
the end of the listing, ahead of the read, so the largest cursor read never passes a record that
was left behind; but for an edit into a second read on its own while it was the API's current one,
which that second's read again settles (`_end`).

All of this assumes the API sorts, filters and pages as asked, so every answer is checked first
(`verify_page`, `verify_count`): sorted on (field, key), inside the requested bounds, integer dates
and string keys, and no more records than its `count` leaves from its offset; anything else fails
the read, saying what the API did. A page can look sorted and still not be the head of the listing
(an API in an order of its own that agrees with this one on the page); the counts show it: a head
page must count at least what the previous head page showed beyond its end. Where it counts fewer
(records deleted meanwhile, or a page that skipped some), the range before it is read again, as a
read of its own with its own budget.

A read may be bounded above (`until`): it then ends past that value of its cursor field.

The read gives up, naming the resource, the range and the counts, once it has used more requests
than three times an undisturbed read of what it has read, plus a constant; in pages as short as
the shortest the API cut while more remained (`capped_at`), where it cuts some shorter than others.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .errors import CrmApiBehaviourError, CrmConfigurationError, CrmIncompleteReadError

logger = logging.getLogger("crm_assets.sources.crm")

Key = tuple[int, str]
_HEAD, _WALK, _TAIL, _NESTED, _BEYOND = "head", "walk", "tail", "nested", "beyond"

# Requests a read may spend beyond 3x an undisturbed read of what it has read: two per second read
# on its own (its first page and its end check) and this constant (the first and last pages).
SPARE_REQUESTS = 10
# A walked page overlaps the last two records read, and a repeated record may take one more place.
MIN_PAGE_SIZE = 3
# How far behind our clock a second may still be the API's current one (clocks differ): a second
# read on its own this recent may still receive edits behind where its read had got to.
HOT_SECONDS = 300


@dataclass(frozen=True)
class PageRequest:
    """One page to ask for: bounds on `field` (inclusive), the order, an offset and a size
    (`size=0`: only the count)."""

    field: str  # sorted on (ascending, ties on the key) and bounded by lowest/highest
    lowest: Optional[int]
    highest: Optional[int]
    offset: int
    size: int
    within: Optional[tuple[str, int]] = None  # another field held at one value
    floor: Optional[tuple[str, int]] = None  # another field at least this value
    descending: bool = False

    def matches(self, record: dict[str, Any]) -> bool:
        value = record.get(self.field)
        if not isinstance(value, int):
            return False
        if self.within is not None and record.get(self.within[0]) != self.within[1]:
            return False
        if self.floor is not None:
            other = record.get(self.floor[0])
            if not isinstance(other, int) or other < self.floor[1]:
                return False
        return (self.lowest is None or value >= self.lowest) and (self.highest is None or value <= self.highest)

    def describe(self) -> str:
        parts = [f"{self.within[0]} = {self.within[1]}"] if self.within else []
        if self.floor:
            parts.append(f"{self.floor[0]} >= {self.floor[1]}")
        if self.highest is not None and self.highest == self.lowest:
            parts.append(f"{self.field} = {self.lowest}")
        else:
            if self.lowest is not None:
                parts.append(f"{self.field} >= {self.lowest}")
            if self.highest is not None:
                parts.append(f"{self.field} <= {self.highest}")
        where = " and ".join(parts) or "the whole listing"
        order = "descending" if self.descending else "ascending"
        return f"{where}, sorted on {self.field} {order}, from={self.offset}"


def verify_page(resource: str, asked: PageRequest, records: Sequence[dict[str, Any]], key_field: str) -> None:
    """Check that an answer is what `asked` asked for, as the read's proof assumes: every record
    has an integer `asked.field` and a string key, lies inside the requested bounds, and the page
    is sorted on (field, key). Raises `CrmApiBehaviourError` saying what the API did.

    Every page of a sync passes here, so it works on whole columns rather than record by record."""
    if not records:
        return
    field = asked.field
    values = [record.get(field) for record in records]
    keys = [record.get(key_field) for record in records]
    # `type(...) is int` on purpose: a bool is no date (the types of a column taken in C)
    if set(map(type, values)) != {int} or set(map(type, keys)) != {str}:
        for record, value, key in zip(records, values, keys):
            if type(key) is not str:
                raise CrmApiBehaviourError(
                    resource, f"sent a record without a string '{key_field}'", asked.describe(),
                    f"{key_field}={key!r}",
                )
            if value is None and (asked.lowest is not None or asked.highest is not None):
                raise CrmApiBehaviourError(
                    resource, "did not apply the requested filter", asked.describe(),
                    f"{key_field}={key!r} without a value for {field}",
                )
            if type(value) is not int:
                raise CrmApiBehaviourError(
                    resource, f"sent a record whose '{field}' is not integer epoch seconds",
                    asked.describe(), f"{key_field}={key!r} with {field}={value!r}",
                )
    low, high = asked.lowest, asked.highest
    outside = (low is not None and min(values) < low) or (high is not None and max(values) > high)
    if not outside and (asked.within is not None or asked.floor is not None):
        outside = not all(asked.matches(record) for record in records)
    if outside:
        record = next(r for r in records if not asked.matches(r))
        names = [field] + [other[0] for other in (asked.within, asked.floor) if other]
        shown = ", ".join(f"{name}={record.get(name)!r}" for name in dict.fromkeys(names))
        raise CrmApiBehaviourError(
            resource, "did not apply the requested filter", asked.describe(),
            f"{key_field}={record.get(key_field)!r} with {shown}",
        )
    pairs = list(zip(values, keys))
    if asked.descending:
        pairs.reverse()
    if all(map(operator.le, pairs, pairs[1:])):
        return
    for position in range(1, len(pairs)):
        if pairs[position] < pairs[position - 1]:
            (before, before_key), (after, after_key) = pairs[position - 1], pairs[position]
            raise CrmApiBehaviourError(
                resource, f"did not sort on {field} as asked", asked.describe(),
                f"{key_field}={after_key!r} ({field}={after}) after {key_field}={before_key!r} "
                f"({field}={before})",
            )


def verify_count(
    resource: str, asked: PageRequest, records: Sequence[dict[str, Any]], count: int, key_field: str,
) -> None:
    """Check that an answer's page fits its own `count`: from `from=F` of a listing that counts N
    records, N - F distinct records are left (at the result window, where a count may be only a
    lower bound, `from + size` stays within it), one more where F > 0 and the API serves the record
    before F again at the head. More, and the API ignored `from` (serving the head again where the
    read walks a second by offset) or counted short: the walk's end and the probe's counts would
    prove nothing. `records`: the page without a repeat of the previous answer's last record."""
    left = max(count - asked.offset, 0)
    room = left + (asked.offset > 0)
    if len(records) <= room:
        return
    served = len({record.get(key_field) for record in records})
    if served > room:
        raise CrmApiBehaviourError(
            resource, "served more records than its count leaves from the offset asked", asked.describe(),
            f"{served} records with count={count}, where from={asked.offset} leaves {left}"
            f"{' (and a record served again at its head)' if asked.offset else ''} "
            "(an API that ignores 'from', or whose count falls short of its records)",
        )


class KeysetRead:
    """The state of one read of one resource's listing; see the module docstring."""

    def __init__(
        self,
        resource: str,
        page_size: int,
        *,
        since: Optional[int] = None,
        result_window: int = 10_000,
        cursor_field: str = "date_updated",
        tie_field: Optional[str] = "date_created",
        key_field: str = "id",
        within: Optional[tuple[str, int]] = None,
        until: Optional[int] = None,
        own_budget: bool = False,
        hot_after: Optional[int] = None,
    ) -> None:
        if not MIN_PAGE_SIZE <= page_size <= result_window:
            raise CrmConfigurationError(
                f"{resource}: page size must be between {MIN_PAGE_SIZE} and {result_window}, got {page_size}"
            )
        self.resource = resource
        self.page_size = page_size
        self.result_window = result_window
        self.cursor_field = cursor_field
        self.tie_field = tie_field
        self.key_field = key_field
        self.within = within
        self.until = until  # the read's upper bound on the cursor, inclusive (None: open-ended)
        self.newest: Optional[Key] = None
        self.done = False
        self.requests = 0
        self.records_read = 0  # distinct records beyond `newest` when read
        self.walked = 0  # of them, read by walking a second (overlapping pages: fewer a page)
        self.stride = 0  # the longest page seen: the API may cap pages below `page_size`
        # the shortest page the API cut below what was asked while more remained: an API that caps
        # by bytes, say, serves long and short pages, and the budget must allow for the short ones
        self.capped_at: Optional[int] = None
        self.seconds_apart = 0  # seconds read on their own (nested or walked)
        self.count: Optional[int] = None  # the last `count` the API gave
        self._mode = _HEAD
        self._next = self._page(since, until, 0)
        self._walk_resume = 0  # in a walked second: newest's position, for the walk after a failed end check
        self._nested: Optional[KeysetRead] = None
        self._last_served: Any = None  # the key field of the previous answer's last record
        # The count the next head page must reach, and the range before it (see _take_head).
        self._expect: Optional[tuple[int, Optional[int], int]] = None
        self._gap: Optional[KeysetRead] = None  # a range read again because counts fell short
        self._gap_requests = 0  # kept by the gap reads' own budgets, not this one's
        self._done_after_gap = False
        self._own_budget = own_budget or within is None
        # seconds from which on the API's clock may not have passed yet (None: none), and those of
        # them read on their own: see `_end`
        self.hot_after = hot_after
        self._hot: set[int] = set()
        # An end that rests on a count alone, checked beyond (`_ask_beyond`): the page the read
        # ended on (its last key, and how many of its keys share that key's second), the key the
        # check looks past, and how often it was asked.
        self._end_page: Optional[tuple[Key, int]] = None
        self._beyond_of: Optional[Key] = None
        self._beyond_asked = 0
        self._stride_before = 0  # the longest page before the one being taken

    def request(self) -> PageRequest:
        """The page to ask for next."""
        if self._gap is not None:
            return self._gap.request()
        return self._nested.request() if self._nested is not None else self._next

    def describe(self, page: Optional[PageRequest] = None) -> str:
        return (page or self.request()).describe()

    def take(self, records: Sequence[dict[str, Any]], count: int, head_repeated: Optional[bool] = None) -> None:
        """Learn from the answer to `request()`: the page's records and the API's `count`."""
        asked = self.request()
        self.requests += 1
        self.count = count
        self._stride_before = self.stride
        self.stride = max(self.stride, len(records))
        if 2 <= len(records) < asked.size and asked.offset + len(records) < count:
            self.capped_at = min(self.capped_at or len(records), len(records))
        previous = self._last_served
        if records:
            self._last_served = records[-1].get(self.key_field)
        if head_repeated is None:
            # The API may serve the previous answer's last record again at a page's head. Such a
            # record belongs to no run of this page: it must neither connect a page nor move
            # `newest`, so it is set aside wherever it could do either.
            head_repeated = bool(records) and records[0].get(self.key_field) == previous
        if self.within is None:  # the outermost read checks every answer once, nested reads' too
            shown = records[1:] if head_repeated else records
            verify_page(self.resource, asked, shown, self.key_field)
            verify_count(self.resource, asked, shown, count, self.key_field)
        if self._gap is not None:
            self._gap_requests += 1
            self._gap.take(records, count, head_repeated)
            if self._gap.done:
                gap, self._gap = self._gap, None
                if self._mode is _BEYOND:  # what showed beyond the end is read: check after it
                    self._end_page = gap._end_page
                if self._done_after_gap:
                    self._end()
        elif self._nested is not None:
            self._nested.take(records, count, head_repeated)
            self._after_nested()
        else:
            if head_repeated and self._could_mislead(records, asked, count):
                records = records[1:]
                head_repeated = False
            keys = self._keys(records, asked)
            if self._mode is _HEAD:
                # A repeated record may since have gone, so it does not count towards the end,
                # unless the page came back shorter than pages can be: then it holds all there is.
                truncated = len(records) >= max(2, self.stride)
                run = self._keys(records[1:], asked) if head_repeated and truncated else keys
                self._take_head(asked, keys, count, len(run))
            elif self._mode is _WALK:
                self._take_walk(asked, keys, count)
            elif self._mode is _BEYOND:
                self._take_beyond(asked, keys, count)
            else:
                self._take_tail(asked, keys, count)
        if self._own_budget:  # the outermost read keeps the budget, nested reads included
            self._check_budget(asked)
        if self.within is None:
            if self.done and self.records_read >= 2 and self.stride < 2:
                raise CrmApiBehaviourError(
                    self.resource, "served one record a page at most", asked.describe(),
                    f"{len(records)} record(s) ({self.records_read} read in {self.requests} requests); "
                    "a page of one record cannot show the order the read relies on",
                )

    # -- the three ways of reading ---------------------------------------------------------

    def _take_head(self, asked: PageRequest, keys: list[Key], count: int, in_run: int) -> None:
        # from=0 of `cursor >= lowest`: the head of what is left, connected by construction, if
        # the API sorts as asked. A page can look sorted and still not be the head (an API that
        # serves another order which happens to agree with this one on the page): the counts
        # show it. The previous head page held some records of `count`; what it did not hold
        # lies beyond its last key, so this page, starting at that key's second, must count at
        # least those plus that second's records it held. Fewer: records were deleted since, or
        # that page skipped some. Which one, the range before this page says when read again.
        expect, self._expect = self._expect, None
        if expect is not None and count < min(expect[0], self.result_window):
            low, high = expect[1], expect[2]
            logger.info(
                "%s: the API counts %d records from %s=%d on, %d fewer than its previous page showed; "
                "reading %s again from %s to %d", self.resource, count, self.cursor_field, high + 1,
                expect[0] - count, self.cursor_field, "the start" if low is None else low, high,
            )
            self._gap = KeysetRead(
                self.resource, self.page_size, since=low, until=high, result_window=self.result_window,
                cursor_field=self.cursor_field, tie_field=self.tie_field, key_field=self.key_field,
                within=self.within, own_budget=True,
            )
        self._advance(keys)
        if in_run >= count and count < self.result_window:
            # An end page shorter than an earlier one was cut by the data, not by a cap; so was one
            # of fewer than MIN_PAGE_SIZE records (the read is proven for APIs that cap pages at
            # that or more), as a quiet sync's page of the cursor's own second mostly is. An empty
            # page shows the end itself.
            if len(keys) >= max(self._stride_before, MIN_PAGE_SIZE):
                self._end_page = (keys[-1], sum(1 for key in keys if key[0] == keys[-1][0]))
            self._done_after_gap = True
            if self._gap is None:
                self._end()
            return
        if not keys:
            return  # `count` says more match but none came back: ask again (the budget counts it)
        last_second = keys[-1][0]
        if asked.lowest is None or last_second > asked.lowest:
            if count < self.result_window:
                at_last_second = sum(1 for key in keys if key[0] == last_second)
                self._expect = (count - len(keys) + at_last_second, asked.lowest, last_second - 1)
            self._head(last_second)
            return
        # The whole page is one second: read it on its own.
        self.seconds_apart += 1
        if self.tie_field is not None:
            self.records_read -= len(keys)  # the nested read counts them again
            logger.info("%s: more than a page of records share %s=%d; reading them by %s",
                        self.resource, self.cursor_field, last_second, self.tie_field)
            self._nested = KeysetRead(
                self.resource, self.page_size, result_window=self.result_window,
                cursor_field=self.tie_field, tie_field=None, key_field=self.key_field,
                within=(self.cursor_field, last_second),
            )
            self._mode = _NESTED
        else:
            self._walk_on(last_second, len(keys) - 1)

    def _could_mislead(self, records: Sequence[dict[str, Any]], asked: PageRequest, count: int) -> bool:
        """Whether a head record that repeats the previous answer's last one could connect a page
        or move `newest` wrongly."""
        if len(records) < 2:
            # a repeat comes with the record at `from` when there is one: alone, it is that record
            return asked.offset >= count
        if self._mode is _HEAD:  # connected anyway; only a record beyond `newest` misleads
            head = records[0].get(self.cursor_field), records[0].get(self.key_field)
            if type(head[0]) is not int or type(head[1]) is not str:
                return True  # from another listing altogether
            return self.newest is None or head > self.newest
        return True

    def _keys(self, records: Sequence[dict[str, Any]], asked: PageRequest) -> list[Key]:
        """The distinct keys of the records that match the request, sorted. The page has passed
        `verify_page`, but for a repeated head record, which may belong to another listing.
        Every page of a sync passes here, so it works on whole columns rather than record by record."""
        cursors = [record.get(self.cursor_field) for record in records]
        ids = [record.get(self.key_field) for record in records]
        pairs: Any = zip(cursors, ids)
        # `type(...) is int` on purpose: a bool is no cursor (the types of a column taken in C)
        if set(map(type, cursors)) - {int} or set(map(type, ids)) - {str}:
            pairs = [(c, i) for c, i in pairs if type(c) is int and type(i) is str]
        elif asked.within is None and cursors:
            # the usual page: inside the bounds and strictly ascending is already its sorted set
            low, high = asked.lowest, asked.highest
            pairs = list(pairs)
            if ((low is None or min(cursors) >= low) and (high is None or max(cursors) <= high)
                    and all(map(operator.lt, pairs, pairs[1:]))):
                return pairs
        if asked.within is not None:
            field, value = asked.within
            pairs = (p for p, r in zip(pairs, records) if r.get(field) == value)
        low, high = asked.lowest, asked.highest
        if low is not None:
            pairs = (p for p in pairs if p[0] >= low)
        if high is not None:
            pairs = (p for p in pairs if p[0] <= high)
        return sorted(set(pairs))

    def _after_nested(self) -> None:
        nested = self._nested
        assert nested is not None
        if nested.done:
            second = nested.within[1]  # type: ignore[index]
            if self.hot_after is not None and second >= self.hot_after:
                self._hot.add(second)
            self.records_read += nested.records_read
            self.walked += nested.walked
            self.newest = (second, "\U0010ffff")  # all of that second is read
            self._nested = None
            self._head(second + 1)

    def _take_walk(self, asked: PageRequest, keys: list[Key], count: int) -> None:
        second = asked.lowest
        assert second is not None
        connected = asked.offset == 0 or (bool(keys) and self.newest is not None and keys[0] <= self.newest)
        if not connected:
            # Records before this offset went away: step back and connect again.
            self._walk(second, max(0, asked.offset - max(1, self.page_size - 1)))
            return
        at = asked.offset + len(keys) - 1  # the page's last key: newest, if the page moved it
        new = self._advance(keys)
        self.walked += new
        if new:
            self._walk_on(second, at)
            return
        # Nothing newer on a connected page: the second may be read. Its last position says.
        self._walk_resume = at
        self._tail(second, count)

    def _take_tail(self, asked: PageRequest, keys: list[Key], count: int) -> None:
        second = asked.lowest
        assert second is not None
        if asked.offset != self._tail_offset(count):
            self._tail(second, count)  # the second grew or shrank since its count was taken
        elif count == 0 or (keys and self.newest is not None and keys[-1] <= self.newest):
            self.newest = (second, "\U0010ffff")  # its last record is one already read
            self._head(second + 1)
        else:
            self._walk_on(second, self._walk_resume)

    # -- state ----------------------------------------------------------------------------

    def _end(self) -> None:
        """All is read, but for edits into a second read on its own while it was the API's current
        one: an edit lands in the current second at its record's `date_created`, which may lie
        behind where that second's read had got to. Once the read has gone past such a second,
        the API's clock has too (edits take its time), so a read of that second again now is
        final; the incremental cursor, past it, would otherwise leave those edits behind for good.
        A read that ends in that second leaves it to the next sync, which reads from it."""
        if self._gap is not None:  # a range read again comes first; the read ends after it
            self._done_after_gap = True
            return
        passed = sorted(s for s in self._hot if self.newest is not None and self.newest[0] > s)
        self._hot.clear()
        if not passed:
            if not self._ask_beyond():
                self.done = True
            return
        second, self._hot = passed[0], set(passed[1:])
        logger.info("%s: reading %s=%d again: it was read on its own while it may have been the "
                    "API's current second", self.resource, self.cursor_field, second)
        self._gap = KeysetRead(
            self.resource, self.page_size, since=second, until=second, result_window=self.result_window,
            cursor_field=self.cursor_field, tie_field=self.tie_field, key_field=self.key_field,
            within=self.within, own_budget=True,
        )
        self._done_after_gap = True

    def _ask_beyond(self) -> bool:
        """Whether to look beyond the end. An end on a page as long as pages come rests on its
        `count` alone, and an API whose count is the page's own length, or stops short of its
        records, ends every read there: green, with most records missing. So the listing from the
        end page's last second up to the sync's start (less the clocks' margin: later records are
        edits made during the read) is asked for just past the last key's position: an honest API
        has nothing there, and counts no more than the read has. Where more shows, that range
        is read once more (an import with its own dates may have landed there meanwhile); more
        again fails the read (`_take_beyond`)."""
        if self.within is not None or self.hot_after is None or self._end_page is None:
            return False  # (a range read again keeps its end page for the read it serves)
        end, self._end_page = self._end_page, None
        second, position = end[0][0], end[1]
        highest = self.hot_after - 1 if self.until is None else min(self.until, self.hot_after - 1)
        if second > highest:
            return False
        self._beyond_of = end[0]
        self._beyond_asked += 1
        self._mode = _BEYOND
        # just past the last key's position: an honest answer is empty, so nothing is served twice
        self._next = PageRequest(self.cursor_field, second, highest, position, MIN_PAGE_SIZE)
        return True

    def _take_beyond(self, asked: PageRequest, keys: list[Key], count: int) -> None:
        assert self._beyond_of is not None and asked.lowest is not None and asked.highest is not None
        after = [key for key in keys if key > self._beyond_of]
        if not after and count <= asked.offset:
            self.done = True
            return
        shown = f"{self.key_field}={after[0][1]!r} ({self.cursor_field}={after[0][0]})" if after else "no record"
        if self._beyond_asked > 1:
            raise CrmApiBehaviourError(
                self.resource, "counts fewer records than it lists", asked.describe(),
                f"{shown} with count={count}, past {self.key_field}={self._beyond_of[1]!r}, where its "
                "counts had ended the read, and again after that range was read once more (a count "
                "capped below its records, or the page's own length; or records imported with dates "
                "of their own there twice while the read ended, which the next sync reads)",
            )
        logger.info("%s: the API lists more after the read's end (%s, count=%d); reading %s from %d to %d again",
                    self.resource, shown, count, self.cursor_field, asked.lowest, asked.highest)
        self._gap = KeysetRead(
            self.resource, self.page_size, since=asked.lowest, until=asked.highest,
            result_window=self.result_window, cursor_field=self.cursor_field, tie_field=self.tie_field,
            key_field=self.key_field, own_budget=True,
        )
        self._done_after_gap = True

    def _advance(self, keys: list[Key]) -> int:
        """Move `newest` over a connected page; returns how many of its keys were new."""
        new = [k for k in keys if self.newest is None or k > self.newest]
        if new:
            self.newest = new[-1]
            self.records_read += len(new)
        return len(new)

    def _page(self, lowest: Optional[int], highest: Optional[int], offset: int) -> PageRequest:
        size = min(self.page_size, self.result_window - offset)
        return PageRequest(self.cursor_field, lowest, highest, offset, size, self.within)

    def _head(self, lowest: int) -> None:
        self._mode = _HEAD
        if self.until is not None and lowest > self.until:
            self._end()  # past the read's upper bound: all of it is read
        self._next = self._page(lowest, self.until, 0)

    def _walk_on(self, second: int, newest_at: int) -> None:
        """Walk on from newest's position. A page's head that equals the previous answer's last
        record may be a repeat and is set aside, so the page starts where that cannot be newest:
        at newest itself (overlapping by one) when the previous answer ended elsewhere, else one
        before it (by two: newest still connects the page if its head is set aside).
        Overlapping by two every time would let a repeat at each head stall a walk whose pages
        the API caps at three records."""
        ended_on_newest = self.newest is not None and self._last_served == self.newest[1]
        self._walk(second, max(0, newest_at - 1 if ended_on_newest else newest_at))

    def _walk(self, second: int, offset: int) -> None:
        if offset + MIN_PAGE_SIZE > self.result_window:
            where = f"{self.within[0]}={self.within[1]} and " if self.within else ""
            raise CrmIncompleteReadError(
                f"{self.resource}: at least {self.result_window} records share {where}"
                f"{self.cursor_field}={second}; the API's result window makes reading them all impossible"
            )
        self._mode = _WALK
        self._next = self._page(second, second, offset)

    def _tail(self, second: int, count: int) -> None:
        self._mode = _TAIL
        self._next = self._page(second, second, self._tail_offset(count))

    def _tail_offset(self, count: int) -> int:
        return max(0, min(count, self.result_window) - 1)

    def _check_budget(self, asked: PageRequest) -> None:
        nested = self._nested
        read = self.records_read + (nested.records_read if nested is not None else 0)
        walked = self.walked + (nested.walked if nested is not None else 0)
        # undisturbed, a head page overlaps the last record read and a walked page the last two
        per_page = self.stride if self.capped_at is None else min(self.stride, self.capped_at)
        heads = -(-(read - walked) // max(1, per_page - 1))
        undisturbed = heads + -(-walked // max(1, per_page - 2)) + 1
        allowed = 3 * undisturbed + 2 * self.seconds_apart + SPARE_REQUESTS
        if not self.done and self.requests - self._gap_requests >= allowed:
            raise CrmIncompleteReadError(
                f"{self.resource}: could not show a complete read within {self.requests} requests: "
                f"{read} records read; for {self.describe(asked)} the API counts {self.count} "
                f"records, and its pages have not shown them all"
            )
