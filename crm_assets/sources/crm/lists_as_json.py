"""Lists stay in their record's row, in the warehouse's JSON type.

dlt's default makes a child table of every list (`jobs__tags`, linked to its record by
`_dlt_parent_id`). This source keeps each list in its record's own row instead, in a column of
dlt's `json` type (`jobs.tags`, and `location__aliases` for a list inside a nested object): DuckDB
`JSON`, PostgreSQL `json` (below). Why one row per record:

- the merge replaces a record whole: a list that shrank or emptied leaves no stale rows behind,
  and a hard delete removes everything the record had;
- the Arrow pages step (arrow_pages.py) builds every table while extracting, on dlt's public API
  (dlt's extract takes no nested tables);
- one table per resource to load, merge and check.

How, with dlt's own means: this step hints a field `json` the first time a list shows up in it
(`dlt.mark.with_hints`, as epoch_dates.py does for dates). dlt's normalizer leaves the value of a
`json` column in place (no child table) and writes it as its JSON text (`dlt.common.json`). With the
Arrow step on, this step also replaces each such list by that very text (`JsonText`), which the
Arrow step builds as a string column: dlt writes a `json` column to parquet as a string too, so both
paths write the same files. (dlt notes the Arrow string under a `json` hint on every page;
arrow_pages.py drops that one notice for the pages it vouches for.)

Nested objects are still flattened into columns (`location__geo__lat`); a list of objects is kept
whole. A field is decided by its first non-null value in a sync: a list makes it a JSON column. A
field the table already holds with another type (or whose first value was a string, say) keeps
its column, and a list in it lands as its JSON text there or in dlt's variant column
(`<field>__v_text`), as a type change does.

PostgreSQL gets `json`, not `jsonb`: dlt loads parquet into PostgreSQL with ADBC's binary COPY,
which cannot write `jsonb`, so dlt creates such columns as `json` for parquet loads. The values and
the `->`, `->>`, `json_array_elements_text` operators are the same; `tags::jsonb` gives `jsonb`'s
containment and indexing in a query or a view. Figures in benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import dlt
from dlt.common.json import json
from dlt.extract.hints import HintsMeta
from dlt.extract.items_transform import ItemTransform

# the keys of a HintsMeta holding column hints only (dlt.mark.make_hints(columns=...))
_COLUMN_HINTS = frozenset({"columns", "original_columns"})


class JsonText(str):
    """A list's JSON text, made by this step for a `json` column: the Arrow step takes these as the
    column's values (and leaves any other value in a `json` column to dlt's normalizer)."""

    __slots__ = ()


class ListsAsJson(ItemTransform):  # type: ignore[type-arg]
    """A resource's step keeping every list in its record's row, in a `json` column (module
    docstring). `json_columns` are columns the resource declares `json` (kept whole, objects too);
    `encode` (the Arrow step is on) replaces lists by their `JsonText`; `naming` is a dlt naming
    convention for use outside a pipeline (by default the source schema's)."""

    # after dlt's incremental filter (1) and the epoch dates step (1.4), before the Arrow step (1.5)
    placement_affinity = 1.45

    def __init__(self, resource: Any = None, json_columns: Iterable[str] = (), *, encode: bool = False,
                 naming: Any = None) -> None:
        super().__init__(lambda item: item)
        self.resource = resource
        self.table = getattr(resource, "name", None)
        self.encode = encode
        self.naming = naming
        # the columns of dlt's `json` type (declared, stored, or hinted here): a live set the
        # Arrow step reads
        self.columns: set[str] = set(json_columns)
        self._other: set[str] = set()  # columns decided otherwise (stored so, or a first non-list value)
        # by the path of an object (() for the record): its fields decided so far, whether each is
        # a JSON column
        self._fields: dict[tuple[str, ...], dict[str, Any]] = {}
        self._seeded = False
        # the last page held a value other than a list (or null) in a `json` column: the Arrow step
        # must then check record by record
        self.other_values_in_json_columns = False

    def __call__(self, item: Any, meta: Any = None) -> Any:
        if not isinstance(item, list) or not item:
            return item
        # the stored JSON columns are hinted again on a sync's first page: a page the Arrow step
        # builds would otherwise retype them as text in dlt's schema
        found: set[str] = set() if self._seeded else self._seed()
        self.other_values_in_json_columns = False
        if not found and self._plain_page(item):
            return item
        for record in item:
            if type(record) is dict:
                self._walk(record, (), found)
        if not found:
            return item
        hints: dict[str, Any] = {name: {"data_type": "json"} for name in found}
        if meta is None:
            return dlt.mark.with_hints(item, dlt.mark.make_hints(columns=hints))
        if isinstance(meta, HintsMeta) and not meta.create_table_variant and set(meta.hints) <= _COLUMN_HINTS:
            # the epoch dates step's hints for this page: one meta carries both (dlt applies the
            # meta of the item it writes to the resource it extracts)
            columns = {**(meta.hints.get("columns") or {}), **hints}
            return dlt.mark.with_hints(item, dlt.mark.make_hints(columns=columns))
        if self.resource is not None:  # keep the item's own meta; the hint applies from the next write
            self.resource.apply_hints(columns=hints)
        return item

    def _plain_page(self, item: list) -> bool:
        """Nothing to do on this page: records of fields all decided as no JSON column, without a
        list or an object among their values. Checked over the whole page in C (the usual page of
        a flat resource), not field by field in `_walk`."""
        top = self._fields.get(())
        if top is None or set(map(type, item)) != {dict}:
            return False
        kinds = set(map(type, chain.from_iterable(map(dict.values, item))))
        if list in kinds or dict in kinds:
            return False
        return all(top.get(key) is False for key in set(chain.from_iterable(item)))

    def _seed(self) -> set[str]:
        """Learns the columns the resource declares and the stored schema holds, as they are typed;
        returns the stored JSON columns the resource does not declare."""
        self._seeded = True
        try:
            schema = dlt.current.source_schema()
        except Exception:  # not extracting in a pipeline
            schema = None
        if self.naming is None and schema is not None:
            self.naming = schema.naming
        declared = getattr(self.resource, "columns", None)
        declared = declared if isinstance(declared, dict) else {}
        stored = schema.tables.get(self.table, {}).get("columns", {}) if schema is not None and self.table else {}
        for columns in (declared, stored):
            for name, column in columns.items():
                data_type = column.get("data_type")
                if data_type == "json":
                    self.columns.add(name)
                elif data_type is not None and name not in self.columns:
                    self._other.add(name)
        return {name for name, column in stored.items()
                if column.get("data_type") == "json" and declared.get(name, {}).get("data_type") != "json"}

    def _column(self, path: tuple[str, ...]) -> str:
        if self.naming is None:
            return "__".join(path)
        return self.naming.shorten_fragments(*(self.naming.normalize_identifier(p) for p in path))

    def _decide(self, path: tuple[str, ...], kind: type, found: set[str]) -> bool:
        """Whether the field at `path` is a JSON column: declared or stored so, or new with a list
        as its first value."""
        name = self._column(path)
        if name in self.columns:
            return True
        if name in self._other or kind is not list:
            self._other.add(name)
            return False
        self.columns.add(name)
        found.add(name)
        return True

    def _walk(self, record: dict, prefix: tuple[str, ...], found: set[str]) -> None:
        fields = self._fields.get(prefix)
        if fields is None:
            fields = self._fields[prefix] = {}
        for key, value in record.items():
            if value is None:
                continue
            kind = type(value)
            is_json = fields.get(key)
            if is_json is None or is_json is _OBJECT:
                if kind is dict:
                    if is_json is None and self._column(prefix + (key,)) in self.columns:
                        is_json = fields[key] = True  # declared JSON: kept whole
                    else:  # a nested object: its fields are columns
                        fields[key] = _OBJECT
                        self._walk(value, prefix + (key,), found)
                        continue
                else:
                    is_json = fields[key] = self._decide(prefix + (key,), kind, found)
            if is_json:
                if kind is list:
                    if self.encode:
                        record[key] = JsonText(json.dumps(value))
                else:  # an object or a scalar in a JSON column: dlt's normalizer decides
                    self.other_values_in_json_columns = True
            elif kind is list:  # a list in a column of another type: its JSON text, as a type change
                record[key] = json.dumps(value)
            elif kind is dict:
                self._walk(value, prefix + (key,), found)


# a field whose values so far were objects (flattened into columns), in ListsAsJson._fields
_OBJECT: Any = object()
