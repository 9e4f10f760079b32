"""Records dated after now, kept from holding the incremental cursor.

dlt's incremental keeps the largest `date_updated` it is shown, and the next sync reads from there.
A record dated hours ahead (a device's clock, an import from another time zone) would put the
cursor hours ahead too, and every edit made until that time would be missed. Its date is not a
place in the listing the read has reached: an edit made after the read started gets a date from the
API's clock, at or after the start.

So around dlt's incremental filter, a record dated more than `HOT_SECONDS` after the read's start
(the margin the keyset read allows between the API's clock and ours) shows the incremental the
read's start less that margin instead, or the cursor it read from if that is later (the filter
drops a record below it). The cursor then stays at or before the read's start, the next sync reads
the record again (it is at the listing's end), and `RestoreDates` puts its own date back for the
table. A date within the margin is left alone, so the cursor is what it was whenever no record
is dated ahead.

dlt's incremental cannot do this itself: its `last_value_func` decides both the cursor and which
records it drops, and a function that capped the cursor would drop the record dated ahead.
"""

from __future__ import annotations

from typing import Any

from dlt.extract.items_transform import ItemTransform

from .keyset import HOT_SECONDS
from .settings import CURSOR_FIELD

# Where a record's own date waits while the incremental sees the capped one.
HELD_KEY = "_crm_dated_ahead"


class CapDatesAhead(ItemTransform):  # type: ignore[type-arg]
    """Before the incremental filter: dates after the read's start plus `HOT_SECONDS` capped."""

    # after the record maps (FieldNames, 0), before dlt's incremental filter (1)
    placement_affinity = 0.5

    def __init__(self) -> None:
        super().__init__(lambda item: item)

    def __call__(self, item: Any, meta: Any = None) -> Any:
        plan = getattr(getattr(item, "paginator", None), "plan", None)  # rest_api's PageData
        if plan is None or not isinstance(item, list):
            return item
        latest = plan.now + HOT_SECONDS
        capped = max(plan.now - HOT_SECONDS, plan.since or 0)
        for record in item:
            if type(record) is dict:
                value = record.get(CURSOR_FIELD)
                if type(value) is int and value > latest:
                    record[HELD_KEY] = value
                    record[CURSOR_FIELD] = capped
        return item


class RestoreDates(ItemTransform):  # type: ignore[type-arg]
    """After the incremental filter: each capped record's own date back."""

    # right after dlt's incremental filter (1), before its limit (1.1)
    placement_affinity = 1.05

    def __init__(self) -> None:
        super().__init__(lambda item: item)

    def __call__(self, item: Any, meta: Any = None) -> Any:
        if isinstance(item, list):  # pages only: CapDatesAhead caps nothing else
            for record in item:
                if type(record) is dict and HELD_KEY in record:
                    record[CURSOR_FIELD] = record.pop(HELD_KEY)
        return item
