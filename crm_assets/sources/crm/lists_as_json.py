"""Lists stay in their record's row, as JSON text.

dlt's default makes a child table of every list (`jobs__tags`, linked to its record by
`_dlt_parent_id`). This source keeps each list in its record's own row instead, as its JSON text
(`jobs.tags = '["b2b","vip"]'`, and `location__aliases` for a list inside a nested object):

- a record is one row, so the merge replaces it whole: a list that shrank or emptied leaves no
  stale rows behind, and a hard delete removes everything the record had;
- the Arrow pages step (arrow_pages.py) builds every table while extracting, on dlt's public API
  (dlt's extract takes no nested tables);
- one table per resource to load, merge and check.

Nested objects are still flattened into columns (`location__geo__lat`), as dlt does. The text is
dlt's own JSON encoding, the one it writes for a `json` column. It lands as text rather than as
dlt's `json` type: a `json` hint on a column the Arrow step builds as text makes dlt warn on every
page. DuckDB's JSON functions read the text as it is; on PostgreSQL cast it (`tags::jsonb`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dlt.common.json import json


class ListsAsJson:
    """A record map (`resource.add_map`): each list, at any depth of nested objects, replaced in
    place by its JSON text. Columns named in `json_columns` (dlt `json` hints) keep their value
    whole, lists inside included."""

    def __init__(self, json_columns: Iterable[str] = ()) -> None:
        self.json_columns = frozenset(json_columns)

    def __call__(self, record: Any) -> Any:
        if type(record) is dict:
            self._encode(record, "")
        return record

    def _encode(self, record: dict, prefix: str) -> None:
        for key, value in record.items():
            kind = type(value)
            if kind is not list and kind is not dict:
                continue
            if self.json_columns and f"{prefix}{key}" in self.json_columns:
                continue
            if kind is list:
                record[key] = json.dumps(value)
            else:
                self._encode(value, f"{prefix}{key}__")
