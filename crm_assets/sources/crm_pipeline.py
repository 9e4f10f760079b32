"""The dlt pipeline that lands the `crm` source in the warehouse, usable without Dagster.

    SOURCES__CRM__BASE_URL=http://127.0.0.1:8765 SOURCES__CRM__API_KEY=demo-key \
        python -m crm_assets.sources.crm_pipeline

Destination: DuckDB, in `crm_warehouse.duckdb` in the working directory unless
`DESTINATION__DUCKDB__CREDENTIALS` names another file. The dataset (schema) is `crm`, so the
tables are `crm.jobs`, `crm.contacts`, ... The file is deliberately not called `crm.duckdb`:
DuckDB would then have a catalog and a schema both named `crm`, and loads fail as ambiguous.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Optional

import dlt
from dlt.pipeline.pipeline import Pipeline

PIPELINE_NAME = "crm_warehouse"
DATASET_NAME = "crm"


def crm_pipeline(pipelines_dir: Optional[str] = None) -> Pipeline:
    """A fresh handle on the pipeline; config (destination path, state dir) resolves when it runs."""
    return dlt.pipeline(
        pipeline_name=PIPELINE_NAME,
        destination="duckdb",
        dataset_name=DATASET_NAME,
        pipelines_dir=pipelines_dir,
    )


def run_options(pipeline: Pipeline) -> dict[str, Any]:
    """Keyword arguments for `pipeline.run` that suit the destination.

    DuckDB loads parquet files several times faster than dlt's default INSERT statements.
    """
    if pipeline.destination and pipeline.destination.destination_name == "duckdb":
        return {"loader_file_format": "parquet"}
    return {}


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
    """Where the data is, for people: the DuckDB file path, or the destination's name."""
    try:
        client = pipeline.destination_client()
        credentials = client.config.credentials  # type: ignore[attr-defined]
        database = getattr(credentials, "database", None) or str(credentials)
        return str(database)
    except Exception:
        return str(pipeline.destination.destination_name if pipeline.destination else "unknown")


def main(argv: Optional[list[str]] = None) -> int:
    from crm_assets.sources.crm import ENDPOINTS, crm, find_crm_error

    pipeline = crm_pipeline()
    try:
        load_info = pipeline.run(crm(), **run_options(pipeline))
    except Exception as exc:  # dlt wraps our errors: show ours, plainly
        print(f"crm sync failed: {find_crm_error(exc) or exc}", file=sys.stderr)
        return 1
    print(load_info)
    for table, rows in table_row_counts(pipeline, [e.name for e in ENDPOINTS]).items():
        print(f"{DATASET_NAME}.{table}: {rows} rows")
    print(f"database: {database_location(pipeline)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
