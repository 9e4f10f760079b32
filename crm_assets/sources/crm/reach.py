"""A sync's read of one resource: the records a cursor cannot reach, then the keyset read.

No HTTP and no dlt here, like keyset.py: `ReadPlan` says which request comes next (`request()`)
and learns from each answer (`take()`); `KeysetPaginator` (paginator.py) drives it over HTTP.

The keyset read filters on `date_updated >= <cursor>` (at least `0`), and a record whose
`date_updated` is null (never edited, or imported) matches no range on it: no incremental read
ever sees it. So before the keyset read, a probe compares two counts per resource: every record,
and every record with `date_updated >= 0`. Where they differ, the difference lies in records
without a cursor value. The probe narrows them down to `date_created` ranges by halving (a range
of many pages holding such records is split in two, each half counted again), and each range is
read on its own, in `date_created` order, with the keyset read's proof.

A count at the result window may be only a lower bound, so a range counted there is split as well,
until its counts can be trusted; a single second still counted there fails the read. Without
records lacking a cursor and with counts below the window, the probe is two `size=0` requests.

Those ranges are read *before* the keyset read on `date_updated`, for the sake of the incremental
cursor (the largest `date_updated` loaded): a range read also returns records that have a
`date_updated`, as they were when read. Any of them edited since is read again by the keyset read
that follows, which ends later; so the largest `date_updated` loaded is still one the keyset read
reached, with everything before it read.

A read of more than a few pages (`slices.slice_count`) may instead end the plan there, with
`sliced` set to the count of `date_updated >= since`: the paginator then reads that part in
parallel slices (slices.py), each with the keyset read's proof, as many as the sync can run now
(`claim_slices`; none left: the keyset read as usual). Ranges of records without a cursor
are still read first, for the reason above.

A record without a `date_created` either lies in no range: counted apart, such records are read
from where the API lists them in `date_created` order (`_read_undated`).

The probe's two counts are taken one after the other, records with a cursor first: a record
created between them (appended, imported, or given a cursor by an edit) counts in the second only,
and makes a range be read for nothing; one deleted between them can hide a record without a cursor
until the next sync's probe (or the audit) finds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any, Optional, Sequence

from .errors import CrmIncompleteReadError
from .keyset import HOT_SECONDS, KeysetRead, PageRequest
from .slices import slice_count

logger = logging.getLogger("crm_assets.sources.crm")

Answer = tuple[Sequence[dict[str, Any]], int, Optional[bool]]
Steps = Generator[PageRequest, Answer, Any]
# A range of `date_created` holding records without a cursor is read whole once it is at most this
# many pages: counting its two halves (four requests) would cost about as much as reading it.
SPLIT_ABOVE_PAGES = 4


class ReadPlan:
    """The requests of one resource's read in a sync; see the module docstring."""

    def __init__(
        self,
        resource: str,
        page_size: int,
        *,
        since: Optional[int],
        now: int,
        result_window: int = 10_000,
        cursor_field: str = "date_updated",
        created_field: str = "date_created",
        key_field: str = "id",
        max_slices: int = 1,
        claim_slices: Optional[Callable[[int], int]] = None,
        hot_after: Optional[int] = None,
    ) -> None:
        self.resource = resource
        self.page_size = page_size
        self.since = since
        self.now = now
        self.result_window = result_window
        self.cursor_field = cursor_field
        self.created_field = created_field
        self.key_field = key_field
        self.max_slices = max_slices
        # how many of the slices wanted the sync can run now (CrmSession's gate); None: all of them
        self.claim_slices = claim_slices
        self.slices = 0  # granted, once `sliced` is set
        self.sliced: Optional[int] = None  # set: the keyset read is left to slices of this many records
        self.with_cursor: Optional[int] = None  # the probe's count of records with a cursor value
        self.reads: list[KeysetRead] = []  # the range reads, then the keyset read
        self.without_cursor = 0  # records without a cursor value, as the probe counted them
        self.undated = 0  # of them, those without a date_created either, as read
        self.probe_requests = 0
        # seconds that may still be the API's current one during this read (keyset.py's `_end`)
        self.hot_after = now - HOT_SECONDS if hot_after is None else hot_after
        self.end = now  # the last record's date_created, once the probe asked (else now)
        self.done = False
        self._last_served: Any = None  # the key of the previous answer's last record
        self._steps = self._plan()
        self._next = next(self._steps)

    @property
    def read(self) -> KeysetRead:
        """The read under way (or the last one)."""
        return self.reads[-1]

    @property
    def requests(self) -> int:
        return self.probe_requests + sum(read.requests for read in self.reads)

    @property
    def records_read(self) -> int:
        return sum(read.records_read for read in self.reads)

    @property
    def newest_second(self) -> Optional[int]:
        """The largest `date_updated` the keyset read has read (the incremental cursor's next value)."""
        seconds = [read.newest[0] for read in self.reads
                   if read.newest is not None and read.cursor_field == self.cursor_field]
        return max(seconds, default=None)

    def request(self) -> PageRequest:
        return self._next

    def take(self, records: Sequence[dict[str, Any]], count: int) -> None:
        """Learn from the answer to `request()`: the page's records and the API's `count`."""
        # The API may serve the previous answer's last record again at a page's head, whichever
        # listing that answer was of: the reads set such a record aside.
        head_repeated = bool(records) and records[0].get(self.key_field) == self._last_served
        if records:
            self._last_served = records[-1].get(self.key_field)
        try:
            self._next = self._steps.send((records, count, head_repeated))
        except StopIteration:
            self.done = True

    def describe(self) -> str:
        return self._next.describe()

    # -- the plan ---------------------------------------------------------------------------

    def _plan(self) -> Steps:
        for lowest, highest in (yield from self._probe()):
            yield from self._drive(self._read(self.created_field, lowest, highest))
        since = max(self.since or 0, 0)
        if self._sliceable(self.with_cursor):
            total = self.with_cursor
            if since > 0:  # an incremental read: how many records from the cursor on
                _, total, _ = yield PageRequest(self.cursor_field, since, None, 0, 0)
                self.probe_requests += 1
            if self._sliceable(total):
                wanted = slice_count(total, self.page_size, self.max_slices)  # type: ignore[arg-type]
                self.slices = self.claim_slices(wanted) if self.claim_slices is not None else wanted
                if self.slices > 1:
                    self.sliced = total
                    return
        yield from self._drive(self._read(self.cursor_field, since, None))

    def _sliceable(self, total: Optional[int]) -> bool:
        return total is not None and slice_count(total, self.page_size, self.max_slices) > 1

    def _read(self, field: str, since: int, until: Optional[int]) -> KeysetRead:
        keyset = field == self.cursor_field
        read = KeysetRead(
            self.resource, self.page_size, since=since, until=until, result_window=self.result_window,
            cursor_field=field, tie_field=self.created_field if keyset else None, key_field=self.key_field,
            hot_after=self.hot_after if keyset else None,
        )
        self.reads.append(read)
        return read

    @staticmethod
    def _drive(read: KeysetRead) -> Steps:
        while not read.done:
            records, count, head_repeated = yield read.request()
            read.take(records, count, head_repeated)

    def _count(self, lowest: Optional[int], highest: Optional[int], with_cursor: bool) -> Steps:
        if with_cursor and lowest is None and highest is None:
            # the same count, asked in the keyset read's own terms: an index on date_updated answers it
            request = PageRequest(self.cursor_field, 0, None, 0, 0)
        else:
            floor = (self.cursor_field, 0) if with_cursor else None
            request = PageRequest(self.created_field, lowest, highest, 0, 0, floor=floor)
        _, count, _ = yield request
        self.probe_requests += 1
        return count

    def _trusted(self, count: int) -> bool:
        return count != self.result_window  # at the window, a count may be only a lower bound

    def _probe(self) -> Steps:
        """The `date_created` ranges (inclusive; None: open) that hold records without a cursor."""
        # records with a cursor first: a record created between the two counts then adds to the
        # second only, so it can make the difference larger (a range read for nothing), not smaller
        with_cursor = self.with_cursor = yield from self._count(None, None, True)
        every = yield from self._count(None, None, False)
        if self._trusted(every) and self._trusted(with_cursor) and every <= with_cursor:
            return []
        # where the listing starts: the first record in date_created order, if nothing is counted
        # before it (a page of one record cannot show that the API sorted it); else from 0
        first, _, _ = yield PageRequest(self.created_field, None, None, 0, 1)
        self.probe_requests += 1
        start = first[0].get(self.created_field) if first else None
        if type(start) is not int:
            start = 0
        elif start > 0 and (yield from self._count(None, start - 1, False)) > 0:
            start = 0
        # and where it ends, to halve the span the records are in rather than the whole of time
        # (the upper half of a range stays open, so a wrong answer here costs requests, no records)
        last, _, _ = yield PageRequest(self.created_field, None, None, 0, 1, descending=True)
        self.probe_requests += 1
        end = last[0].get(self.created_field) if last else None
        self.end = end if type(end) is int and end > start else self.now
        if self._trusted(every):
            # records without a date_created either lie in no range: counted apart, read apart
            in_ranges = yield from self._count(start, None, False)
            if in_ranges < every:
                undated_first = bool(first) and type(first[0].get(self.created_field)) is not int
                yield from self._read_undated(every - in_ranges, in_ranges, undated_first)
        found: list[tuple[int, Optional[int]]] = []
        pending: list[tuple[int, Optional[int], int, int]] = [(start, None, every, with_cursor)]
        while pending:
            lowest, highest, every, with_cursor = pending.pop()
            trusted = self._trusted(every) and self._trusted(with_cursor)
            if trusted and every <= with_cursor:
                continue
            halves = self._halves(lowest, highest)
            if halves is None and not trusted and highest is not None:
                # One second counted at the window: at least as many records created in it as the
                # API can page through, or (far likelier) counts that ignore the filter, which
                # would otherwise halve the whole span down to every one of its seconds.
                raise CrmIncompleteReadError(
                    f"{self.resource}: the API counts at least {self.result_window} records with "
                    f"{self.created_field}={lowest}: either they are that many, and its result window "
                    "makes reading them all impossible, or its counts ignore the filter"
                )
            # read whole: a range of few pages, or the open one after the last record's second
            if halves is None or (trusted and every <= SPLIT_ABOVE_PAGES * self.page_size):
                self.without_cursor += max(0, every - with_cursor)
                found.append((lowest, highest))
                continue
            for low, high in halves:
                with_cursor_half = yield from self._count(low, high, True)
                every_half = yield from self._count(low, high, False)
                pending.append((low, high, every_half, with_cursor_half))
        if found:
            logger.info(
                "%s: %d record(s) have no %s; reading %d %s range(s) for them",
                self.resource, self.without_cursor, self.cursor_field, len(found), self.created_field,
            )
        return sorted(found, key=lambda r: r[0])

    def _read_undated(self, expected: int, dated: int, undated_first: bool) -> Steps:
        """Read the records with neither date, which no range on either reaches. In `date_created`
        order an API lists them together, after the dated ones (Elasticsearch does) or before:
        one page from the last dated record on (or from the start) that reaches the end of the
        listing (or a dated record after them) shows every one, from a single answer. Two tries;
        then the read fails, naming them, rather than leave them out unseen."""
        for _ in range(2):
            offset = 0 if undated_first else max(0, dated - 1)
            size = min(self.page_size, self.result_window - offset)
            records, count, _ = yield PageRequest(self.created_field, None, None, offset, size)
            self.probe_requests += 1
            has_date = [type(record.get(self.created_field)) is int for record in records]
            if undated_first:
                shown = bool(records) and has_date[-1] or offset + len(records) >= count
            else:
                shown = (offset == 0 or bool(records) and has_date[0]) and offset + len(records) >= count
            if shown and self._trusted(count):
                self.undated = has_date.count(False)
                logger.info("%s: %d record(s) have neither %s nor %s; read from where the API lists them",
                            self.resource, self.undated, self.cursor_field, self.created_field)
                return
            dated = max(0, count - expected)
        raise CrmIncompleteReadError(
            f"{self.resource}: the API counts {expected} record(s) with neither {self.cursor_field} nor "
            f"{self.created_field}; no range reaches them, and a page from where it lists them "
            f"({'before' if undated_first else 'after'} the others in {self.created_field} order) did not show them all"
        )

    def _halves(self, lowest: int, highest: Optional[int]) -> Optional[list[tuple[int, Optional[int]]]]:
        """Two halves of a range, or None where it cannot be halved (one second, or an open range
        starting after the last record's date_created)."""
        if highest is None:
            if lowest >= self.end:
                return None
            middle = (lowest + self.end) // 2
            return [(lowest, middle), (middle + 1, None)]
        if lowest >= highest:
            return None
        middle = (lowest + highest) // 2
        return [(lowest, middle), (middle + 1, highest)]
