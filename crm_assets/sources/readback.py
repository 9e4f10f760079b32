"""Reading a sync's result back from the warehouse: row counts, what a load added, the date
columns' types, where the data is."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from dlt.pipeline.pipeline import Pipeline

from .crm.errors import CrmConfigurationError
from .crm_pipeline import DATASET_NAME


def table_row_counts(pipeline: Pipeline, tables: Iterable[str]) -> dict[str, Optional[int]]:
    """Rows now in each table of the destination dataset (None where the table does not exist)."""
    counts: dict[str, Optional[int]] = {}
    with pipeline.sql_client() as client:
        for table in tables:
            try:
                rows = client.execute_sql(
                    f"SELECT COUNT(*) FROM {client.make_qualified_table_name(table)}"
                )
                counts[table] = int(rows[0][0]) if rows else None
            except Exception:  # a table not created yet
                counts[table] = None
    return counts


def columns_not_timestamps(pipeline: Pipeline, columns: dict[str, Iterable[str]]) -> list[str]:
    """`table.column` of the given ones that exist in the destination with a type other than a
    timestamp: a warehouse loaded before epoch seconds landed as timestamps holds them as BIGINT."""
    wanted = {(table, column) for table, names in columns.items() for column in names}
    try:
        with pipeline.sql_client() as client:
            rows = client.execute_sql(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                f"WHERE table_schema = '{DATASET_NAME}'"
            )
    except Exception:  # no such dataset yet, or a destination without information_schema
        return []
    return sorted(
        f"{DATASET_NAME}.{table}.{column}"
        for table, column, data_type in rows or []
        if (table, column) in wanted and "timestamp" not in str(data_type).lower()
    )


def refuse_bigint_dates(pipeline: Pipeline, endpoints: Iterable[Any]) -> None:
    """Stop before loading timestamps into date columns an earlier version created as BIGINT (the
    load would mix the two), saying how to move over: a full refresh of those resources."""
    stale = columns_not_timestamps(pipeline, {e.name: e.timestamp_fields for e in endpoints})
    if stale:
        raise CrmConfigurationError(
            f"{', '.join(stale)} hold epoch seconds as BIGINT, loaded by a version that kept dates as "
            "numbers; they now land as UTC timestamps. Reload those assets once with a full refresh "
            "(launchpad config `full_refresh: true`, or dg launch --assets <asset> --config-json "
            '\'{"ops": {"crm_sync_assets": {"config": {"full_refresh": true}}}}\')'
        )


def schema_changes(pipeline: Pipeline, resource: str) -> dict[str, list[str]]:
    """What the last load added to a resource's tables (its own and its `<resource>__*` children).

    Returns {"new_tables": [...], "new_columns": ["table.column (type)", ...],
    "variant_columns": [...]}: a variant column (`<column>__v_<type>`) is dlt's answer to a
    field whose type changed, and deserves a human look.
    """
    changes: dict[str, list[str]] = {"new_tables": [], "new_columns": [], "variant_columns": []}
    trace = pipeline.last_trace
    load_info = trace.last_load_info if trace else None
    if load_info is None:
        return changes
    for package in load_info.load_packages:
        for table_name, table in package.schema_update.items():
            if table_name != resource and not table_name.startswith(f"{resource}__"):
                continue
            columns = table.get("columns", {})
            if not _existed_before(pipeline, table_name, columns):
                changes["new_tables"].append(table_name)
            for column_name, column in columns.items():
                if column_name.startswith("_dlt_"):
                    continue
                entry = f"{table_name}.{column_name} ({column.get('data_type', '?')})"
                changes["new_columns"].append(entry)
                if column.get("variant") or "__v_" in column_name:
                    changes["variant_columns"].append(entry)
    return changes


def _existed_before(pipeline: Pipeline, table_name: str, new_columns: dict[str, Any]) -> bool:
    """dlt lists a table it creates with all its columns; one that existed has others too."""
    table = pipeline.default_schema.tables.get(table_name, {})
    return any(name not in new_columns for name in table.get("columns", {}))


def database_location(pipeline: Pipeline) -> str:
    """Where the data is, for people: the DuckDB file path, or the destination and its address.

    dlt's credentials print with the password masked (`postgresql://crm:***@host:5432/db`).
    """
    name = pipeline.destination.destination_name if pipeline.destination else "unknown"
    try:
        client = pipeline.destination_client()
        credentials = client.config.credentials  # type: ignore[attr-defined]
        if name == "duckdb":
            return str(getattr(credentials, "database", None) or credentials)
        return f"{name} {credentials}, dataset {DATASET_NAME}"
    except Exception:
        return name
