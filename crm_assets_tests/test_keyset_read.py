"""`KeysetRead` and `ReadPlan` against an adversarial listing: every change the API contract
allows, interleaved with page requests by Hypothesis, and the guarantee checked at the end of every
read; and against a dishonest one, which ignores the requested order or filter.

The same with the read cut into slices read at once (slices.py): every interleaving of the slices'
requests with the adversary's changes.

Guarantee (docs/api-contract.md): every record present in the listing for the whole read is read,
records without a cursor value included, and the read takes at most 3x the requests of an
undisturbed read plus a constant; otherwise it fails naming the resource. Against an API that does
not do what it is asked, the verdict is the same: every record read, or a loud failure.
"""

from __future__ import annotations

import random
import re
from typing import Optional

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from crm_assets.sources.crm.errors import CrmApiBehaviourError, CrmError
from crm_assets.sources.crm.keyset import SPARE_REQUESTS, CrmIncompleteReadError, KeysetRead, PageRequest
from crm_assets.sources.crm.reach import ReadPlan
from crm_assets.sources.crm.slices import SlicePlan, Slices, slice_count

WINDOW = 40


class Listing:
    """An in-memory API listing sorted on any date field then id, with the contract's traps, and
    optionally dishonest: `own_order` (a field it sorts on whatever is asked), `ignore_filter`,
    `ignore_offset` (every page from the head) or `count_short` (a count that many below the truth)."""

    def __init__(
        self, updated: list[Optional[int]], window: int = WINDOW, created: Optional[list[Optional[int]]] = None
    ) -> None:
        created = created or [0] * len(updated)
        self.records: dict[str, dict] = {
            f"r{i:05d}": {"id": f"r{i:05d}", "date_updated": u, "date_created": c}
            for i, (u, c) in enumerate(zip(updated, created))
        }
        self.next_id = len(updated)
        self.window = window
        self.cap: Optional[int] = None
        self.caps: list[int] = []  # caps that change from one page to the next (an API that caps by bytes)
        self.count_capped = False
        self.repeat_next = False
        self.last_served: Optional[dict] = None
        self.requests = 0
        self.own_order: Optional[str] = None
        self.ignore_filter = False
        self.ignore_offset = False
        self.count_short = 0
        self.count_cap: Optional[int] = None  # a count that stops there, well below the window
        self.count_page = False  # a count that is the page's own length (0 for size=0)
        self.count_unfiltered = False  # a count of the whole listing, whatever the filter
        self.undated_first = False  # where records without the sorted field go: last, as Elasticsearch puts them
        self.clock = 0
        self.now()

    def add(self, updated: int, created: int) -> str:
        self.next_id += 1
        rid = f"r{self.next_id:05d}"
        self.records[rid] = {"id": rid, "date_updated": updated, "date_created": created}
        self.clock = max(self.clock, updated + 1)
        return rid

    def now(self) -> int:
        # a second after the newest date_updated the listing ever held: deleting the newest
        # record does not turn the clock back
        newest = max((r["date_updated"] or 0 for r in self.records.values()), default=0)
        self.clock = max(self.clock, newest + 1)
        return self.clock

    def serve(self, page: PageRequest) -> tuple[list[dict], int]:
        assert page.offset + page.size <= self.window, "the read asked past the result window"
        self.requests += 1
        field = self.own_order or page.field
        unfiltered = self.ignore_filter or (page.lowest, page.highest, page.within, page.floor) == (None,) * 4
        listing = sorted(
            (r for r in self.records.values() if unfiltered or page.matches(r)),
            key=lambda r: (r.get(field) is None, r.get(field) or 0, r["id"]),
            reverse=page.descending and self.own_order is None,
        )
        listing.sort(key=lambda r: (r.get(field) is None) != self.undated_first)  # stable: the rest keeps its order
        take = min(page.size, self.cap or page.size)
        if self.caps and page.size:
            take = min(page.size, self.caps[self.requests % len(self.caps)])
        offset = 0 if self.ignore_offset else page.offset
        rows = [dict(r) for r in listing[offset : offset + take]]
        if self.repeat_next and self.last_served is not None and take >= 2:
            # the previous page's last record again at the head, nothing shifted
            rows = [dict(self.last_served)] + rows[: take - 1]
        self.repeat_next = False
        if rows:
            self.last_served = rows[-1]
        count = max(0, (len(self.records) if self.count_unfiltered else len(listing)) - self.count_short)
        if self.count_cap is not None:
            count = min(count, self.count_cap)
        if self.count_page:
            count = len(rows)
        return rows, min(count, self.window) if self.count_capped else count


def read_all(listing: Listing, page_size: int, since: Optional[int] = None) -> KeysetRead:
    read = KeysetRead("jobs", page_size, since=since, result_window=listing.window)
    while not read.done:
        read.take(*listing.serve(read.request()))
    return read


def plan_all(listing: Listing, page_size: int) -> tuple[ReadPlan, set[str]]:
    """A whole sync's read of a listing that holds still, and the ids its pages held."""
    plan = ReadPlan("jobs", page_size, since=None, now=100, result_window=listing.window)
    seen: set[str] = set()
    while not plan.done:
        rows, count = listing.serve(plan.request())
        seen.update(r["id"] for r in rows)
        plan.take(rows, count)
    return plan, seen


def test_an_undisturbed_read_takes_one_request_per_page_less_one_record():
    listing = Listing(list(range(100, 130)), window=10_000)
    read = read_all(listing, page_size=7)
    assert read.records_read == 30 and read.newest == (129, "r00029")
    assert listing.requests == 5  # 7 + 6 + 6 + 6 + 6 records: one overlap a page


def test_a_bulk_edit_larger_than_the_window_is_read_by_date_created():
    listing = Listing([5] * (3 * WINDOW), created=list(range(3 * WINDOW)))
    read = read_all(listing, page_size=10)
    assert read.records_read == 3 * WINDOW


@pytest.mark.parametrize("records", [WINDOW, WINDOW + 5])  # at the window, the count may be a lower bound
def test_a_second_as_large_as_the_window_in_both_dates_fails_naming_it(records):
    listing = Listing([5] * records, created=[7] * records)
    with pytest.raises(CrmIncompleteReadError, match="at least 40 records share date_updated=5 and date_created=7"):
        read_all(listing, page_size=10)


@pytest.mark.parametrize(
    "page, message",
    [
        ([{"id": "a", "date_updated": 9}, {"id": "b", "date_updated": 3}],
         r"did not sort on date_updated as asked: the request for date_updated >= 2, sorted on "
         r"date_updated ascending, from=0 returned id='b' \(date_updated=3\) after id='a' \(date_updated=9\)"),
        ([{"id": "a", "date_updated": 1}], r"did not apply the requested filter: .* returned id='a' with date_updated=1"),
        ([{"id": "a", "date_updated": None}], r"did not apply the requested filter: .* id='a' without a value for date_updated"),
        ([{"id": "a"}], r"did not apply the requested filter: .* id='a' without a value for date_updated"),
        ([{"id": "a", "date_updated": "5"}], r"whose 'date_updated' is not integer epoch seconds: .* date_updated='5'"),
        ([{"id": 7, "date_updated": 5}], r"without a string 'id'"),
    ],
)
def test_an_answer_that_is_not_what_was_asked_fails_saying_what_the_api_did(page, message):
    read = KeysetRead("jobs", 10, since=2)
    with pytest.raises(CrmApiBehaviourError, match=message):
        read.take(page, 5)


def test_a_page_that_looks_sorted_but_is_not_the_head_is_caught_by_the_counts():
    """The API sorts on id, not date_updated, two records a page: its first page (r0, r1) is in
    date_updated order, yet r2 lies between them. The next page's count is one fewer than the first
    page implied, and the read reads the range before it again."""
    listing = Listing([5, 9, 7])  # ids r00000, r00001, r00002
    listing.own_order, listing.cap = "id", 2
    seen = set()
    read = KeysetRead("jobs", 3, result_window=listing.window)
    while not read.done:
        rows, count = listing.serve(read.request())
        seen.update(r["id"] for r in rows)
        read.take(rows, count)
    assert seen == set(listing.records)
    assert listing.requests == 3  # the first page, the one from date_updated 9, the range before it


def test_an_api_that_ignores_from_fails_the_walk_of_a_second_rather_than_ending_it_short():
    """30 records share both dates, so the second is walked by offset. Served the head again at
    from=6, the walk sees nothing new and asks for the second's last position (from=29): the head
    again. That page's last record is one already read, which ended the read with 7 records of 30;
    but 7 records cannot follow from=29 of a listing that counts 30."""
    listing = Listing([5] * 30, created=[5] * 30)
    listing.ignore_offset = True
    read = KeysetRead("jobs", 7, result_window=10_000)
    message = (r"jobs: the API served more records than its count leaves from the offset asked: the "
               r"request for date_updated = 5 and date_created = 5, sorted on date_created ascending, "
               r"from=29 returned 7 records with count=30, where from=29 leaves 1 \(and a record served again at its head\)")
    with pytest.raises(CrmApiBehaviourError, match=message):
        while not read.done:
            read.take(*listing.serve(read.request()))


def test_pages_capped_short_now_and_then_stay_within_the_budget():
    """An API that caps pages by bytes serves long pages and short ones. The budget counts on the
    shortest page the API cut while more remained, not on the longest: 300 records of one second,
    walked by offset, in pages of 100 then ten of 3."""
    listing = Listing([5] * 300, created=[5] * 300, window=10_000)
    listing.caps = [100] + [3] * 10
    read = read_all(listing, page_size=100)
    assert read.records_read == 300 and read.capped_at == 3 and listing.requests > 30


def test_an_edit_behind_the_read_of_the_current_second_is_read_once_the_read_has_passed_it():
    """A bulk edit is under way: 20 records share date_updated 10, the API's current second, and
    the read takes them on their own in date_created order. Meanwhile a record created long ago is
    edited in that second, behind where that read has got to; then the clock moves on and a record
    at 11 appears. The read passes 11, so the next sync reads from 11: unless second 10 is read
    again first, that edit is never read."""
    listing = Listing([5] + [10] * 20, created=[0] + list(range(1, 21)), window=10_000)
    read = KeysetRead("jobs", 7, result_window=10_000, hot_after=10)
    served: set[tuple[str, int]] = set()
    edited = moved_on = False
    while not read.done:
        asked = read.request()
        rows, count = listing.serve(asked)
        served.update((r["id"], r["date_updated"]) for r in rows)
        read.take(rows, count)
        if asked.within is not None and not edited:  # second 10 is being read on its own
            listing.records["r00000"]["date_updated"] = 10
            edited = True
        if edited and not moved_on and read.request().within is None:
            listing.add(11, 11)
            moved_on = True
    assert moved_on and read.newest[0] == 11
    assert ("r00000", 10) in served


def test_a_count_short_of_its_own_page_fails_the_read():
    listing = Listing(list(range(1, 6)))
    listing.count_short = 1  # 5 records, counted as 4: a page holding 4 would end the read
    read = KeysetRead("jobs", 7, result_window=10_000)
    with pytest.raises(CrmApiBehaviourError, match=r"returned 5 records with count=4, where from=0 leaves 4 \(an API"):
        read.take(*listing.serve(read.request()))


def _plan_read(listing: Listing, page_size: int, now: int = 10_000, hook=None) -> tuple[ReadPlan, set[str]]:
    """A sync's read, its start well after every record (so an end resting on a count alone is
    checked beyond); `hook(request)` runs before each answer."""
    plan = ReadPlan("jobs", page_size, since=None, now=now, result_window=listing.window)
    seen: set[str] = set()
    while not plan.done:
        request = plan.request()
        if hook is not None:
            hook(request)
        rows, count = listing.serve(request)
        seen.update(r["id"] for r in rows)
        plan.take(rows, count)
    return plan, seen


@pytest.mark.parametrize("lie", ["count_page", "count_cap"])
def test_a_count_that_stops_at_the_page_fails_the_read_rather_than_ending_it_there(lie):
    """An API whose `count` is the page's own length (0 when asked for none), or stops at the page
    size, ends every read on its first page: green, with most records missing. Beyond the end it
    lists more; read again, that range ends as short, and the read fails naming it."""
    listing = Listing(list(range(100, 160)), window=10_000)
    if lie == "count_page":
        listing.count_page = True
    else:
        listing.count_cap = 10
    with pytest.raises(CrmApiBehaviourError, match=r"jobs: the API counts fewer records than it lists: .* "
                       r"returned id='r000\d\d' \(date_updated=1\d\d\) with count=\d+, past id='r000\d\d', where "
                       r"its counts had ended the read, and again"):
        _plan_read(listing, 10)


def test_an_import_beyond_the_end_is_read_and_then_the_read_ends():
    """Honest counts, but a record imported with an old date lands after the end page and before
    the look beyond it: that range is read once more, and the read ends with it."""
    listing = Listing(list(range(100, 106)), window=10_000)
    imported = []

    def import_once(request: PageRequest) -> None:
        if request.size == 3 and request.highest is not None and not imported:  # the look beyond
            imported.append(listing.add(200, 200))

    plan, seen = _plan_read(listing, 10, hook=import_once)
    assert imported and seen == set(listing.records)


def test_an_end_on_a_page_shorter_than_an_earlier_one_asks_nothing_beyond():
    """Records that run out cut the last page short: the end needs no look beyond; nor does a page
    of fewer than three records (a quiet sync's page of its cursor's second). A read of one page,
    or one ending on a page as long as the longest, takes one request more."""
    for records, pages, beyond in ((12, 3, 0), (2, 1, 0), (5, 1, 1), (9, 2, 1)):
        listing = Listing(list(range(100, 100 + records)), window=10_000)
        plan, seen = _plan_read(listing, 5)
        assert seen == set(listing.records)
        assert listing.requests == plan.probe_requests + pages + beyond, records


@pytest.mark.parametrize("lie", ["ignore_filter", "count_unfiltered"])
def test_counts_that_ignore_the_filter_fail_the_probe_rather_than_halve_every_second(lie):
    """More records than the window, counted as the whole listing whatever the filter: every range
    counts at the window, so the probe would halve the span down to each of its million seconds. The
    first second counted at the window fails the read, after one halving per level."""
    rng = random.Random(3)
    listing = Listing([rng.randint(1, 10**6) for _ in range(60)], created=[rng.randint(1, 10**6) for _ in range(60)])
    listing.count_capped = True
    setattr(listing, lie, True)

    def bounded(request: PageRequest) -> None:
        assert listing.requests < 1000, "the probe is still halving"

    with pytest.raises(CrmIncompleteReadError, match=r"jobs: the API counts at least 40 records with "
                       r"date_created=\d+: either they are that many, .* or its counts ignore the filter"):
        _plan_read(listing, 10, now=2 * 10**6, hook=bounded)
    assert listing.requests < 2 * 2 * 20 + 10  # two counts a level, 20 levels for a million seconds


@pytest.mark.parametrize("undated_first", [False, True], ids=["listed_last", "listed_first"])
def test_records_with_neither_date_are_read_from_where_the_api_lists_them(undated_first):
    listing = Listing([3, None, 4, None, 8, None], created=[1, None, 2, 5, 6, None], window=10_000)
    listing.undated_first = undated_first
    plan, seen = plan_all(listing, 3)
    assert seen == set(listing.records) and plan.undated == 2


def test_more_records_with_neither_date_than_a_page_shows_fail_naming_them():
    listing = Listing([3, 4] + [None] * 5, created=[1, 2] + [None] * 5, window=10_000)
    plan = ReadPlan("jobs", 3, since=None, now=100, result_window=listing.window)
    with pytest.raises(CrmIncompleteReadError, match=r"jobs: the API counts 5 record\(s\) with neither date_updated nor date_created"):
        while not plan.done:
            plan.take(*listing.serve(plan.request()))


def test_records_without_a_cursor_are_read_by_date_created():
    listing = Listing([3, None, 4, None, 8], created=[1, 2, 2, 5, 6], window=10_000)
    plan, seen = plan_all(listing, 3)
    assert seen == set(listing.records) and plan.without_cursor == 2


def test_records_created_between_the_probes_two_counts_hide_no_record_without_a_cursor():
    """The probe compares two counts taken one after the other. Records created between them (the
    product is in use) must not cancel out the record that has no cursor: the creations may only
    make the difference larger (a range read for nothing), never smaller."""
    for created_between in (1, 2):
        listing = Listing([3, None, 4, 8], created=[1, 2, 2, 6], window=10_000)
        plan = ReadPlan("jobs", 3, since=None, now=100, result_window=listing.window)
        seen = set()
        while not plan.done:
            request = plan.request()
            rows, count = listing.serve(request)
            if plan.probe_requests == 0:  # the first count is answered: records are created
                for _ in range(created_between):
                    listing.add(listing.now(), 50)
            seen.update(r["id"] for r in rows)
            plan.take(rows, count)
        assert "r00001" in seen, f"{created_between} record(s) created between the counts hid it"


def test_without_such_records_the_probe_is_two_counts():
    listing = Listing(list(range(1, 11)), window=10_000)
    plan = ReadPlan("jobs", 5, since=None, now=100, result_window=listing.window)
    while not plan.done:
        plan.take(*listing.serve(plan.request()))
    assert plan.probe_requests == 2 and plan.records_read == 10


def test_an_api_that_keeps_answering_empty_pages_fails_in_bounded_requests():
    read = KeysetRead("contacts", 10)
    with pytest.raises(CrmIncompleteReadError, match="contacts: could not show a complete read"):
        for _ in range(100):
            read.take([], 5)
    assert read.requests <= 3 + SPARE_REQUESTS


def test_a_repeat_at_every_head_does_not_stall_a_walk_of_pages_capped_at_three():
    """Forty records share both dates, so the second is walked by offset, and the API caps pages at
    three records. A page overlapping the last two records read has room for one new record, which
    a repeated head pushes out: the walk must go on from the record itself after its end check
    (found by the adversarial test below) and stay within three times an undisturbed read."""

    def listing() -> Listing:
        made = Listing([5] * 40, created=[7] * 40, window=10_000)
        made.cap = 3
        return made

    undisturbed = listing()
    read_all(undisturbed, page_size=7)
    repeating = listing()
    read = KeysetRead("jobs", 7, result_window=repeating.window)
    seen = set()
    while not read.done:
        repeating.repeat_next = True
        rows, count = repeating.serve(read.request())
        seen.update(row["id"] for row in rows)
        read.take(rows, count)
    assert seen == set(repeating.records) and read.records_read == 40
    assert repeating.requests <= 3 * undisturbed.requests


class AdversarialRead(RuleBasedStateMachine):
    """One sync's read of a listing (`ReadPlan`: the probe for records without a cursor, their
    ranges, then the keyset read) that changes between any two of its page requests (at most once
    each); or, from an API that ignores the requested order or filter, a listing that holds still
    with exact counts (what the read can check then: docs/api-contract.md)."""

    @initialize(
        cursors=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 3)), min_size=0, max_size=60),
        without_cursor=st.lists(st.integers(0, 3), max_size=4),
        page_size=st.integers(3, 8),
        cap=st.one_of(st.none(), st.integers(3, 8)),
        count_capped=st.booleans(),
        since=st.one_of(st.none(), st.integers(0, 6)),
        dishonest=st.sampled_from([None, None, "date_created", "id", "ignore_filter", "ignore_offset",
                                   "count_page", "count_cap"]),
    )
    def start(self, cursors, without_cursor, page_size, cap, count_capped, since, dishonest):
        self.count_lie = dishonest in ("count_page", "count_cap")
        if self.count_lie:
            without_cursor = []  # the probe's counts lie too: records without a cursor go unseen
        self.listing = Listing(
            [u for u, _ in cursors] + [None] * len(without_cursor),
            created=[c for _, c in cursors] + without_cursor,
        )
        self.listing.cap = cap
        self.listing.count_capped = count_capped and dishonest is None
        self.listing.ignore_filter = dishonest == "ignore_filter"
        self.listing.ignore_offset = dishonest == "ignore_offset"
        self.listing.count_page = dishonest == "count_page"
        self.listing.count_cap = page_size if dishonest == "count_cap" else None
        self.listing.own_order = dishonest if dishonest in ("date_created", "id") else None
        self.honest = dishonest is None
        self.page_size = page_size
        self.since = since
        # the newest second may still be the API's current one: edits may land in it
        self.hot_after = self.listing.clock - 1
        self.plan = ReadPlan("jobs", page_size, since=since, now=20, result_window=WINDOW,
                             hot_after=self.hot_after)
        self.served: set[tuple[str, Optional[int]]] = set()  # (id, date_updated) as pages held them
        # ids in the listing at the start and not removed since: what the read must return
        self.stayed = {
            i for i, r in self.listing.records.items()
            if since is None or r["date_updated"] is None or r["date_updated"] >= since
        }
        self.seen: set[str] = set()
        self.failure: Optional[CrmError] = None
        self.changed = False
        self.deletes = 0
        self.bursts = 0
        self.imports = 0  # records added with dates of their own (behind the clock)

    def _now(self) -> int:
        # the clock never runs behind the cursor of the sync before (the largest date_updated it read)
        return max(self.listing.now(), self.since or 0)

    def _changing(self) -> bool:
        """The read is under way (its probe included) and nothing changed since its last request."""
        return self.honest and not self.plan.done and self.failure is None and not self.changed

    def _reading(self) -> bool:
        """Past the probe and not finished: a record deleted between the probe's two counts can
        hide a record without a cursor until the next sync (reach.py says so); records created or
        edited then cannot."""
        return self._changing() and bool(self.plan.reads)

    # -- the server's changes, at most one between two requests ----------------------------

    def _changed(self) -> None:
        self.changed = True

    @precondition(lambda self: self._changing())
    @rule()
    def append(self):
        now = self._now()
        self.listing.add(now, now)
        self._changed()

    @precondition(lambda self: self._changing())
    @rule(updated=st.integers(0, 14), created=st.integers(0, 3))
    def insert_anywhere(self, updated, created):
        self.listing.add(updated, created)
        self.imports += 1
        self._changed()

    @precondition(lambda self: self._reading() and self.listing.records)
    @rule(data=st.data(), behind=st.booleans())
    def hard_delete(self, data, behind):
        # behind the read (already read: the rest of the listing shifts back) or ahead of it
        pool = sorted(i for i in self.listing.records if (i in self.seen) == behind)
        if not pool:
            return
        victim = data.draw(st.sampled_from(pool))
        del self.listing.records[victim]
        self.stayed.discard(victim)
        self.deletes += 1
        self._changed()

    @precondition(lambda self: self._changing() and self.listing.records)
    @rule(data=st.data())
    def edit(self, data):
        # an edit moves date_updated to now: the record stays in the listing, at its end
        record = data.draw(st.sampled_from(sorted(self.listing.records)))
        self.listing.records[record]["date_updated"] = self._now()
        self._changed()

    @precondition(lambda self: self._changing() and self.listing.records)
    @rule(data=st.data())
    def edit_in_the_current_second(self, data):
        # the clock still in the newest second: the record lands there, at its date_created, which
        # may lie behind where a read of that second has got to
        second = self.listing.now() - 1  # the newest date_updated the listing ever held
        record = self.listing.records[data.draw(st.sampled_from(sorted(self.listing.records)))]
        if second < (self.since or 0) or (record["date_updated"] or 0) > second:
            return
        record["date_updated"] = second
        self._changed()

    @precondition(lambda self: self._changing())
    @rule(size=st.integers(2, 12), at=st.one_of(st.none(), st.integers(0, 14)), spread=st.booleans())
    def same_second_burst(self, size, at, spread):
        # records sharing one date_updated (a bulk edit: their date_created spread) or both dates
        second = self._now() if at is None else at
        for n in range(size):
            self.listing.add(second, n % 4 if spread else second)
        self.bursts += 1
        self.imports += at is not None
        self._changed()

    @precondition(lambda self: self._reading())
    @rule()
    def repeat_at_next_head(self):
        self.listing.repeat_next = True
        self._changed()

    # -- the client ---------------------------------------------------------------------------

    def _next_page(self) -> None:
        rows, count = self.listing.serve(self.plan.request())
        self.seen.update(row["id"] for row in rows)
        self.served.update((row["id"], row["date_updated"]) for row in rows)
        try:
            self.plan.take(rows, count)
        except CrmError as failure:
            if self.honest and not (self._beyond_any_reader(failure) or self._imported_beyond_twice(failure)):
                raise
            self.failure = failure  # a loud failure: the verdict an API that misbehaves may get

    def _no_edit_left_behind_the_cursor(self) -> None:
        """The next sync reads from the largest date_updated read on (inclusive): a record present
        throughout whose date_updated is now below that was read with it, or no sync ever will."""
        cursor = max((u for _, u in self.served if isinstance(u, int)), default=None)
        if cursor is None:
            return
        behind = sorted(
            i for i in self.stayed
            if isinstance(u := self.listing.records[i]["date_updated"], int)
            and (self.since or 0) <= u < cursor and (i, u) not in self.served
        )
        assert not behind, f"edits left behind the cursor {cursor}: {behind}"

    def _beyond_any_reader(self, failure: CrmError) -> bool:
        """A failure naming a second (of both dates, or of date_created in the read of records
        without a cursor) that really holds the result window's records or more: no reader of this
        API can show it read them all (docs/api-contract.md), and saying so is the right verdict."""
        message = str(failure)
        if not isinstance(failure, CrmIncompleteReadError) or "makes reading them all impossible" not in message:
            return False
        named = {field: int(value) for field, value in re.findall(r"(date_\w+)=(\d+)", message)}
        sharing = [r for r in self.listing.records.values() if all(r.get(f) == v for f, v in named.items())]
        return bool(named) and len(sharing) >= WINDOW  # a count at the window may be a lower bound

    def _imported_beyond_twice(self, failure: CrmError) -> bool:
        """Records imported with dates of their own after a read's end, and again after that range
        was read once more, look like a count that stops short; failing loudly is the verdict then
        (the next sync reads them), never a silent loss."""
        return self.imports >= 2 and "counts fewer records than it lists" in str(failure)

    @precondition(lambda self: not self.plan.done and self.failure is None)
    @rule()
    def next_page(self):
        self._next_page()
        self.changed = False

    @precondition(lambda self: self.plan.done or self.failure is not None)
    @rule()
    def after_the_read(self):
        pass  # changes after the read ends are the next sync's business

    @invariant()
    def within_the_request_bound(self):
        # each read's own budget raises before it passes this: an undisturbed read of the largest
        # listing seen, three times over, plus the end checks of walked seconds and a constant, for
        # each read of the plan; plus the probe and a range read again for each deletion
        if hasattr(self, "listing") and self.honest:
            assert self.listing.requests <= self._bound()

    def _bound(self) -> int:
        records = len(self.listing.records) + self.bursts * 12
        per_read = 3 * (records // max(1, self.page_size - 1) + 1) + 2 * (self.bursts + 5) + SPARE_REQUESTS
        # a range read again for each deletion, and for each import beyond a read's end
        bound = (self.plan.probe_requests + max(1, len(self.plan.reads)) * per_read
                 + (self.deletes + self.imports) * per_read)
        if self.listing.requests > bound:
            # pages the API caps, in a second walked by offset, hold fewer new records than the
            # page size suggests: three times the same read of the listing as it is now, held still
            spare = 2 * (self.bursts + 5) + SPARE_REQUESTS
            bound = max(bound, 3 * self._undisturbed_requests() + max(1, len(self.plan.reads)) * spare
                        + self.plan.probe_requests + (self.deletes + self.imports) * per_read)
        return bound

    def _undisturbed_requests(self) -> int:
        still = Listing([], window=self.listing.window)
        still.records = {i: dict(r) for i, r in self.listing.records.items()}
        still.cap, still.count_capped = self.listing.cap, self.listing.count_capped
        plan = ReadPlan("jobs", self.page_size, since=self.since, now=20, result_window=WINDOW)
        try:
            while not plan.done:
                plan.take(*still.serve(plan.request()))
        except CrmError:
            pass  # a second past the window: the verdict is the read's, not the bound's
        return still.requests

    def teardown(self):
        if not hasattr(self, "listing"):
            return
        for _ in range(10_000):  # the rest of the read, undisturbed; it must end
            if self.plan.done or self.failure is not None:
                break
            self._next_page()
        assert self.plan.done or self.failure is not None, "the read did not end"
        if self.failure is None:  # exact, or a loud failure: never a silent loss
            missing = self.stayed - self.seen
            if self.count_lie:
                # a count that stops at the page ends a read among records too recent to tell from
                # edits made during it: those are left to the next sync, which reads from the cursor
                cursor = max((u for _, u in self.served if isinstance(u, int)), default=0)
                missing = {i for i in missing if self.listing.records[i]["date_updated"] < max(self.hot_after, cursor)}
            assert not missing, f"records present throughout the read were not read: {sorted(missing)}"
            if self.honest:
                self._no_edit_left_behind_the_cursor()
        if self.honest:
            assert self.listing.requests <= self._bound()


AdversarialRead.TestCase.settings = settings(
    max_examples=400, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestAdversarialRead = AdversarialRead.TestCase


def _planned(listing: Listing, page_size: int, since: int, slices: int) -> SlicePlan:
    _, total = listing.serve(PageRequest("date_updated", since, None, 0, 0))
    plan = SlicePlan("jobs", page_size, since=since, total=total, slices=slices, result_window=listing.window)
    while not plan.done:
        plan.take([listing.serve(page) for page in plan.pending()])
    return plan


def test_slices_are_cut_by_count_and_cover_the_listing_from_since_on():
    # dense at the start (900 records in 100 seconds), sparse after (100 in 100,000 seconds)
    updated = [1_000 + n // 9 for n in range(900)] + [1_100 + n * 1_000 for n in range(100)]
    listing = Listing(updated, window=10_000)
    plan = _planned(listing, 20, since=500, slices=4)
    counts = [listing.serve(PageRequest("date_updated", low, high, 0, 0))[1] for low, high in plan.ranges]
    assert plan.ranges[0][0] == 500 and plan.ranges[-1][1] is None
    assert all(high + 1 == nxt for (_, high), (nxt, _) in zip(plan.ranges, plan.ranges[1:]))
    assert len(plan.ranges) == 4 and sum(counts) == 1_000 and max(counts) <= 2 * 250, counts
    assert plan.requests <= 2 + 3 * 4


def test_no_slices_under_a_few_pages_a_slice():
    assert slice_count(15 * 1000, 1000, 8) == 1
    assert slice_count(16 * 1000, 1000, 8) == 2
    assert slice_count(200_000, 1000, 8) == 8 and slice_count(200_000, 1000, 1) == 1


def test_a_slice_that_cannot_show_a_complete_read_fails_naming_the_slice():
    slices = Slices("jobs", 10, [(0, 99), (100, None)])
    with pytest.raises(CrmIncompleteReadError, match=r"slice 2 of 2 \(date_updated >= 100\).*could not show"):
        for _ in range(100):
            slices.take(1, [], 5)


def test_the_last_slice_reads_again_after_every_other_slice_has_ended():
    listing = Listing(list(range(1, 61)), window=10_000)
    slices = Slices("jobs", 10, [(0, 30), (31, None)], result_window=listing.window)
    while slices.ready(1):  # the last slice first, to its end
        slices.take(1, *listing.serve(slices.request(1)))
    assert not slices.finished(1) and slices.recheck is None
    listing.records["r00003"]["date_updated"] = listing.now()  # edited out of slice 1 before it read it
    while slices.ready(0):
        slices.take(0, *listing.serve(slices.request(0)))
    assert slices.ready(1) and slices.recheck is not None  # now it reads again from where it ended
    seen = set()
    while slices.ready(1):
        rows, count = listing.serve(slices.request(1))
        seen.update(r["id"] for r in rows)
        slices.take(1, rows, count)
    assert slices.done and "r00003" in seen


def test_the_last_slices_second_read_knows_a_repeat_of_whichever_slice_was_served_last():
    listing = Listing(list(range(1, 61)), window=10_000)
    slices = Slices("jobs", 10, [(0, 20), (21, 40), (41, None)], result_window=listing.window)
    while slices.ready(2):  # the last slice first, to its end
        slices.take(2, *listing.serve(slices.request(2)))
    while True:  # slice 1's last answer is served ...
        rows, count = listing.serve(slices.request(0))
        if len(rows) >= count:
            break
        slices.take(0, rows, count)
    while slices.ready(1):  # ... then all of slice 2 ...
        slices.take(1, *listing.serve(slices.request(1)))
    slices.take(0, rows, count)  # ... and slice 1's worker takes its answer last
    assert slices.ready(2) and slices.recheck is not None
    del listing.records["r00059"]  # nothing left at the last slice's second
    listing.repeat_next = True  # the API serves slice 2's last record again, alone
    rows, count = listing.serve(slices.request(2))
    assert [r["date_updated"] for r in rows] == [40] and count == 0
    slices.take(2, rows, count)
    assert slices.done


def test_a_planning_answer_served_again_alone_on_an_empty_slice_is_known_for_a_repeat():
    """Since 0, the first record at 1: the plan's first slice (0 to 0) holds nothing, and the API
    serves the planning's last answer again as that slice's first page, alone."""
    listing = Listing([1, 1, 1, 1, 1, 2])
    planned = _planned(listing, 3, since=0, slices=2)
    assert planned.ranges == [(0, 0), (1, None)]
    slices = Slices("jobs", 3, planned.ranges, result_window=WINDOW)
    slices.planned_from([[listing.last_served]])
    listing.repeat_next = True
    rows, count = listing.serve(slices.request(0))
    assert [row["date_updated"] for row in rows] == [1] and count == 0
    slices.take(0, rows, count)  # set aside, not "the API did not apply the requested filter"
    seen = set()
    while not slices.done:
        index = next(i for i in range(len(slices.reads)) if slices.ready(i))
        rows, count = listing.serve(slices.request(index))
        seen.update(row["id"] for row in rows)
        slices.take(index, rows, count)
    assert seen == set(listing.records)


class ConcurrentSlices(AdversarialRead):
    """The keyset read cut into slices (`SlicePlan`, `Slices`), their requests interleaved in any
    order with the adversary's changes: the same guarantee, the same kind of request bound."""

    @initialize(
        cursors=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 3)), min_size=0, max_size=80),
        page_size=st.integers(3, 6),
        cap=st.one_of(st.none(), st.integers(3, 6)),
        count_capped=st.booleans(),
        since=st.integers(0, 8),
        slices=st.integers(2, 4),
    )
    def start(self, cursors, page_size, cap, count_capped, since, slices):
        self.listing = Listing([u for u, _ in cursors], created=[c for _, c in cursors])
        self.listing.cap = cap
        self.listing.count_capped = count_capped
        self.honest = True
        self.page_size = page_size
        self.since = since
        self.planned = _planned(self.listing, page_size, since, slices)
        self.slices = Slices("jobs", page_size, self.planned.ranges, result_window=WINDOW,
                             hot_after=self.listing.clock - 1)
        self.served: set[tuple[str, Optional[int]]] = set()
        self.slices.planned_from([[self.listing.last_served]] if self.listing.last_served else [])
        self.stayed = {i for i, r in self.listing.records.items() if r["date_updated"] >= since}
        self.seen: set[str] = set()
        self.failure: Optional[CrmError] = None
        self.changed = False
        self.deletes = 0
        self.bursts = 0
        self.imports = 0  # records added with dates of their own (behind the clock)

    def _changing(self) -> bool:
        return not self.slices.done and not self.changed and self.failure is None

    def _reading(self) -> bool:  # slices have no probe
        return self._changing()

    def _ready(self) -> list[int]:
        if self.failure is not None:
            return []
        return [i for i in range(len(self.slices.reads)) if self.slices.ready(i)]

    def _next_slice_page(self, index: int) -> None:
        rows, count = self.listing.serve(self.slices.request(index))
        self.seen.update(row["id"] for row in rows)
        self.served.update((row["id"], row["date_updated"]) for row in rows)
        try:
            self.slices.take(index, rows, count)
        except CrmError as failure:
            if not self._imported_beyond_twice(failure):
                raise
            self.failure = failure

    @precondition(lambda self: not self.slices.done and self.failure is None)
    @rule(data=st.data())
    def next_page(self, data):
        self._next_slice_page(data.draw(st.sampled_from(self._ready())))
        self.changed = False

    @precondition(lambda self: self.slices.done or self.failure is not None)
    @rule()
    def after_the_read(self):
        pass

    def _bound(self) -> int:
        records = len(self.listing.records) + self.bursts * 12
        slices = len(self.slices.reads) + 1  # the last one's read again
        per_read = 3 * (records // max(1, self.page_size - 1) + 1) + 2 * (self.bursts + 5) + SPARE_REQUESTS
        undisturbed = 3 * (records // max(1, self.page_size - 1) + slices)
        return (self.planned.requests + 1 + undisturbed + slices * (2 * (self.bursts + 5) + SPARE_REQUESTS)
                + (self.deletes + self.imports) * per_read)

    def teardown(self):
        if not hasattr(self, "listing"):
            return
        for _ in range(10_000):  # the rest of the read, undisturbed, slice after slice; it must end
            ready = self._ready()
            if not ready:
                break
            self._next_slice_page(ready[0])
        assert self.slices.done or self.failure is not None, "the read did not end"
        if self.failure is None:  # exact, or a loud failure: never a silent loss
            missing = self.stayed - self.seen
            assert not missing, f"records present throughout the read were not read: {sorted(missing)}"
            self._no_edit_left_behind_the_cursor()
        assert self.listing.requests <= self._bound()


ConcurrentSlices.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestConcurrentSlices = ConcurrentSlices.TestCase


def test_the_adversary_can_break_an_offset_reader():
    """The model is strong enough to matter: a repeat at a page's head makes offset arithmetic
    (advance `from` by the records received) skip a record that never moved."""
    listing = Listing(list(range(1, 21)))
    seen, offset = set(), 0
    while True:
        listing.repeat_next = offset > 0
        rows, count = listing.serve(PageRequest("date_updated", None, None, offset, 5))
        seen.update(r["id"] for r in rows)
        offset += len(rows)
        if not rows or offset >= count:
            break
    assert len(seen) < 20
