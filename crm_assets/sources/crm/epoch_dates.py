"""Integer `date_*` fields land as UTC timestamps, whenever they first appear.

The API sends every date as Unix epoch seconds. The fields every record has (`date_created`,
`date_updated`) and a resource's `epoch_fields` are typed as timestamps up front (`core_columns`).
The real API family has many more (`date_start`, `date_end`, `date_due`, ...), and new fields appear
at any time: this step, on each page, finds a top-level field the resource counts as epoch seconds
(`Endpoint.is_epoch_field`: named `date_*`, not in `not_epoch_fields`) that the table does not hold
yet, and whose first value on the page is an integer. It adds a `timestamp` hint for it, through
dlt's public `dlt.mark.with_hints`, before dlt types the column: dlt's normalizer then coerces its
ints as it does `date_created`'s, and the Arrow pages step (which asks `columns`) builds them as
timestamps too. A field whose first value is text, a float or a bool is left alone, as is a column
the stored schema already holds with another type (readback.py refuses such a warehouse before a
run, naming the full refresh).
"""

from __future__ import annotations

from typing import Any, Optional

import dlt
from dlt.extract.items_transform import ItemTransform

from .catalog import Endpoint


class EpochDates(ItemTransform):  # type: ignore[type-arg]
    """A resource's step hinting new integer `date_*` fields as timestamps (module docstring)."""

    # after dlt's incremental filter (1), before the Arrow pages step (1.5)
    placement_affinity = 1.4

    def __init__(self, endpoint: Endpoint, resource: Optional[Any] = None) -> None:
        super().__init__(lambda item: item)
        self.endpoint = endpoint
        self.resource = resource
        self.name = endpoint.name
        # the fields hinted as timestamps: the declared ones, then those this step found
        self.columns: set[str] = set(endpoint.timestamp_fields)
        self._decided: set[str] = set(self.columns)  # fields looked at (a first non-null value seen)
        self._seeded = False

    def __call__(self, item: Any, meta: Any = None) -> Any:
        if not isinstance(item, list) or not item or not isinstance(item[0], dict):
            return item
        found: dict[str, dict[str, Any]] = {} if self._seeded else self._stored()
        keys: set[str] = set()
        for record in item:
            if type(record) is dict:
                keys.update(record)
        for name in keys - self._decided:
            if not self.endpoint.is_epoch_field(name):
                self._decided.add(name)
                continue
            first = _first_value(item, name)
            if first is None:
                continue  # no value yet: decided by a later page
            self._decided.add(name)
            if type(first) is int and self._free(name):
                found[name] = {"data_type": "timestamp"}
        if not found:
            return item
        self.columns.update(found)
        hints = dlt.mark.make_hints(columns=found)
        if meta is None:
            return dlt.mark.with_hints(item, hints)
        self._resource_hints(found)  # keep the item's own meta; the hint applies from the next write
        return item

    def _stored(self) -> dict[str, dict[str, Any]]:
        """The fields an earlier load found: the stored schema holds them as timestamps (the Arrow
        step then builds their ints on this run's first page too)."""
        self._seeded = True
        try:
            table = dlt.current.source_schema().tables.get(self.name, {})
        except Exception:  # not extracting in a pipeline
            return {}
        stored = {
            name: {"data_type": "timestamp"}
            for name, column in table.get("columns", {}).items()
            if name not in self.columns and column.get("data_type") == "timestamp"
            and self.endpoint.is_epoch_field(name)
        }
        self.columns.update(stored)
        self._decided.update(stored)
        return stored

    def _free(self, name: str) -> bool:
        """The stored schema does not hold the column yet (or holds it as a timestamp)."""
        try:
            table = dlt.current.source_schema().tables.get(self.name, {})
        except Exception:  # not extracting in a pipeline
            return True
        column = table.get("columns", {}).get(name)
        return column is None or column.get("data_type") in (None, "timestamp")

    def _resource_hints(self, columns: dict[str, dict[str, Any]]) -> None:
        if self.resource is not None:
            self.resource.apply_hints(columns=columns)


def _first_value(records: list, name: str) -> Any:
    for record in records:
        if type(record) is dict:
            value = record.get(name)
            if value is not None:
                return value
    return None
