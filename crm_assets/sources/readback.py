"""Reading a sync's result back from the warehouse: row counts, what a load added, what an
earlier version or other settings left, where the data is."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Optional

from dlt.pipeline.pipeline import Pipeline

from .crm.errors import CrmConfigurationError


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


def _dataset_columns(pipeline: Pipeline) -> list[tuple[str, str, str, bool]]:
    """(table, column, type, nullable) of every column in the destination dataset; none before the
    first load or on a destination without information_schema."""
    try:
        with pipeline.sql_client() as client:
            rows = client.execute_sql(
                "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
                f"WHERE table_schema = '{pipeline.dataset_name}'"
            )
    except Exception:  # no such dataset yet, or a destination without information_schema
        return []
    return [
        (str(table), str(column), str(data_type), str(nullable).upper() not in ("NO", "FALSE", "0"))
        for table, column, data_type, nullable in rows or []
    ]


def _epoch_held_otherwise(endpoint: Any, column: str, data_type: str) -> bool:
    """A column these settings land as a timestamp, held as something else: a declared one as
    anything but a timestamp, an integer `date_*` field (epoch_dates.py) as an integer."""
    if "timestamp" in data_type:
        return False
    if column in endpoint.timestamp_fields:
        return True
    return endpoint.is_epoch_field(column) and any(kind in data_type for kind in ("int", "number"))


# How many rows of a table `_text_lists` reads: an earlier version's list column holds a list's
# JSON text in nearly every row ('[]' for an empty one)
_SAMPLE_ROWS = 100
_TEXT_TYPES = ("varchar", "text", "character varying")


def _text_lists(pipeline: Pipeline, columns: list[tuple[str, str, str, bool]], tables: Iterable[str]) -> list[str]:
    """`table.column` of the lists an earlier version kept as JSON text: a text column whose values
    in a sample of rows include a JSON array, in a table with no JSON column (a table this version
    loads lists into has one). One small query per such table."""
    found: list[str] = []
    by_table: dict[str, list[str]] = {}
    with_json = set()
    for table, column, data_type, _ in columns:
        if table not in tables:
            continue
        if data_type.lower() == "json":
            with_json.add(table)
        elif data_type.lower() in _TEXT_TYPES and not column.startswith("_dlt"):
            by_table.setdefault(table, []).append(column)
    if not set(by_table) - with_json:
        return found
    with pipeline.sql_client() as client:
        for table in sorted(set(by_table) - with_json):
            names = sorted(by_table[table])
            selected = ", ".join(client.escape_column_name(name) for name in names)
            rows = client.execute_sql(
                f"SELECT {selected} FROM {client.make_qualified_table_name(table)} LIMIT {_SAMPLE_ROWS}"
            ) or []
            found.extend(
                f"{pipeline.dataset_name}.{table}.{name}"
                for index, name in enumerate(names)
                if any(_json_array(row[index]) for row in rows)
            )
    return found


def _json_array(value: Any) -> bool:
    if not isinstance(value, str) or not value.startswith("["):
        return False
    try:
        return isinstance(json.loads(value), list)
    except ValueError:
        return False


def earlier_layout(
    pipeline: Pipeline, endpoints: Iterable[Any]
) -> tuple[list[str], list[str], list[str], list[str]]:
    """What the warehouse holds that these settings would load differently: (`table.column` of
    epoch-second columns held as something other than a timestamp, e.g. BIGINT from an earlier
    version or from before a field was declared; child tables of lists, now JSON columns in their
    record's row; tables keyed by another field than the configured primary key; `table.column`
    of lists held as JSON text, as the version before JSON columns kept them)."""
    by_name = {e.name: e for e in endpoints}
    names = tuple(f"{name}__" for name in by_name)
    dataset = pipeline.dataset_name
    columns = _dataset_columns(pipeline)
    bigint_dates = sorted(
        f"{dataset}.{table}.{column}"
        for table, column, data_type, _ in columns
        if table in by_name and _epoch_held_otherwise(by_name[table], column, data_type.lower())
    )
    child_tables = sorted({
        f"{dataset}.{table}"
        for table, column, _, _ in columns
        if column == "_dlt_parent_id" and table.startswith(names)
    })
    # dlt declares a table's primary key NOT NULL, and no other column of a table this source
    # loads but its own `_dlt_*` ones: a NOT NULL column that is not the configured key is the
    # key an earlier load used
    stored_keys: dict[str, set[str]] = {}
    for table, column, _, nullable in columns:
        if table in by_name and not nullable and not column.startswith("_dlt"):
            stored_keys.setdefault(table, set()).add(column)
    changed_keys = sorted(
        f"{dataset}.{table} is keyed by `{', '.join(sorted(keys))}`, the settings now say "
        f"`{by_name[table].primary_key}`"
        for table, keys in stored_keys.items()
        if by_name[table].primary_key not in keys
    )
    text_lists = _text_lists(pipeline, columns, by_name)
    return bigint_dates, child_tables, changed_keys, text_lists


def refuse_earlier_layout(pipeline: Pipeline, endpoints: Iterable[Any], partition: Optional[str] = None) -> None:
    """Stop before a load would mix what the warehouse holds with what these settings load, naming
    each difference and the way over: a full refresh of those resources. Loading timestamps into
    BIGINT date columns, lists into JSON columns next to the child tables or the text columns that
    held them, or records keyed by `jnid` into a table whose `id` is NOT NULL would leave both half
    right, or fail deep in the load. `partition`: the account whose pipeline this is, named in the
    command that re-runs it."""
    endpoints = list(endpoints)
    bigint_dates, child_tables, changed_keys, text_lists = earlier_layout(pipeline, endpoints)
    found = []
    if changed_keys:
        found.append(
            f"{'; '.join(changed_keys)} (SOURCES__CRM__PRIMARY_KEY, or the resource's primary_key "
            "in SOURCES__CRM__RESOURCES)"
        )
    if bigint_dates:
        found.append(
            f"{', '.join(bigint_dates)} hold epoch seconds as BIGINT (these settings land them as "
            "UTC timestamps; a resource's not_epoch_fields keeps a date_* field an integer)"
        )
    if child_tables:
        found.append(
            f"{', '.join(child_tables)} hold lists as child tables (lists now land in JSON columns "
            "in their record's row)"
        )
    if text_lists:
        found.append(
            f"{', '.join(text_lists)} hold lists as JSON text (lists now land in JSON columns: "
            "DuckDB JSON, PostgreSQL json)"
        )
    if found:
        named = " ".join(bigint_dates + child_tables + changed_keys + text_lists)
        dataset = pipeline.dataset_name
        assets = ",".join(
            f"crm/{e.name}" for e in endpoints
            if f"{dataset}.{e.name} " in named or f"{dataset}.{e.name}." in named
            or f"{dataset}.{e.name}__" in named
        )
        raise CrmConfigurationError(
            f"The warehouse holds tables these settings cannot load into: {'; '.join(found)}. "
            "Nothing was requested or loaded. Reload those assets once with a full refresh "
            "(launchpad config `full_refresh: true`, or dg launch "
            f"--assets {assets}{f' --partition {partition}' if partition else ''} --config-json "
            '\'{"ops": {"crm_sync_assets": {"config": {"full_refresh": true}}}}\')'
        )


def schema_changes(pipeline: Pipeline, resource: str) -> dict[str, list[str]]:
    """What the last load added to a resource's tables (its own, and any `<resource>__*` child
    table dlt's normalizer made of a list the source did not encode).

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
        return f"{name} {credentials}, dataset {pipeline.dataset_name}"
    except Exception:
        return name
