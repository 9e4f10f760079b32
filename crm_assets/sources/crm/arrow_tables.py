"""Building one page's Arrow table exactly as dlt's normalizer would (see arrow_pages.py).

Imported by the `ArrowPages` step on its first page, not with the code location: pyarrow's C++
side picks its memory pool when pyarrow is first imported, and a sync (sources/tuning.py) wants
that to be the C library's malloc.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
from dlt.common.libs.pyarrow import get_py_arrow_datatype
from dlt.common.schema.utils import autodetect_sc_type

from .dlt_columns import ROOT_COLUMNS
from .lists_as_json import JsonText

# The Python type of a column's values, by the column's dlt type. A `json` column takes the lists
# the lists step encoded (JsonText), built as strings: dlt writes a `json` column to parquet as its
# JSON text. A column of any other dlt type (timestamp, decimal, ...) takes no value here (but see
# _EPOCH): its records go through dlt's normalizer.
_PY_TYPES = {"text": str, "bigint": int, "double": float, "bool": bool, "json": JsonText}
_TAKEN_KINDS = frozenset(_PY_TYPES.values())
_ARROW_TYPES = {pa.string(): str, pa.int64(): int, pa.float64(): float, pa.bool_(): bool}


class _NotTaken:
    """The type of a column whose values are always left to dlt's normalizer."""


_NOT_TAKEN = _NotTaken
_INT64 = (-(2**63), 2**63 - 1)


class _Epoch:
    """The type of a timestamp column the resource hints, whose int values (Unix epoch seconds)
    are taken: dlt's normalizer coerces them with `pendulum.from_timestamp`, a UTC instant."""


_EPOCH = _Epoch
# What dlt writes for such a column: a `timestamp` of the destination's default precision,
# microseconds, tz-aware. dlt relabels an arrow column from UTC to its context timezone (the same
# instants), as it would label the normalizer's datetimes. Columns dlt types otherwise (another
# precision, `timezone: False`, a destination without tz-aware timestamps) are left to dlt.
_EPOCH_TYPE = pa.timestamp("us", tz="UTC")
# The seconds `pendulum.from_timestamp` turns into a datetime (years 1 to 9999); dlt's normalizer
# makes a variant column of (or fails on) any other int.
_EPOCH_RANGE = (-62135596800, 253402300799)


def _epoch_column(spec: dict[str, Any], caps: Any) -> bool:
    """dlt would write the timestamp column `spec` as _EPOCH_TYPE at the destination `caps`."""
    return (
        caps is not None
        and spec.get("data_type") == "timestamp"
        and get_py_arrow_datatype(spec, caps, "UTC") == _EPOCH_TYPE  # type: ignore[arg-type]
    )


def _takeable(kind: type, value: Any) -> bool:
    """A value of a type this step builds, within its Arrow type's range."""
    return kind in _TAKEN_KINDS and (kind is not int or _INT64[0] <= value <= _INT64[1])


# dlt shortens longer identifiers on some destinations (PostgreSQL: 63): left to dlt.
_MAX_NAME = 63
_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, TypeError)


def random_row_keys(n: int) -> pa.Array:
    """n random 16-character row keys: 12 random bytes each, base64 (no padding), in one buffer."""
    raw = base64.b64encode(os.urandom(12 * n))
    offsets = pa.array(range(0, 16 * n + 1, 16), pa.int32()).buffers()[1]
    return pa.StringArray.from_buffers(n, offsets, pa.py_buffer(raw))


class _Rejected(Exception):
    """A record this step cannot build exactly as dlt's normalizer would."""


class ColumnTypes:
    """What a resource's tables hold: the Python type of each column (from the schema, then from
    the first value taken), and which names dlt leaves alone.

    `hinted` are the resource's own columns; `caps` the destination's capabilities (None: none
    known, and the hinted timestamp columns are left to dlt). `epoch_names`, a live set, names the
    root table's columns hinted as timestamps after the first page (epoch_dates.py): a new column
    of those is epoch seconds too. `json_names`, a live set, names its `json` columns
    (lists_as_json.py): a new column of those takes JsonText."""

    def __init__(self, schema: Any, resource: str, hinted: dict[str, Any], caps: Any = None,
                 epoch_names: Optional[set[str]] = None, json_names: Optional[set[str]] = None) -> None:
        self.schema = schema
        self.resource = resource
        self.epoch_names = epoch_names if epoch_names is not None else set()
        self.json_names = json_names if json_names is not None else set()
        # how a new column hinted as a plain timestamp is built: from epoch seconds, or by dlt
        self.new_epoch_kind = _EPOCH if _epoch_column({"data_type": "timestamp"}, caps) else _NOT_TAKEN
        self.tables: dict[str, dict[str, type]] = {}
        self.not_null: dict[str, set[str]] = {
            resource: {name for name, spec in hinted.items() if spec.get("nullable") is False}
        }
        self.plain_names: dict[str, bool] = {}  # plain_name()'s answers
        # timestamps the resource hints: dlt coerces their ints (epoch seconds) row by row
        epoch = {column for column, spec in hinted.items() if _epoch_column(spec, caps)}
        # the resource's own column hints (the schema may not hold its table yet: the first page)
        self.tables[resource] = {
            column: _EPOCH if column in epoch else _PY_TYPES.get(spec["data_type"], _NOT_TAKEN)
            for column, spec in hinted.items()
            if spec.get("data_type")
        }
        columns = schema.tables.get(resource, {}).get("columns", {})
        self.tables[resource].update(
            # a hinted timestamp the stored schema holds as one stays epoch seconds; one it holds
            # otherwise (bigint from before the hint) is dlt's to reconcile
            (column, _EPOCH if (column in epoch or column in self.epoch_names) and _epoch_column(spec, caps)
             else _PY_TYPES.get(spec["data_type"], _NOT_TAKEN))
            for column, spec in columns.items()
            if spec.get("data_type")
        )
        self.not_null[resource].update(
            column for column, spec in columns.items() if spec.get("nullable") is False
        )
        # the root table's columns built from epoch seconds (learn() adds the new ones)
        self.epoch = frozenset(column for column, kind in self.tables[resource].items() if kind is _EPOCH)

    def new_column_kind(self, table: str, name: str) -> Optional[type]:
        """The type of a new root column hinted as a timestamp or as `json` since the first page;
        None for any other new column (typed by its first value)."""
        if table == self.resource:
            if name in self.epoch_names:
                return self.new_epoch_kind
            if name in self.json_names:
                return JsonText
        return None

    def plain_name(self, name: str) -> bool:
        """dlt keeps `name` as it is, and cannot confuse it with a flattened or dlt column."""
        plain = self.plain_names.get(name)
        if plain is None:
            plain = (
                len(name) <= _MAX_NAME
                and "__" not in name
                and not name.startswith("_dlt")
                and self.schema.naming.normalize_identifier(name) == name
            )
            self.plain_names[name] = plain
        return plain

    @property
    def _detections(self) -> Any:
        # the schema's type detections, as dlt's normalizer applies them (its settings always
        # hold them: dlt writes its standard detections there when it creates a schema)
        return self.schema.settings.get("detections") or []

    def plain_new_column(self, name: str, value: Any) -> bool:
        """dlt would type a new column `name` whose first value is `value` by its Python type
        alone (no detection such as ISO timestamps in strings, no preferred type for the name)."""
        return (
            len(name) <= _MAX_NAME
            and self.schema.get_preferred_type(name) is None
            and autodetect_sc_type(self._detections, type(value), value) is None
        )

    def learn(self, new: dict[str, dict[str, type]]) -> None:
        for table, columns in new.items():
            self.tables.setdefault(table, {}).update(columns)
        epoch = [name for name, kind in new.get(self.resource, {}).items() if kind is _EPOCH]
        if epoch:
            self.epoch = self.epoch | frozenset(epoch)


class _RecordCheck:
    """Which records of a page can be taken (the page-by-page check found a mixed page)."""

    def __init__(self, resource: str, types: ColumnTypes) -> None:
        self.resource = resource
        self.types = types

    def split(self, records: list[dict]) -> tuple[list[dict], list[dict]]:
        """(records taken, records left to dlt). A new column's type is the first taken value's."""
        taken: list[dict] = []
        left: list[dict] = []
        new: dict[str, dict[str, type]] = {}
        for record in records:
            if not isinstance(record, dict):
                left.append(record)
                continue
            added: list[tuple[str, str, type]] = []
            try:
                self._record(self.resource, record, "", new, added)
            except _Rejected:
                for table, name, _ in added:
                    del new[table][name]
                # dlt will type this record's new columns by its values: later records must agree
                self._first_seen(self.resource, record, "", new)
                left.append(record)
                continue
            taken.append(record)
        self.types.learn(new)
        return taken, left

    def _record(self, table: str, record: dict, prefix: str, new: dict[str, dict[str, type]],
                added: list[tuple[str, str, type]]) -> None:
        known = self.types.tables.get(table, {})
        plain_names = self.types.plain_names
        for key, value in record.items():
            if value is None:
                continue
            plain = plain_names.get(key)
            if not (plain or (plain is None and self.types.plain_name(key))):
                raise _Rejected
            name = prefix + key
            kind = type(value)
            expected = known.get(name)
            if expected is kind:  # the usual case: a known column, a value of its type
                if not _takeable(kind, value):
                    raise _Rejected
                continue
            if expected is _EPOCH:
                # an int dlt makes a timestamp of; dlt coerces floats and strings its own way
                if kind is not int or not _EPOCH_RANGE[0] <= value <= _EPOCH_RANGE[1]:
                    raise _Rejected
                continue
            if kind is list:  # not encoded by the lists step (lists_as_json.py): dlt's
                raise _Rejected
            if kind is dict:
                if name in known:  # dlt would store it in that column (as JSON), not flatten it
                    raise _Rejected
                self._record(table, value, name + "__", new, added)
                continue
            self._value(table, name, value, kind, new, added)

    def _first_seen(self, table: str, record: dict, prefix: str, new: dict[str, dict[str, type]]) -> None:
        """Registers the new columns of a record left to dlt, as dlt will type them: by this first
        value when it is plain (later values must have its type), else as columns never taken."""
        naming = self.types.schema.naming
        for key, value in record.items():
            if value is None:
                continue
            plain = self.types.plain_name(key)
            name = prefix + (key if plain else naming.normalize_identifier(key))
            kind = type(value)
            if kind is dict:
                self._first_seen(table, value, name + "__", new)
            elif kind is not list:  # a list is a child table's
                self._register(table, name, value, plain, new)

    def _register(self, table: str, name: str, value: Any, plain: bool, new: dict[str, dict[str, type]]) -> None:
        if name in self.types.tables.get(table, {}) or name in new.get(table, {}):
            return
        hinted = self.types.new_column_kind(table, name) if plain else None
        if hinted is not None:  # dlt types it by the hint, whatever this value
            new.setdefault(table, {})[name] = hinted
            return
        kind = type(value)
        takes = plain and _takeable(kind, value) and self.types.plain_new_column(name, value)
        new.setdefault(table, {})[name] = kind if takes else _NOT_TAKEN

    def _value(self, table: str, name: str, value: Any, kind: type, new: dict[str, dict[str, type]],
               added: list[tuple[str, str, type]]) -> None:
        expected = self.types.tables.get(table, {}).get(name) or new.get(table, {}).get(name)
        if expected is None:
            expected = self.types.new_column_kind(table, name)
            if expected is not None:  # a column hinted as a timestamp on this page
                new.setdefault(table, {})[name] = expected
                added.append((table, name, expected))
        if expected is _EPOCH:
            if kind is not int or not _EPOCH_RANGE[0] <= value <= _EPOCH_RANGE[1]:
                raise _Rejected
            return
        if not _takeable(kind, value) or len(table) > _MAX_NAME:
            raise _Rejected
        if expected is None:
            if not self.types.plain_new_column(name, value):
                raise _Rejected
            new.setdefault(table, {})[name] = kind
            added.append((table, name, kind))
        elif expected is not kind:
            raise _Rejected


class _PageTypes:
    """Whether pyarrow's types for a whole page are the columns' types (the usual case).
    `json_text`: every value in the page's `json` columns is JsonText (or null)."""

    def __init__(self, types: ColumnTypes, json_text: bool = False) -> None:
        self.types = types
        self.json_text = json_text
        self.new: dict[str, dict[str, type]] = {}

    def match(self, table: str, struct: pa.StructType, prefix: str = "") -> bool:
        known = self.types.tables.get(table, {})
        for field in struct:
            name = prefix + field.name
            arrow_type = field.type
            if not self.types.plain_name(field.name):
                return False
            if pa.types.is_null(arrow_type):
                continue
            if pa.types.is_struct(arrow_type):
                if name in known or not self.match(table, arrow_type, name + "__"):
                    return False
                continue
            if not self._leaf(table, name, arrow_type):
                return False
        return True

    def _leaf(self, table: str, name: str, arrow_type: pa.DataType) -> bool:
        py_type = _ARROW_TYPES.get(arrow_type)
        if py_type is None or len(table) > _MAX_NAME:
            return False
        expected = self.types.tables.get(table, {}).get(name)
        if expected is None:
            expected = self.types.new_column_kind(table, name)
            if expected is not None:  # a column hinted as a timestamp on this page
                self.new.setdefault(table, {})[name] = expected
        if expected is _EPOCH:  # ints only (a float among them makes the whole field double)
            return py_type is int
        if expected is JsonText:  # strings, all of them encoded lists
            return py_type is str and self.json_text
        if expected is None:
            # pyarrow types a mix of ints and floats as double, dlt by the first value: only the
            # record-by-record check can tell which came first
            if py_type is float:
                return False
            self.new.setdefault(table, {})[name] = py_type
            return True
        return expected is py_type

    def new_columns_plain(self, table: pa.Table) -> bool:
        """dlt would infer nothing but the Python type from each new column's first value."""
        for columns in self.new.values():
            for name, kind in columns.items():
                if name not in table.column_names or kind is _EPOCH or kind is _NOT_TAKEN:
                    continue
                values = table.column(name).drop_null()
                if len(values) and not self.types.plain_new_column(name, values[0].as_py()):
                    return False
        return True


def _flatten(array: pa.StructArray, prefix: str, out: list[tuple[str, pa.Array]]) -> None:
    # StructArray.flatten() applies the parent's nulls to each child
    for field, child in zip(array.type, array.flatten()):
        if pa.types.is_struct(field.type):
            _flatten(child, prefix + field.name + "__", out)
        else:
            out.append((prefix + field.name, child))


def build_table(resource: str, array: pa.StructArray, load_id: str,
                not_null: frozenset[str] = frozenset(), epoch: frozenset[str] = frozenset()) -> Optional[pa.Table]:
    """The resource's table from a page's struct array, nested objects flattened; None if a column
    declared not null holds a null (dlt's normalizer then raises its error), if an `epoch` column
    (int64 seconds, built as timestamps) holds seconds dlt makes no timestamp of, or if a list is
    left (a child table, dlt's normalizer's to build)."""
    leaves: list[tuple[str, pa.Array]] = []
    _flatten(array, "", leaves)
    names: list[str] = []
    columns: list[pa.Array] = []
    try:
        for name, leaf in leaves:
            if pa.types.is_null(leaf.type):
                continue
            if pa.types.is_list(leaf.type):
                raise _Rejected
            names.append(name)
            columns.append(_epoch_timestamps(leaf) if name in epoch else leaf)
    except _Rejected:
        return None
    table = pa.Table.from_arrays(columns, names=names)
    table = table.append_column("_dlt_id", random_row_keys(len(array)))
    table = table.append_column("_dlt_load_id", pa.array([load_id] * len(array), pa.string()))
    # columns declared not null are typed so (dlt otherwise warns of the mismatch on every page)
    required = not_null | ROOT_COLUMNS.keys()
    fields = []
    for field, column in zip(table.schema, table.columns):
        if field.name in required:
            if column.null_count:
                return None
            field = field.with_nullable(False)
        fields.append(field)
    return table.cast(pa.schema(fields))


def _epoch_timestamps(seconds: pa.Array) -> pa.Array:
    """int64 Unix epoch seconds as _EPOCH_TYPE, the instants dlt's normalizer makes of them."""
    low, high = (scalar.as_py() for scalar in pc.min_max(seconds).values())
    if low is not None and (low < _EPOCH_RANGE[0] or high > _EPOCH_RANGE[1]):
        raise _Rejected
    # int64 to timestamp[s] reinterprets the buffer; seconds to microseconds multiplies
    return seconds.cast(pa.timestamp("s", tz="UTC")).cast(_EPOCH_TYPE)


def page_table(
    name: str, records: list[dict], types: ColumnTypes, load_id: str, whole_page: bool,
    json_text: bool = True,
) -> tuple[Optional[pa.Table], list[dict], bool]:
    """(table or None, records left to dlt, whether the page was mixed) for one page of resource
    `name`.

    The whole page is typed by pyarrow in one go unless `whole_page` is False (after a mixed page:
    a resource whose field types vary is likely to have more), then record by record. `json_text`:
    the page's `json` columns hold nothing but JsonText (the lists step says so).
    """
    not_null = frozenset(types.not_null.get(name, ()))
    array = None
    if whole_page:
        try:
            array = pa.array(records)
        except _ARROW_ERRORS:
            pass
    if array is not None and pa.types.is_struct(array.type):
        page = _PageTypes(types, json_text)
        if page.match(name, array.type):
            epoch = types.epoch | {c for c, kind in page.new.get(name, {}).items() if kind is _EPOCH}
            table = build_table(name, array, load_id, not_null, epoch)
            if table is not None and page.new_columns_plain(table):
                types.learn(page.new)
                return table, [], False
    # a mixed page: record by record
    taken, left = _RecordCheck(name, types).split(records)
    mixed = bool(left)
    if not taken:
        return None, records, mixed
    try:
        array = pa.array(taken)
    except _ARROW_ERRORS:
        return None, records, mixed
    page = _PageTypes(types, json_text=True)  # the records taken hold JsonText only there
    if not pa.types.is_struct(array.type) or not page.match(name, array.type):
        return None, records, mixed
    table = build_table(name, array, load_id, not_null, types.epoch)
    return (table, left, mixed) if table is not None else (None, records, mixed)
