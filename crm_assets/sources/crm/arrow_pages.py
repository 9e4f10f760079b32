"""Pages as Arrow tables: each page becomes the resource's table and its child tables, built column
by column, so dlt's row-by-row normalizer is skipped for them.

dlt normalizes dict records one row at a time in Python: it flattens nested objects
(`location__geo__lat`), turns lists into child tables (`jobs__tags`, linked by `_dlt_parent_id`,
`_dlt_list_idx` and, for the merge, `_dlt_root_id`) and coerces every value to its column's type.
That was more than half of a full sync. This step runs after the incremental filter and builds the
same tables and columns from each page with pyarrow; dlt writes them to parquet as it extracts.

It takes only what it can build exactly as dlt's normalizer would:

- values whose Python type is the column's type (str: text, int: bigint, float: double,
  bool: bool); the column's type is the schema's, or for a new column the first value's, provided
  dlt would infer nothing else from it (no ISO timestamp in a string, no preferred type);
- ints in the columns the resource itself hints as `timestamp` (root table): Unix epoch seconds,
  which dlt's normalizer coerces to UTC instants (`pendulum.from_timestamp`, years 1 to 9999).
  They are built as `timestamp[us, tz=UTC]`, the type dlt writes such a column in at a destination
  whose default timestamp precision is microseconds (all of this project's), and stay so when the
  stored schema holds the column as that timestamp. A float, string or bool there, or seconds out
  of that range, is dlt's (it coerces them or makes a variant column). A timestamp column the
  resource does not hint (dlt's detection of ISO strings) takes nothing;
- field names dlt's naming convention leaves as they are;
- nested objects, and lists of objects or of scalars.

A record with anything else goes through dlt's normalizer unchanged. The contract lets a field's
type vary between records (a budget of 480379 in one, "12k" or null in the next): those records
are dlt's, so coercion and variant columns (`budget__v_text`) stay exactly dlt's. Records of both
kinds land in the same tables in the same load.

dlt 1.31 does not expect nested tables to be written while extracting (its extract metrics look
up a `resource` that only root tables carry): `nested_tables_from_extract()` wraps that one lookup
for the duration of a sync (sources/tuning.py), and outside it this step leaves every page to dlt.

Row keys: `_dlt_id` is random on every row (dlt hashes a child row's parent key and position
instead; neither is stable from one load to the next, and the merge needs them only unique and
linked). Switch the step off with the source's `arrow_pages=False`
(`SOURCES__CRM__ARROW_PAGES=false`): every record then takes dlt's normalizer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dlt

from dlt.common.storages.load_package import load_package_state
from dlt.extract.items_transform import ItemTransform

from .dlt_columns import CHILD_COLUMNS, ROOT_COLUMNS

class ArrowPages(ItemTransform):  # type: ignore[type-arg]
    """A resource's step turning each page into Arrow tables (see the module docstring)."""

    # after dlt's incremental filter (1) and its limit (1.1)
    placement_affinity = 1.5

    def __init__(self, resource: Any) -> None:
        super().__init__(lambda item: item)
        self.resource = resource
        self.name: str = resource.name
        self._types: Any = None  # arrow_tables.ColumnTypes, once the first page came
        self._children: set[str] = set()
        self._parents: dict[str, str] = {}
        self._last_page_mixed = False
        self._lock = threading.Lock()
        # dlt reports these with the resource's extract metrics (custom_metrics)
        self.custom_metrics["records_built_with_arrow"] = 0
        self.custom_metrics["records_left_to_dlt_normalizer"] = 0

    def __call__(self, item: Any, meta: Any = None) -> Iterator[Any]:
        if not isinstance(item, list) or not item or not isinstance(item[0], dict) or not _nested_tables_allowed():
            yield item
            return
        tables, left = self._page(item)
        if tables:
            self.custom_metrics["records_built_with_arrow"] += tables[0][1].num_rows
            for name, table in tables:
                if name == self.name:
                    yield table
                else:
                    self._declare_child(name)
                    yield dlt.mark.with_table_name(table, name)
        if left:
            self.custom_metrics["records_left_to_dlt_normalizer"] += len(left)
            yield left

    def _page(self, records: list[dict]) -> tuple[list[tuple[str, Any]], list[dict]]:
        types = self._column_types()
        if types is None:
            return [], records
        try:
            load_id = load_package_state()["load_id"]
        except Exception:  # no load package (not extracting in a pipeline)
            return [], records
        from .arrow_tables import page_tables

        tables, left, self._last_page_mixed = page_tables(
            self.name, records, types, load_id, self._parents, whole_page=not self._last_page_mixed
        )
        return tables, left

    def _declare_child(self, name: str) -> None:
        """A child table's hints: nested in its parent, dlt's link columns, no primary key."""
        if name in self._children:
            return
        with self._lock:
            if name not in self._children:
                # a table variant starts as a copy of the resource's hints: clear the root's
                self.resource.apply_hints(
                    table_name=name, parent_table_name=self._parents[name], columns={},
                    primary_key=[], merge_key=[], create_table_variant=True,
                )
                self.resource.apply_hints(table_name=name, columns=CHILD_COLUMNS, create_table_variant=True)
                self._children.add(name)

    def _column_types(self) -> Any:
        if self._types is None:
            try:
                schema = dlt.current.source_schema()
            except Exception:  # not extracting in a pipeline: nothing to match against
                return None
            try:  # the resource's own columns (the primary key among them) as dlt computes them
                hinted = self.resource.compute_table_schema().get("columns", {})
            except Exception:  # hints that need a data item to resolve
                hinted = {}
            from .arrow_tables import ColumnTypes

            self._types = ColumnTypes(schema, self.name, hinted, _destination_capabilities())
        return self._types


def _destination_capabilities() -> Any:
    """The capabilities dlt's extract writes arrow tables for (how it types a timestamp column);
    None without a destination: the hinted timestamp columns are then left to dlt."""
    from dlt.common.configuration.container import Container
    from dlt.common.destination.capabilities import DestinationCapabilitiesContext

    container = Container()
    return container[DestinationCapabilitiesContext] if DestinationCapabilitiesContext in container else None


def can_write_nested_tables() -> bool:
    """Whether `nested_tables_from_extract()` can make dlt's extract accept child tables."""
    import dlt.extract.extract as extract_module

    return callable(getattr(extract_module, "aggregate_job_metrics", None))


_nested = {"depth": 0, "original": None}
_nested_lock = threading.Lock()


def _nested_tables_allowed() -> bool:
    return _nested["depth"] > 0


@contextmanager
def nested_tables_from_extract() -> Iterator[None]:
    """Lets dlt's extract step write child tables, as this step does, for the block's duration.

    dlt sums each extracted table's metrics per resource by looking up the table's `resource`,
    which only root tables carry: a nested table written while extracting raises KeyError there
    (dlt 1.31, `Extract._compute_metrics`). Inside the block that aggregation is wrapped so such a
    table counts for its root table's resource; for every other table nothing changes. The
    original comes back when the last block ends. Should a later dlt move the function, nothing
    is wrapped and every page goes to dlt's normalizer.
    """
    import dlt.extract.extract as extract_module

    with _nested_lock:
        if _nested["depth"] == 0:
            original = getattr(extract_module, "aggregate_job_metrics", None)
            if callable(original):
                extract_module.aggregate_job_metrics = _counting_nested_tables_for_their_root(original)
                _nested["original"] = original
        if _nested["depth"] > 0 or _nested["original"] is not None:
            _nested["depth"] += 1
            entered = True
        else:
            entered = False
    try:
        yield
    finally:
        if entered:
            with _nested_lock:
                _nested["depth"] -= 1
                if _nested["depth"] == 0:
                    extract_module.aggregate_job_metrics = _nested["original"]
                    _nested["original"] = None


def _counting_nested_tables_for_their_root(original: Any) -> Any:
    def aggregate_job_metrics(job_metrics: Any, key: Any) -> Any:
        def key_or_root_key(name: Any) -> Any:
            try:
                return key(name)
            except KeyError:
                if not isinstance(name, str) or "__" not in name:
                    raise
                return key(name.split("__", 1)[0])

        return original(job_metrics, key_or_root_key)

    return aggregate_job_metrics
