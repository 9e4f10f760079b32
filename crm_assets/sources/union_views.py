"""Every account's rows in one place: views `crm_all.<table>` over the accounts' `crm_<name>.<table>`.

With many accounts (crm/accounts.py) each account lands in its own dataset. After an account's
load, `refresh_union_views` (re)creates, for each table it loaded, the view `crm_all.<table>`: the
UNION ALL of that table in every configured account's dataset that has it, with the account's
name in the column `crm_account`. Columns are aligned by name (an account whose table lacks a
column gives NULL; a column whose type differs between accounts is read as text). An analyst
queries all accounts at once:

    SELECT crm_account, count(*) FROM crm_all.jobs GROUP BY crm_account

DuckDB and PostgreSQL only (the warehouses this project tests); elsewhere no view is made.
Views are a convenience: failing to refresh one logs a warning and never fails the load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from dlt.pipeline.pipeline import Pipeline

UNION_DATASET = "crm_all"
ACCOUNT_COLUMN = "crm_account"
_DESTINATIONS = ("duckdb", "postgres")

logger = logging.getLogger("crm_assets.sources.union_views")


def _columns(client: Any, table: str, datasets: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """dataset -> [(column, type)] in table order, for the datasets that have `table`."""
    names = ", ".join(f"'{dataset}'" for dataset in datasets)  # checked names (accounts.py)
    rows = client.execute_sql(
        "SELECT table_schema, column_name, data_type FROM information_schema.columns "
        f"WHERE table_name = '{table}' AND table_schema IN ({names}) "
        "ORDER BY table_schema, ordinal_position"
    ) or []
    found: dict[str, list[tuple[str, str]]] = {}
    for dataset, column, data_type in rows:
        found.setdefault(str(dataset), []).append((str(column), str(data_type)))
    return found


def _view_sql(client: Any, destination: str, table: str, accounts: Mapping[str, str]) -> str:
    """The SELECT of `crm_all.<table>`; empty when no account has the table yet."""
    found = _columns(client, table, accounts.values())
    present = [(name, dataset) for name, dataset in accounts.items() if dataset in found]
    if not present:
        return ""
    q = client.escape_column_name
    if destination == "duckdb":
        # DuckDB aligns the columns itself, NULL where a branch lacks one
        return " UNION ALL BY NAME ".join(
            f"SELECT '{name}' AS {q(ACCOUNT_COLUMN)}, * FROM {q(dataset)}.{q(table)}"
            for name, dataset in present
        )
    types: dict[str, set[str]] = {}
    for name, dataset in present:
        for column, data_type in found[dataset]:
            types.setdefault(column, set()).add(data_type)
    branches = []
    for name, dataset in present:
        own = {column for column, _ in found[dataset]}
        selected = [f"'{name}'::text AS {q(ACCOUNT_COLUMN)}"]
        for column, kinds in types.items():
            # the accounts disagree on its type: text reads them all
            kind = "text" if len(kinds) > 1 else next(iter(kinds))
            if column not in own:
                selected.append(f"NULL::{kind} AS {q(column)}")
            else:
                selected.append(f"{q(column)}::text AS {q(column)}" if len(kinds) > 1 else q(column))
        branches.append(f"SELECT {', '.join(selected)} FROM {q(dataset)}.{q(table)}")
    return " UNION ALL ".join(branches)


def refresh_union_views(pipeline: Pipeline, accounts: Mapping[str, str], tables: Iterable[str]) -> list[str]:
    """(Re)create `crm_all.<table>` for each of `tables` over the datasets of `accounts` (account
    name -> dataset). Returns the views made; logs a warning instead of failing."""
    destination = pipeline.destination.destination_name if pipeline.destination else ""
    tables = list(tables)
    if destination not in _DESTINATIONS or not tables or not accounts:
        return []
    made = []
    try:
        with pipeline.sql_client() as client:
            q = client.escape_column_name
            with client.begin_transaction():
                if destination == "postgres":
                    # two accounts' loads ending at once would race on the same views
                    client.execute_sql(f"SELECT pg_advisory_xact_lock(hashtext('{UNION_DATASET}'))")
                client.execute_sql(f"CREATE SCHEMA IF NOT EXISTS {q(UNION_DATASET)}")
                for table in tables:
                    select = _view_sql(client, destination, table, accounts)
                    if not select:
                        continue
                    view = f"{q(UNION_DATASET)}.{q(table)}"
                    # PostgreSQL's CREATE OR REPLACE VIEW keeps the old columns' order: drop first
                    client.execute_sql(f"DROP VIEW IF EXISTS {view}")
                    client.execute_sql(f"CREATE VIEW {view} AS {select}")
                    made.append(f"{UNION_DATASET}.{table}")
    except Exception as exc:  # a convenience: the load itself is in
        logger.warning("The views %s.* over every account were not refreshed: %s", UNION_DATASET, exc)
        return []
    return made


@contextmanager
def union_views_dropped(pipeline: Pipeline, tables: Iterable[str]) -> Iterator[None]:
    """Drop `crm_all.<table>` for `tables` and keep every other account's load from recreating them
    until the block ends: PostgreSQL refuses to drop a table a view reads, and a full refresh drops
    the account's tables. The load's own refresh_union_views, after the block, creates them again.
    Elsewhere nothing to do: DuckDB binds a view's tables only when it is read."""
    if pipeline.destination is None or pipeline.destination.destination_name != "postgres":
        yield
        return
    with pipeline.sql_client() as client:
        q = client.escape_column_name
        # a session lock, held over the load: refresh_union_views waits on the same key
        client.execute_sql(f"SELECT pg_advisory_lock(hashtext('{UNION_DATASET}'))")
        try:
            for table in tables:
                client.execute_sql(f"DROP VIEW IF EXISTS {q(UNION_DATASET)}.{q(table)}")
            yield
        finally:
            # closing the connection would release it too, should this fail
            with suppress(Exception):
                client.execute_sql(f"SELECT pg_advisory_unlock(hashtext('{UNION_DATASET}'))")
