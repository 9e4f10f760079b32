"""No silent column loss: fields whose names normalize to the same column land in distinct columns.

dlt's naming convention (snake_case) maps `Status` and `status` to the column `status`, and
`first-name` and `first_name` to `first_name`; a record carrying both would land one value and drop
the other. This step runs on every record before the source's other steps (lists, dates, the Arrow
step), so dlt's normalizer and the Arrow step see the same keys. The rule:

- A field keeps dlt's column when it is the first to claim that column. The resource's declared
  columns (primary key, dates, `is_active`, ...) belong to the field of that very name from the start.
- A different field whose name normalizes to a claimed column (earlier in the same record, by an
  earlier record, or in an earlier run) is renamed to the first free `<column>_2`, `<column>_3`, ...
- Among a record's new fields, those already in normalized form claim first, then the others in
  sorted order: the outcome does not depend on key order.
- Nested objects too, on their flattened columns: `location.Geo` next to `location.geo` lands in
  `location__geo_2`.

The claims are kept in the resource's dlt state, which dlt commits with the data and restores from
the destination: a colliding field that appears in a later sync lands as it would have from the
start. Names are normalized with the source schema's naming convention (the destination's), as dlt's
normalizer does. A renaming is logged (a warning) in the run that first makes it.

Cost: a record's key tuple is looked up among the shapes already worked out, and its objects are
counted in C; only a new shape (a few per resource) is planned. benchmarks/field_names.py measures it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from itertools import chain
from typing import Any, Optional

import dlt
from dlt.extract.items_transform import ItemTransform

logger = logging.getLogger("crm_assets.sources.crm")

# The resource state key holding the claims: a list of [field path, key it lands as].
STATE_KEY = "field_names"

Path = tuple[str, ...]
# A plan for one shape of object: the keys to rename (None: none); for each key, where an object
# under it is planned (its path, its column's fragments, the plans of its shapes); the keys seen
# holding an object in this shape.
Plan = tuple[Optional[dict[str, str]], dict[str, tuple[Path, Path, dict]], list[str]]


class FieldNames(ItemTransform):  # type: ignore[type-arg]
    """A resource's step renaming the fields that would share a column (module docstring), page by
    page. `reserved` are the resource's declared columns; `naming` a dlt naming convention for use
    outside a pipeline (by default the source schema's, looked up on the first page)."""

    # with the record maps: right after the read, before dlt's incremental filter (1)
    placement_affinity = 0

    def __init__(self, resource: str, reserved: Iterable[str] = (), naming: Any = None) -> None:
        super().__init__(lambda item: item)
        self.resource = resource
        self.reserved = tuple(reserved)
        self.given_naming = naming
        self._lock = threading.Lock()
        self._start(None)

    @classmethod
    def of(cls, resource: Any) -> "FieldNames":
        """The step for a dlt resource, its declared columns (`columns` hints) reserved."""
        try:
            declared = resource.compute_table_schema().get("columns", {})
        except Exception:  # hints that need a data item to resolve
            declared = {}
        return cls(resource.name, declared)

    def _start(self, state: Optional[dict]) -> None:
        """Forget what an earlier run saw: its claims may not have been committed."""
        self._run = state  # the dlt resource state of the run the claims below belong to
        self._ready = False
        self.naming = self.given_naming
        # raw path of a field (("location", "Geo")) -> the key it lands as ("geo_2")
        self._lands: dict[Path, str] = {}
        self._owner: dict[str, Path] = {}  # column -> the field that claimed it
        self._stored: set[str] = set()  # columns the stored schema holds (a suffix avoids them)
        self._state: Optional[list] = None  # the claims in dlt state, when in a pipeline
        # raw path of an object -> its key tuples already planned
        self._plans: dict[Path, dict[tuple, Plan]] = {}
        self._top: dict[tuple, Plan] = self._plans.setdefault((), {})

    def __call__(self, item: Any, meta: Any = None) -> Any:
        try:
            state = dlt.current.resource_state(self.resource)
        except Exception:  # not extracting in a pipeline
            state = None
        if state is not self._run:  # a new run (the source's steps may be reused)
            with self._lock:
                self._start(state)
        if type(item) is dict:
            return self.record(item)
        if isinstance(item, list):  # a page (rest_api's PageData is a list)
            if self._plain_page(item):
                return item
            top, apply = self._top, self._apply
            for index, record in enumerate(item):
                if type(record) is not dict:
                    continue
                plan = top.get(tuple(record))  # the usual case: a shape seen before, nothing to do
                if plan is None:
                    plan = self._plan((), (), record)
                objects = list(map(type, record.values())).count(dict)  # counted in C
                if objects or plan[0] is not None:
                    renamed = apply(plan, record, objects)
                    if renamed is not record:
                        item[index] = renamed
        return item

    def _plain_page(self, item: list) -> bool:
        """Nothing to rename on this page: every record a shape planned before with no renaming,
        and no object among its values. Checked over the whole page in C (the usual page of a flat
        resource), not record by record."""
        if set(map(type, item)) != {dict} or dict in set(map(type, chain.from_iterable(map(dict.values, item)))):
            return False
        top = self._top
        for shape in set(map(tuple, item)):
            plan = top.get(shape)
            if plan is None or plan[0] is not None:
                return False
        return True

    def record(self, record: dict) -> dict:
        """The record with its colliding keys renamed (a new dict if any is)."""
        plan = self._top.get(tuple(record))
        if plan is None:
            plan = self._plan((), (), record)
        return self._apply(plan, record, list(map(type, record.values())).count(dict))

    def _apply(self, plan: Plan, record: dict, objects: int) -> dict:
        """`record` renamed by its shape's `plan`; `objects`: how many of its values are objects."""
        renames, children, object_keys = plan
        if objects:
            found = 0
            for key in object_keys:  # the keys that held an object in this shape before
                value = record[key]
                if type(value) is dict:
                    found += 1
                    self._nested(children[key], record, key, value)
            if found != objects:  # an object where this shape had none yet
                for key, value in record.items():
                    if type(value) is dict and key not in object_keys:
                        object_keys.append(key)
                        self._nested(children[key], record, key, value)
        if renames is not None:
            record = {renames.get(key, key): value for key, value in record.items()}
        return record

    def _nested(self, child: tuple[Path, Path, dict], record: dict, key: str, value: dict) -> None:
        path, fragments, plans = child
        plan = plans.get(tuple(value))
        if plan is None:
            plan = self._plan(path, fragments, value)
        renamed = self._apply(plan, value, list(map(type, value.values())).count(dict))
        if renamed is not value:
            record[key] = renamed

    # -- planning a new shape ---------------------------------------------------------------------

    def _plan(self, path: Path, fragments: Path, record: dict) -> Plan:
        with self._lock:  # pages of one resource may be mapped on several threads
            if not self._ready:
                self._load()
            keys = tuple(record)
            lands = self._lands
            new = [key for key in keys if path + (key,) not in lands]
            if new:
                normalize = self.naming.normalize_path
                # a key dlt cannot name (empty, blank) is left to dlt
                new = [key for key in new if key and not key.isspace()]
                plain = [key for key in new if normalize(key) == key]
                others = sorted(key for key in new if normalize(key) != key)
                for key in plain + others:
                    self._claim(path, fragments, key)
            normalize = self.naming.normalize_path
            renames, children = {}, {}
            for key in keys:
                out = lands.get(path + (key,), key)
                # a field keeping dlt's column keeps its name too (dlt normalizes it as before)
                if out != key and out != normalize(key):
                    renames[key] = out
                # where an object under this key is planned: its path, its column prefix
                children[key] = (path + (key,), fragments + (out,), self._plans.setdefault(path + (key,), {}))
            plan: Plan = (renames or None, children, [])
            self._plans.setdefault(path, {})[keys] = plan
            return plan

    def _claim(self, path: Path, fragments: Path, key: str) -> None:
        naming = self.naming
        field = path + (key,)
        base = naming.normalize_path(key)
        out = base
        column = naming.shorten_fragments(*fragments, out)
        owner = self._owner.get(column)
        if owner is not None:  # claimed by another field: the first free suffix
            n = 2
            while True:
                out = naming.normalize_path(f"{base}_{n}")
                column = naming.shorten_fragments(*fragments, out)
                if column not in self._owner and column not in self._stored:
                    break
                n += 1
            logger.warning(
                "%s: fields `%s` and `%s` both normalize to `%s`; `%s` lands in `%s`",
                self.resource, ".".join(owner), ".".join(field),
                naming.shorten_fragments(*fragments, base), ".".join(field), column,
            )
        self._lands[field] = out
        self._owner[column] = field
        if self._state is not None:
            self._state.append([list(field), out])

    def _load(self) -> None:
        """The naming convention, the stored schema's columns and the claims of earlier runs (dlt
        state); the reserved columns claimed by their own names."""
        self._ready = True
        schema = None
        try:
            schema = dlt.current.source_schema()
        except Exception:  # not extracting in a pipeline: claims live for this object only
            pass
        state = self._run
        if self.naming is None:
            if schema is None:
                from dlt.common.normalizers.naming.snake_case import NamingConvention

                self.naming = NamingConvention()
            else:
                self.naming = schema.naming
        if schema is not None:
            self._stored.update(schema.tables.get(self.resource, {}).get("columns", {}))
        if state is not None:
            self._state = state.setdefault(STATE_KEY, [])
            for field, out in self._state:
                field = tuple(field)
                fragments = self._fragments(field)
                self._lands[field] = out
                self._owner[self.naming.shorten_fragments(*fragments, out)] = field
        for name in self.reserved:
            column = self.naming.normalize_path(name)
            if column not in self._owner:
                self._lands[(name,)] = column
                self._owner[column] = (name,)

    def _fragments(self, field: Path) -> Path:
        """The keys a field's parents land as (their claims come first in the state)."""
        return tuple(self._lands.get(field[: i + 1], field[i]) for i in range(len(field) - 1))

