"""Pages as Arrow tables: each page becomes the resource's table, built column by column, so
dlt's row-by-row normalizer is skipped for it.

dlt normalizes dict records one row at a time in Python: it flattens nested objects
(`location__geo__lat`) and coerces every value to its column's type. That was most of a full sync.
This step runs after the incremental filter and builds the same table from each page with pyarrow;
dlt writes it to parquet as it extracts. Lists reach it already encoded as their JSON text
(lists_as_json.py), so a page is one table and the step needs nothing but dlt's public API.

It takes only what it can build exactly as dlt's normalizer would:

- values whose Python type is the column's type (str: text, int: bigint, float: double,
  bool: bool); the column's type is the schema's, or for a new column the first value's, provided
  dlt would infer nothing else from it (no ISO timestamp in a string, no preferred type);
- in a `json` column, the lists the lists step encoded (JsonText), built as strings: the column
  dlt writes for `json` in parquet. dlt notes, on every such page, that the resource's `json` hint
  differs from the Arrow string ("several column hints were different ... It is up to destination
  to coerce"): DuckDB and PostgreSQL read that text into their JSON columns, as they read dlt's own
  files. The step drops that one notice for each page whose only differences from the resource's
  hints are such columns (checked page by page, `_JsonTextNotices`); any other difference is
  still reported;
- ints in the columns the resource itself hints as `timestamp` (and in the integer `date_*` fields
  the epoch dates step finds on a page, which it hints so: epoch_dates.py): Unix epoch seconds, which dlt's
  normalizer coerces to UTC instants (`pendulum.from_timestamp`, years 1 to 9999). They are built
  as `timestamp[us, tz=UTC]`, the type dlt writes such a column in at a destination whose default
  timestamp precision is microseconds (all of this project's), and stay so when the stored schema
  holds the column as that timestamp. A float, string or bool there, or seconds out of that range,
  is dlt's (it coerces them or makes a variant column). A timestamp column the resource does not
  hint (dlt's detection of ISO strings) takes nothing;
- field names dlt's naming convention leaves as they are;
- nested objects.

A record with anything else (a list the map did not encode, among others) goes through dlt's
normalizer unchanged. The contract lets a field's type vary between records (a budget of 480379
in one, "12k" or null in the next): those records are dlt's, so coercion and variant columns
(`budget__v_text`) stay exactly dlt's. Records of both kinds land in the same table in the same
load.

Row keys: `_dlt_id` is random on every row, as dlt's own for a root table. Switch the step off
with the source's `arrow_pages=False` (`SOURCES__CRM__ARROW_PAGES=false`): every record then takes
dlt's normalizer.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import dlt
from dlt.common.libs.pyarrow import get_column_type_from_py_arrow
from dlt.extract.items_transform import ItemTransform


class ArrowPages(ItemTransform):  # type: ignore[type-arg]
    """A resource's step turning each page into an Arrow table (see the module docstring)."""

    # after dlt's incremental filter (1) and its limit (1.1)
    placement_affinity = 1.5

    def __init__(self, resource: Any, epoch_dates: Any = None, lists: Any = None) -> None:
        super().__init__(lambda item: item)
        self.resource = resource
        # the resource's EpochDates step, whose `columns` are the new fields it hinted as timestamps
        self.epoch_dates = epoch_dates
        # the resource's ListsAsJson step, whose `columns` are its `json` columns
        self.lists = lists
        self.name: str = resource.name
        self._types: Any = None  # arrow_tables.ColumnTypes, once the first page came
        self._last_page_mixed = False
        # dlt reports these with the resource's extract metrics (custom_metrics)
        self.custom_metrics["records_built_with_arrow"] = 0
        self.custom_metrics["records_left_to_dlt_normalizer"] = 0

    def __call__(self, item: Any, meta: Any = None) -> Iterator[Any]:
        if not isinstance(item, list) or not item or not isinstance(item[0], dict):
            yield item
            return
        table, left = self._page(item)
        if table is not None:
            self.custom_metrics["records_built_with_arrow"] += table.num_rows
            self._vouch(table)
            yield table
        if left:
            self.custom_metrics["records_left_to_dlt_normalizer"] += len(left)
            yield left

    def _page(self, records: list[dict]) -> tuple[Any, list[dict]]:
        types = self._column_types()
        if types is None:
            return None, records
        try:
            load_id = dlt.current.load_package_state()["load_id"]
        except Exception:  # no load package (not extracting in a pipeline)
            return None, records
        from .arrow_tables import page_table

        json_text = self.lists is None or not self.lists.other_values_in_json_columns
        table, left, self._last_page_mixed = page_table(
            self.name, records, types, load_id, whole_page=not self._last_page_mixed, json_text=json_text
        )
        return table, left

    def _vouch(self, table: Any) -> None:
        """Expects dlt's notice for this page when the page differs from the resource's column hints
        only by `json` columns built as strings (module docstring)."""
        if self.lists is None or not self.lists.columns:
            return
        hinted = self.resource.columns
        if not isinstance(hinted, dict):
            return
        json_columns = self.lists.columns
        json_text = False
        for field in table.schema:
            spec = hinted.get(field.name) or {}
            data_type = "json" if field.name in json_columns else spec.get("data_type")
            if data_type is None:
                continue
            built = get_column_type_from_py_arrow(field.type).get("data_type")
            if data_type == "json" and built == "text":
                json_text = True
            elif data_type != built or spec.get("nullable", field.nullable) != field.nullable:
                return  # another difference: dlt's notice stands
        if json_text:
            _NOTICES.expect(self.name)

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

            self._types = ColumnTypes(
                schema, self.name, hinted, _destination_capabilities(),
                epoch_names=self.epoch_dates.columns if self.epoch_dates is not None else None,
                json_names=self.lists.columns if self.lists is not None else None,
            )
            _NOTICES.install()
        return self._types


def _destination_capabilities() -> Any:
    """The capabilities dlt's extract writes arrow tables for (how it types a timestamp column);
    None without a destination: the hinted timestamp columns are then left to dlt."""
    from dlt.common.configuration.container import Container
    from dlt.common.destination.capabilities import DestinationCapabilitiesContext

    container = Container()
    return container[DestinationCapabilitiesContext] if DestinationCapabilitiesContext in container else None


class _JsonTextNotices(logging.Filter):
    """Drops dlt's notice "In resource: <name>, when merging arrow schema with dlt schema, several
    column hints were different..." once for each page the Arrow step vouched for (`expect`): a
    page whose only differences from the resource's hints are `json` columns built as their JSON
    text. dlt logs the notice when it writes the page, on the extract's main thread."""

    _TEXT = "when merging arrow schema with dlt schema, several column hints were different"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._expected: Counter[str] = Counter()

    def install(self) -> None:
        """On dlt's logger (the one dlt set up, or `dlt`), once."""
        from dlt.common import logger as dlt_logger

        for target in {logging.getLogger("dlt"), dlt_logger.LOGGER} - {None}:
            if self not in target.filters:
                target.addFilter(self)

    def expect(self, resource: str) -> None:
        with self._lock:
            self._expected[resource] += 1

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not isinstance(record.msg, str) or self._TEXT not in record.msg:
            return True
        prefix = "In resource: "
        message = record.msg
        if not message.startswith(prefix):
            return True
        resource = message[len(prefix):message.find(", when merging")]
        with self._lock:
            if self._expected[resource] > 0:
                self._expected[resource] -= 1
                return False
        return True


_NOTICES = _JsonTextNotices()
