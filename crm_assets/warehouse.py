"""Reading the destination back: the one query helper the asset checks use.

It goes through the dlt pipeline's own SQL client, so the checks work on whatever SQL
destination the pipeline loads (DuckDB here, Postgres/Snowflake/... if the pipeline changes),
with that destination's quoting and dataset qualification.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Protocol

from dlt.destinations.exceptions import DatabaseUndefinedRelation

from .sources.crm_pipeline import DATASET_NAME, PIPELINE_NAME, crm_pipeline
from .sources.destination import selected_destination
from .sources.run_lock import exclusive_run

__all__ = ["query", "reader", "Query", "DatabaseUndefinedRelation"]


class Query(Protocol):
    def __call__(
        self, sql_template: str, table: str, *, key: str = "id", max_rows: Optional[int] = None
    ) -> list[tuple[Any, ...]]: ...


@contextmanager
def reader(pipeline_name: str = PIPELINE_NAME, dataset_name: str = DATASET_NAME) -> Iterator[Query]:
    """One connection to the warehouse for several queries (the checks run fifteen).

    The function it yields runs one SELECT on a table of the `crm` dataset: `{table}` in the
    template becomes the destination's qualified, quoted name of `table`, `{key}` the quoted column
    `key`; write portable SQL (no
    LIMIT: not every destination has it, use `max_rows`). It raises `DatabaseUndefinedRelation`
    when the table does not exist (yet); the connection stays usable.

    Waits while a load of the pipeline holds it on this machine, and holds it until the block
    ends: DuckDB lets no other process open the file meanwhile, and a read between a load's
    steps would see half of it anyway. An account's checks pass its pipeline and dataset
    (`Account.pipeline_name`, `Account.dataset_name`).
    """
    selected_destination()  # an unknown CRM_DESTINATION fails here, saying what to set
    with exclusive_run(pipeline_name=pipeline_name) as connection, crm_pipeline(
        pipeline_name=pipeline_name, dataset_name=dataset_name, connection=connection
    ).sql_client() as client:

        def run(
            sql_template: str, table: str, *, key: str = "id", max_rows: Optional[int] = None
        ) -> list[tuple[Any, ...]]:
            sql = sql_template.format(
                table=client.make_qualified_table_name(table), key=client.escape_column_name(key)
            )
            with client.execute_query(sql) as cursor:
                rows = cursor.fetchmany(max_rows) if max_rows is not None else cursor.fetchall()
            return [tuple(row) for row in rows]

        yield run


def query(
    sql_template: str, table: str, *, key: str = "id", max_rows: Optional[int] = None
) -> list[tuple[Any, ...]]:
    """Rows of one SELECT on a table of the `crm` dataset, on a connection of its own (see
    `reader`)."""
    with reader() as run:
        return run(sql_template, table, key=key, max_rows=max_rows)
