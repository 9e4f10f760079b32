"""`KeysetRead` against an adversarial listing: every change the API contract allows, interleaved
with page requests by Hypothesis, and the guarantee checked at the end of every read.

Guarantee (docs/api-contract.md): every record present in the listing for the whole read is read,
and the read takes at most 3x the requests of an undisturbed read plus a constant; otherwise it
fails naming the resource.
"""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from crm_assets.sources.crm.keyset import SPARE_REQUESTS, CrmIncompleteReadError, KeysetRead, PageRequest

WINDOW = 40


class Listing:
    """An in-memory API listing sorted on any date field then id, with the contract's traps."""

    def __init__(self, updated: list[int], window: int = WINDOW, created: Optional[list[int]] = None) -> None:
        created = created or [0] * len(updated)
        self.records: dict[str, dict] = {
            f"r{i:05d}": {"id": f"r{i:05d}", "date_updated": u, "date_created": c}
            for i, (u, c) in enumerate(zip(updated, created))
        }
        self.next_id = len(updated)
        self.window = window
        self.cap: Optional[int] = None
        self.count_capped = False
        self.repeat_next = False
        self.last_served: Optional[dict] = None
        self.requests = 0

    def add(self, updated: int, created: int) -> str:
        self.next_id += 1
        rid = f"r{self.next_id:05d}"
        self.records[rid] = {"id": rid, "date_updated": updated, "date_created": created}
        return rid

    def now(self) -> int:
        return max((r["date_updated"] for r in self.records.values()), default=0) + 1

    def serve(self, page: PageRequest) -> tuple[list[dict], int]:
        assert page.offset + page.size <= self.window, "the read asked past the result window"
        self.requests += 1
        listing = sorted((r for r in self.records.values() if page.matches(r)), key=lambda r: (r[page.field], r["id"]))
        take = min(page.size, self.cap or page.size)
        rows = [dict(r) for r in listing[page.offset : page.offset + take]]
        if self.repeat_next and self.last_served is not None and take >= 2:
            # the previous page's last record again at the head, nothing shifted
            rows = [dict(self.last_served)] + rows[: take - 1]
        self.repeat_next = False
        if rows:
            self.last_served = rows[-1]
        count = len(listing)
        return rows, min(count, self.window) if self.count_capped else count


def read_all(listing: Listing, page_size: int, since: Optional[int] = None) -> KeysetRead:
    read = KeysetRead("jobs", page_size, since=since, result_window=listing.window)
    while not read.done:
        read.take(*listing.serve(read.request()))
    return read


def test_an_undisturbed_read_takes_one_request_per_page_less_one_record():
    listing = Listing(list(range(100, 130)), window=10_000)
    read = read_all(listing, page_size=7)
    assert read.records_read == 30 and read.newest == (129, "r00029")
    assert listing.requests == 5  # 7 + 6 + 6 + 6 + 6 records: one overlap a page


def test_a_bulk_edit_larger_than_the_window_is_read_by_date_created():
    listing = Listing([5] * (3 * WINDOW), created=list(range(3 * WINDOW)))
    read = read_all(listing, page_size=10)
    assert read.records_read == 3 * WINDOW


def test_a_second_larger_than_the_window_in_both_dates_fails_naming_it():
    listing = Listing([5] * (WINDOW + 5), created=[7] * (WINDOW + 5))
    with pytest.raises(CrmIncompleteReadError, match="more than 40 records share date_updated=5 and date_created=7"):
        read_all(listing, page_size=10)


def test_a_record_without_a_cursor_fails_naming_the_field():
    read = KeysetRead("jobs", 10)
    with pytest.raises(CrmIncompleteReadError, match="integer 'date_updated'"):
        read.take([{"id": "a", "date_updated": None}], 1)


def test_an_api_that_keeps_answering_empty_pages_fails_in_bounded_requests():
    read = KeysetRead("contacts", 10)
    with pytest.raises(CrmIncompleteReadError, match="contacts: could not show a complete read"):
        for _ in range(100):
            read.take([], 5)
    assert read.requests <= 3 + SPARE_REQUESTS


class AdversarialRead(RuleBasedStateMachine):
    """One read of a listing that changes between any two of its requests (at most once each)."""

    @initialize(
        cursors=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 3)), min_size=0, max_size=60),
        page_size=st.integers(3, 8),
        cap=st.one_of(st.none(), st.integers(3, 8)),
        count_capped=st.booleans(),
        since=st.one_of(st.none(), st.integers(0, 6)),
    )
    def start(self, cursors, page_size, cap, count_capped, since):
        self.listing = Listing([u for u, _ in cursors], created=[c for _, c in cursors])
        self.listing.cap = cap
        self.listing.count_capped = count_capped
        self.page_size = page_size
        self.since = since
        self.read = KeysetRead("jobs", page_size, since=since, result_window=WINDOW)
        self.matching = lambda c: since is None or c >= since
        # ids in the listing at the start and not removed since: what the read must return
        self.stayed = {i for i, r in self.listing.records.items() if self.matching(r["date_updated"])}
        self.seen: set[str] = set()
        self.changed = False
        self.changes = 0
        self.bursts = 0

    # -- the server's changes, at most one between two requests ----------------------------

    def _changed(self) -> None:
        self.changed = True
        self.changes += 1

    @precondition(lambda self: not self.changed and not self.read.done)
    @rule()
    def append(self):
        now = self.listing.now()
        self.listing.add(now, now)
        self._changed()

    @precondition(lambda self: not self.changed and not self.read.done)
    @rule(updated=st.integers(0, 14), created=st.integers(0, 3))
    def insert_anywhere(self, updated, created):
        self.listing.add(updated, created)
        self._changed()

    @precondition(lambda self: not self.changed and not self.read.done and self.listing.records)
    @rule(data=st.data(), behind=st.booleans())
    def hard_delete(self, data, behind):
        # behind the read (already read: the rest of the listing shifts back) or ahead of it
        pool = sorted(i for i in self.listing.records if (i in self.seen) == behind)
        if not pool:
            return
        victim = data.draw(st.sampled_from(pool))
        del self.listing.records[victim]
        self.stayed.discard(victim)
        self._changed()

    @precondition(lambda self: not self.changed and not self.read.done and self.listing.records)
    @rule(data=st.data())
    def edit(self, data):
        # an edit moves date_updated to now: the record stays in the listing, at its end
        record = data.draw(st.sampled_from(sorted(self.listing.records)))
        self.listing.records[record]["date_updated"] = self.listing.now()
        self._changed()

    @precondition(lambda self: not self.changed and not self.read.done)
    @rule(size=st.integers(2, 12), at=st.one_of(st.none(), st.integers(0, 14)), spread=st.booleans())
    def same_second_burst(self, size, at, spread):
        # records sharing one date_updated (a bulk edit: their date_created spread) or both dates
        second = self.listing.now() if at is None else at
        for n in range(size):
            self.listing.add(second, n % 4 if spread else second)
        self.bursts += 1
        self._changed()

    @precondition(lambda self: not self.changed and not self.read.done)
    @rule()
    def repeat_at_next_head(self):
        self.listing.repeat_next = True
        self._changed()

    # -- the client ---------------------------------------------------------------------------

    @precondition(lambda self: not self.read.done)
    @rule()
    def next_page(self):
        rows, count = self.listing.serve(self.read.request())
        self.seen.update(row["id"] for row in rows)
        self.read.take(rows, count)
        self.changed = False

    @precondition(lambda self: self.read.done)
    @rule()
    def after_the_read(self):
        pass  # changes after the read ends are the next sync's business

    @invariant()
    def within_the_request_bound(self):
        # the read's own budget raises before it passes this; an undisturbed read of the largest
        # listing seen, three times over, plus the end checks of walked seconds and a constant
        if hasattr(self, "listing"):
            assert self.listing.requests <= self._bound()

    def _bound(self) -> int:
        records = len(self.listing.records) + self.bursts * 12
        return 3 * (records // max(1, self.page_size - 1) + 1) + 2 * (self.bursts + 5) + SPARE_REQUESTS

    def teardown(self):
        if not hasattr(self, "listing"):
            return
        while not self.read.done:  # the rest of the read, undisturbed
            rows, count = self.listing.serve(self.read.request())
            self.seen.update(row["id"] for row in rows)
            self.read.take(rows, count)
        missing = self.stayed - self.seen
        assert not missing, f"records present throughout the read were not read: {sorted(missing)}"
        assert self.listing.requests <= self._bound()


AdversarialRead.TestCase.settings = settings(
    max_examples=400, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestAdversarialRead = AdversarialRead.TestCase


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
