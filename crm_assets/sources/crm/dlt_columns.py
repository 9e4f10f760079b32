"""dlt's own columns on the tables the Arrow pages step builds, with the hints dlt's normalizer
gives them (shared by arrow_pages.py and arrow_tables.py)."""

from __future__ import annotations

from typing import Any

_ROW_KEY = {"data_type": "text", "nullable": False, "unique": True, "row_key": True}
ROOT_COLUMNS: dict[str, dict[str, Any]] = {
    "_dlt_id": _ROW_KEY,
    "_dlt_load_id": {"data_type": "text", "nullable": False},
}
CHILD_COLUMNS: dict[str, dict[str, Any]] = {
    "_dlt_parent_id": {"data_type": "text", "nullable": False, "parent_key": True},
    "_dlt_list_idx": {"data_type": "bigint", "nullable": False},
    "_dlt_id": _ROW_KEY,
    "_dlt_root_id": {"data_type": "text", "nullable": False, "root_key": True},
}
