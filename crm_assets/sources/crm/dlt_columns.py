"""dlt's own columns on the tables the Arrow pages step builds, with the hints dlt's normalizer
gives them on a root table (shared by the source and arrow_tables.py)."""

from __future__ import annotations

from typing import Any

_ROW_KEY = {"data_type": "text", "nullable": False, "unique": True, "row_key": True}
ROOT_COLUMNS: dict[str, dict[str, Any]] = {
    "_dlt_id": _ROW_KEY,
    "_dlt_load_id": {"data_type": "text", "nullable": False},
}
