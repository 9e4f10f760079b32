"""A resource's keyset read in parallel slices, with the same proof: reads that hide latency.

The keyset read (keyset.py) is sequential: each page starts where the previous one ended, so over
a slow API a big resource costs its pages x the round trip. Here the `date_updated >= since` part
of a resource's read (reach.py: after the probe and the ranges of records without a cursor) is cut
into ranges of the cursor, and each range is read at once with its own `KeysetRead`:

* `SlicePlan` cuts by count, not by time: `size=0` counts of time ranges, a range counting more
  than its share (or a count at the result window, which may be only a lower bound) cut again,
  at its records' ranks where its count is within the result window (a one-record page at
  `from=<rank>` gives the cursor value there), then neighbours joined into slices of about equal
  count. The planning requests of each round are sent at once. The first slice starts at `since`,
  each next one where the previous one ends, the last is open-ended: together they cover the
  listing whatever the counts said. A slice holds at least `MIN_SLICE_PAGES` pages; a resource of
  fewer pages, or one the sync has no slices left for (`_Gate.claim_slices`), is read as before.
* `Slices` holds the slice reads. Each is a `KeysetRead` bounded by its range (`until`), with
  everything that read proves: every page checked (`verify_page`), the counts, the gap reads, its
  own request bound (three times an undisturbed read of what it read, plus a constant, so the whole
  resource stays within the sum of those plus the planning counts). A failure names the slice.
* `SlicedRead` reads the slices over HTTP on worker threads through the sync's session, whose gate
  (http.py) keeps the requests in flight of the whole sync within SOURCES__CRM__MAX_IN_FLIGHT. Each
  worker runs a page ahead of dlt at most (`PREFETCH_PAGES`), and a sync runs at most twice that
  many slices, so memory stays bounded whatever the size.

How it fits dlt's REST API source. dlt's client loop is sequential per
resource: it sends what the paginator prepared, hands the answer to `update_state`, yields the
page, asks `update_request` for the next one. Here the paginator (paginator.py) takes each next
page from whichever slice has one ready, sets the request to exactly that page's parameters, and
the session's `send` hands back the answer the worker already fetched for that prepared URL (with
the records of up to three more pages already waiting joined to it: `SlicedRead.next_pages`). So
dlt's incremental cursor, the rest_api resource, its processing steps and hints stay as they are;
the pages of different slices interleave in the resource's output. The other choice, a generator
resource of our own beside rest_api, would have rebuilt the incremental and every processing step.

Why the incremental cursor stays safe. dlt's incremental keeps the largest `date_updated` of the
run and commits it with the data, only if the whole extract succeeded (a slice's failure raises in
dlt's thread: nothing is loaded, the cursor stays). Every record present throughout the read and
below the largest cursor read lies in some slice's range, and that slice proved its range. An edit
moves a record's `date_updated` to now: out of whichever slice held it, to the end of the listing,
which is the open-ended last slice's range, ahead of its position. So the last slice must still be
reading when any other slice ends: once its own read is done it waits for every other slice, then
reads again from the second it ended at (`date_updated >= <its newest second>` until a page holds
all of its count; that second's records are read twice, which costs a bulk edit's size when the
read ends on one). Any record edited out of another slice before that slice ended is then read by
the last slice, so a record present throughout the read lands, and the largest cursor read (the
last slice's) never passes a record left behind. A record edited after its slice read it may land
twice in one load; the merge keeps the newest (`dedup_sort` on `date_updated`).

Interleaved answers. The API may serve "the previous answer's last record" again at a page's head.
With several slices in flight that record may be another slice's, outside this page's range or out
of its order. A head record that is the last record of the previous answer or of the slice's own
previous answer, or that alone lies outside the range asked for or before the record after it, is
taken for such a repeat (the read sets it aside wherever it could mislead). An honest page's head is never out of place, so
this cannot hide a record; an API that breaks the order at a page's head alone looks the same.
A repeat of another slice's record is always out of place (the slices' ranges are disjoint; the
last slice's second read runs alone); a repeat of the slice's own previous answer is what the
keyset read already knows; and the previous answer taken, of whichever slice, is checked too.
A page of the repeated record alone (nothing left to serve) shows no order: it is taken for a
repeat when that record lies outside the range asked for and is the last record of some slice's
previous answer. The last slice's second read meets it: it starts once every other slice's last
answer is taken, in whatever order the workers took them, and the API's previous answer is one.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import requests

from .errors import CrmApiBehaviourError, CrmError, CrmIncompleteReadError
from .keyset import KeysetRead, PageRequest

logger = logging.getLogger("crm_assets.sources.crm")

# A slice reads at least this many pages: below, the requests that plan it (about one a slice,
# plus two) and each slice's own last page weigh more than a few percent of the read's requests.
MIN_SLICE_PAGES = 8
# Pages a slice's worker holds ahead of dlt, at most: memory stays bounded at any size (at most
# one page a slice, at most SOURCES__CRM__MAX_IN_FLIGHT slices a resource).
PREFETCH_PAGES = 1
# The most parts a range is cut into at once, and the most counts planning spends beyond the
# first two requests, per slice: within a few percent of a read's requests.
MAX_PARTS = 8
PLAN_COUNTS_PER_SLICE = 3
# Seconds a worker waits for dlt to take its pages before it takes the read for abandoned.
ABANDONED_AFTER = 600.0


def slice_count(total: int, page_size: int, max_slices: int) -> int:
    """How many slices a read of `total` records gets: one per MIN_SLICE_PAGES pages, at most
    `max_slices` (the requests in flight allowed). 1: not sliced."""
    return max(1, min(max_slices, total // (MIN_SLICE_PAGES * page_size)))


Range = tuple[int, Optional[int]]  # inclusive; None: open-ended


class SlicePlan:
    """Cuts `cursor >= since` into `slices` ranges of about equal count; see the module docstring.

    Pure: `pending()` lists the requests to make now (all at once), `take()` learns their answers
    in the same order, until `done`; then `ranges`."""

    def __init__(
        self,
        resource: str,
        page_size: int,
        *,
        since: int,
        total: int,
        slices: int,
        result_window: int = 10_000,
        cursor_field: str = "date_updated",
    ) -> None:
        self.resource = resource
        self.since = since
        self.slices = max(1, slices)
        self.result_window = result_window
        self.field = cursor_field
        self.target = max(page_size, math.ceil(total / self.slices))
        self.requests = 0
        self.budget = PLAN_COUNTS_PER_SLICE * self.slices
        self.done = self.slices < 2
        self.ranges: list[Range] = [(since, None)]
        self._leaves: list[tuple[int, Optional[int], int]] = []  # (low, high, count)
        self._todo: list[tuple[int, Optional[int], int]] = []
        self._asked: list[PageRequest] = []
        # what each request asked: ("count", low, high, 0) or ("rank", low, high, count of the range)
        self._origins: list[tuple[str, int, Optional[int], int]] = []
        self._first = since
        self._end: Optional[int] = None
        if not self.done:
            # the span the records are in: the first and the last cursor value from `since` on
            self._asked = [
                PageRequest(self.field, since, None, 0, 1),
                PageRequest(self.field, since, None, 0, 1, descending=True),
            ]

    def pending(self) -> list[PageRequest]:
        return list(self._asked)

    def take(self, answers: Sequence[tuple[Sequence[dict[str, Any]], int]]) -> None:
        self.requests += len(answers)
        if self._end is None:
            (first, total), (last, _) = answers
            low = first[0].get(self.field) if first else None
            high = last[0].get(self.field) if last else None
            # an answer that is no date only costs balance: the ranges still cover everything
            self._first = low if type(low) is int and low >= self.since else self.since
            self._end = high if type(high) is int and high > self._first else self._first
            self._todo = [(self.since, None, total)]
        else:
            ranked: dict[tuple[int, Optional[int], int], list[int]] = {}
            for (kind, low, high, count), (records, counted) in zip(self._origins, answers):
                if kind == "count":
                    self._todo.append((low, high, counted))
                    continue
                value = records[0].get(self.field) if records else None
                cuts = ranked.setdefault((low, high, count), [])
                # a record outside the range (an API that ignores the filter) cuts nothing
                if type(value) is int and value > low and (high is None or value <= high):
                    cuts.append(value)
            for (low, high, count), cuts in ranked.items():
                starts = [low] + sorted(set(cuts))
                stops = [start - 1 for start in starts[1:]] + [high]
                for start, stop in zip(starts, stops):
                    self._leaves.append((start, stop, count // len(starts)))
        self._split()

    def _trusted(self, count: int) -> bool:
        return count != self.result_window  # at the window, a count may be only a lower bound

    def _split(self) -> None:
        """The next round of requests: a range holding more than its share is cut. Counted within
        the result window, at the records of its ranks (a one-record page at `from=<rank>`), so
        its parts hold about a share each; beyond it, in equal spans of time, each counted again."""
        assert self._end is not None
        asked: list[PageRequest] = []
        self._origins = []
        todo, self._todo = self._todo, []
        for low, high, count in todo:
            end = self._end if high is None else high
            begin = max(low, self._first)  # nothing lies before the first record
            # a part of up to half as much again as its share is joined as it is
            dense = 2 * count > 3 * self.target or not self._trusted(count)
            parts = min(MAX_PARTS, max(2, round(count / self.target))) if dense else 1
            parts = min(parts, max(1, end - begin + 1))
            if parts < 2 or self.requests + len(asked) + parts - 1 > self.budget + 2:
                self._leaves.append((low, high, count))
                continue
            if self._trusted(count) and count <= self.result_window:
                for rank in sorted({round(count * n / parts) for n in range(1, parts)}):
                    asked.append(PageRequest(self.field, low, high, rank, 1))
                    self._origins.append(("rank", low, high, count))
                continue
            width = (end - begin + 1) / parts
            cuts = [low] + [begin + round(width * n) for n in range(1, parts)] + [None if high is None else high + 1]
            for start, stop in zip(cuts, cuts[1:]):
                asked.append(PageRequest(self.field, start, None if stop is None else stop - 1, 0, 0))
                self._origins.append(("count", start, None if stop is None else stop - 1, 0))
        self._asked = asked
        if not asked:
            self._join()

    def _join(self) -> None:
        """Neighbouring parts joined into slices of about `target` records; the last open-ended."""
        leaves = sorted(self._leaves, key=lambda leaf: leaf[0])
        starts = [self.since]
        held = 0
        for low, _high, count in leaves:
            # a new slice where this part's middle would pass the share
            if held > 0 and 2 * held + count > 2 * self.target and len(starts) < self.slices:
                starts.append(low)
                held = 0
            held += count
        self.ranges = [(start, stop - 1) for start, stop in zip(starts, starts[1:])] + [(starts[-1], None)]
        self.done = True
        logger.info(
            "%s: reading %s >= %d in %d slice(s) of about %d records (%d planning requests)",
            self.resource, self.field, self.since, len(self.ranges), self.target, self.requests,
        )


class Slices:
    """The reads of one resource's slices, each a `KeysetRead` of its range, taken in any order;
    see the module docstring. Pure and not thread-safe: `SlicedRead` holds a lock around it."""

    def __init__(
        self,
        resource: str,
        page_size: int,
        ranges: Sequence[Range],
        *,
        result_window: int = 10_000,
        cursor_field: str = "date_updated",
        tie_field: Optional[str] = "date_created",
        key_field: str = "id",
        hot_after: Optional[int] = None,
    ) -> None:
        self.resource = resource
        self.page_size = page_size
        self.ranges = list(ranges)
        self.hot_after = hot_after  # seconds that may still be the API's current one (keyset.py)
        self.result_window = result_window
        self.cursor_field = cursor_field
        self.tie_field = tie_field
        self.key_field = key_field
        self.reads = [self._read(low, high) for low, high in self.ranges]
        self.recheck: Optional[KeysetRead] = None  # the last slice's read again, after all others
        # the last record of the previous answer, and of each slice's own previous answer
        self._previous: Any = None
        self._own: list[Any] = [None] * len(self.ranges)
        self._planning: set[Any] = set()  # keys the planning's answers ended on (`planned_from`)

    def planned_from(self, answers: Sequence[Sequence[dict[str, Any]]]) -> None:
        """The planning's answers, taken at once just before the slices' first pages: the last
        record of any of them may come again at the head of a slice's first page."""
        self._planning.update(records[-1].get(self.key_field) for records in answers if records)

    def _read(self, low: int, high: Optional[int]) -> KeysetRead:
        return KeysetRead(
            self.resource, self.page_size, since=low, until=high, result_window=self.result_window,
            cursor_field=self.cursor_field, tie_field=self.tie_field, key_field=self.key_field,
            own_budget=True, hot_after=self.hot_after,
        )

    @property
    def last(self) -> int:
        return len(self.reads) - 1

    @property
    def newest_second(self) -> Optional[int]:
        """The largest `date_updated` the slices have read."""
        reads = self.reads + ([self.recheck] if self.recheck is not None else [])
        return max((read.newest[0] for read in reads if read.newest is not None), default=None)

    def name(self, index: int) -> str:
        low, high = self.ranges[index]
        span = f"{self.cursor_field} >= {low}" + ("" if high is None else f" and <= {high}")
        again = " (read again after the others)" if index == self.last and self.recheck is not None else ""
        return f"slice {index + 1} of {len(self.ranges)} ({span}){again}"

    def current(self, index: int) -> KeysetRead:
        if index == self.last and self.recheck is not None:
            return self.recheck
        return self.reads[index]

    def ready(self, index: int) -> bool:
        """Whether slice `index` has a page to ask for now."""
        if index != self.last or self.last == 0:
            return not self.reads[index].done
        if not self.reads[index].done:
            return True
        if self.recheck is None and all(read.done for read in self.reads[:-1]):
            self._start_recheck()
        return self.recheck is not None and not self.recheck.done

    def finished(self, index: int) -> bool:
        """Slice `index` asks for nothing more (the last slice: re-checked after all others)."""
        if index != self.last or self.last == 0:  # a read of one slice has nothing to wait for
            return self.reads[index].done
        return self.recheck is not None and self.recheck.done

    @property
    def done(self) -> bool:
        return all(self.finished(index) for index in range(len(self.reads)))

    def _start_recheck(self) -> None:
        read = self.reads[self.last]
        second = read.newest[0] if read.newest is not None else self.ranges[self.last][0]
        self.recheck = self._read(second, None)

    def request(self, index: int) -> PageRequest:
        return self.current(index).request()

    def take(self, index: int, records: Sequence[dict[str, Any]], count: int) -> None:
        """Learn from the answer to `request(index)`. A failure names the slice."""
        read = self.current(index)
        asked = read.request()
        head_repeated = False
        if records:
            head = records[0].get(self.key_field)
            head_repeated = (
                head in (self._previous, self._own[index]) or self._out_of_place(asked, records)
                # a page of that record alone: no order to show, but no honest answer holds it
                or (len(records) == 1 and (head in self._own or head in self._planning)
                    and not asked.matches(records[0]))
            )
            self._previous = self._own[index] = records[-1].get(self.key_field)
        try:
            read.take(records, count, head_repeated)
        except CrmApiBehaviourError as error:
            error.resource = f"{self.resource} ({self.name(index)})"
            error.args = (error._message(),)
            raise
        except CrmIncompleteReadError as error:
            raise CrmIncompleteReadError(f"{self.name(index)}: {error}") from None

    def _out_of_place(self, asked: PageRequest, records: Sequence[dict[str, Any]]) -> bool:
        """Whether a page's head record alone lies outside the range asked for or before the next
        record: the signature of a record served again (the workers take answers in about, not
        exactly, the order the API served them, so `_previous` may be another one)."""
        if len(records) < 2:
            return False
        head, second = records[0], records[1]
        if asked.matches(head):
            order = (head.get(asked.field), head.get(self.key_field)), (second.get(asked.field), second.get(self.key_field))
            try:
                if not (order[0] > order[1] if not asked.descending else order[0] < order[1]):
                    return False  # in place (the usual page): the rest need not be looked at
            except TypeError:  # not comparable: verify_page says what is wrong with it
                return False
        return all(map(asked.matches, records[1:]))

    @property
    def requests(self) -> int:
        return sum(read.requests for read in self.reads) + (self.recheck.requests if self.recheck else 0)

    @property
    def records_read(self) -> int:
        return sum(read.records_read for read in self.reads) + (self.recheck.records_read if self.recheck else 0)


class _Done:
    """A slice's worker has ended (`error`: how it failed)."""

    def __init__(self, index: int, error: Optional[BaseException] = None) -> None:
        self.index, self.error = index, error


Page = tuple[dict[str, Any], str, requests.Response]  # parameters, prepared URL, answer


class SlicedRead:
    """The slices of one resource read at once over HTTP, on worker threads; see the module
    docstring. `next_pages()` gives dlt's loop the next fetched pages of any slices."""

    def __init__(
        self,
        release: Callable[[], None],
        session: Any,
        request: requests.Request,
        params_of: Callable[[PageRequest], dict[str, Any]],
        answer_of: Callable[[requests.Response], tuple[list[dict[str, Any]], int]],
        plan: SlicePlan,
        slices_of: Callable[[list[Range]], Slices],
    ) -> None:
        self._release = release  # gives the sync its slices back, once
        self.session = session
        self.request = request
        self.params_of = params_of
        self.answer_of = answer_of
        self.plan = plan
        self._slices_of = slices_of
        self.slices: Optional[Slices] = None
        self.lock = threading.Lock()
        # (slice, page) fetched, or a worker's end; at most PREFETCH_PAGES a slice (`_room`)
        self.pages: queue.Queue[tuple[int, Page] | _Done] = queue.Queue()
        self.stopped = threading.Event()
        self.workers: list[threading.Thread] = []
        self.running = 0
        self.began = time.monotonic()
        self._changed = threading.Condition(self.lock)
        self._room: list[threading.Semaphore] = []

    # -- HTTP ------------------------------------------------------------------------------

    def fetch(self, page: PageRequest) -> tuple[dict[str, Any], str, requests.Response]:
        base = self.request
        params = self.params_of(page)
        prepared = self.session.prepare_request(
            requests.Request(base.method, base.url, headers=base.headers, params=params, auth=base.auth, hooks=base.hooks)
        )
        return params, prepared.url or "", self.session.send_fresh(prepared)

    # -- planning, then the workers ----------------------------------------------------------

    def start(self) -> None:
        """Plan the slices (their counts asked at once, round by round), then start a worker each."""
        plan = self.plan
        answers: list[tuple[list[dict[str, Any]], int]] = []
        try:
            with ThreadPoolExecutor(max_workers=MAX_PARTS, thread_name_prefix="crm-slice-plan") as pool:
                while not plan.done:
                    asked = plan.pending()
                    fetched = list(pool.map(self.fetch, asked))
                    answers = [self.answer_of(response) for _, _, response in fetched]
                    plan.take(answers)
        except BaseException:
            self.stop()
            raise
        self.slices = self._slices_of(plan.ranges)
        self.slices.planned_from([records for records, _ in answers])
        count = len(self.slices.reads)
        self._room = [threading.Semaphore(PREFETCH_PAGES) for _ in range(count)]
        self.running = count
        for index in range(count):
            worker = threading.Thread(
                target=self._work, args=(index,), name=f"crm-slice-{self.slices.resource}-{index + 1}", daemon=True
            )
            self.workers.append(worker)
            worker.start()

    def _work(self, index: int) -> None:
        slices = self.slices
        assert slices is not None
        error: Optional[BaseException] = None
        try:
            while not self.stopped.is_set():
                with self._changed:
                    # the last slice waits here for every other one, then reads again
                    while not slices.ready(index) and not slices.finished(index) and not self.stopped.is_set():
                        self._changed.wait(timeout=1.0)
                    if slices.finished(index) or self.stopped.is_set():
                        break
                    page = slices.request(index)
                waited = 0.0
                while not self._room[index].acquire(timeout=1.0):
                    waited += 1.0
                    if waited > ABANDONED_AFTER:  # dlt stopped reading (another resource failed)
                        self.stop()
                    if self.stopped.is_set():
                        return
                params, url, response = self.fetch(page)
                records, count = self.answer_of(response)
                with self._changed:
                    slices.take(index, records, count)
                    self._changed.notify_all()
                self.pages.put((index, (params, url, response)))
        except BaseException as failure:  # handed to dlt's thread, which raises it
            error = failure
            self.stopped.set()
        finally:
            with self._changed:
                self._changed.notify_all()
            self.pages.put(_Done(index, error))

    def next_pages(self, most: int) -> list[Page]:
        """The next fetched pages of any slices: the first one waited for, then up to `most` in
        all of those already fetched; none once every slice has ended."""
        pages: list[Page] = []
        while len(pages) < most:
            if self.running == 0 and self.pages.empty():
                break
            if not pages:
                item = self.pages.get()
            else:
                try:
                    item = self.pages.get_nowait()
                except queue.Empty:
                    break
            if isinstance(item, _Done):
                self.running -= 1
                if item.error is not None:
                    self.stop()
                    raise item.error
                continue
            index, page = item
            self._room[index].release()  # dlt has it: that slice may fetch another one
            pages.append(page)
        if not pages:
            self.stop()
        return pages

    def stop(self) -> None:
        """Stop every worker and give the sync its slices back (once)."""
        self.stopped.set()
        with self._changed:
            release, self._release = self._release, None
        if release is not None:
            release()
        with self._changed:
            self._changed.notify_all()
