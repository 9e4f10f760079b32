"""Which warehouse a sync loads, and how.

`CRM_DESTINATION` names it, read each time a pipeline is created (so at run time): DuckDB when
unset, in `crm_warehouse.duckdb` in the working directory unless `DESTINATION__DUCKDB__CREDENTIALS`
names another file. `CRM_DESTINATION=postgres` loads into PostgreSQL with dlt's standard
`DESTINATION__POSTGRES__CREDENTIALS=postgresql://user:password@host:5432/database`; the other SQL
warehouses dlt ships (snowflake, bigquery, motherduck, databricks, ...) work the same way with
their `dlt[<name>]` extra installed and their `DESTINATION__<NAME>__CREDENTIALS`. The DuckDB file
is deliberately not called `crm.duckdb`: DuckDB would then have a catalog and a schema both named
`crm` (the dataset), and loads fail as ambiguous.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import dlt
from dlt.common.configuration.resolve import inject_section
from dlt.common.configuration.specs import BaseConfiguration, ConfigSectionContext
from dlt.common.configuration.specs.base_configuration import is_hint_not_resolvable
from dlt.common.destination import Destination
from dlt.pipeline.pipeline import Pipeline

from .crm.errors import CrmConfigurationError

DESTINATION_ENV = "CRM_DESTINATION"
DEFAULT_DESTINATION = "duckdb"
DEFAULT_DUCKDB_FILE = "crm_warehouse.duckdb"
# dlt's SQL destinations: the merge (`delete-insert` on the primary key) and the checks' SQL need
# one. Only duckdb and postgres are tested here; the others are a configuration change plus
# `pip install "dlt[<name>]"`.
ACCEPTED_DESTINATIONS = (
    "duckdb",
    "postgres",
    "motherduck",
    "snowflake",
    "bigquery",
    "databricks",
    "redshift",
    "mssql",
    "clickhouse",
)
# Destinations that load parquet files faster than dlt's default INSERT statements (run_options).
_PARQUET_DESTINATIONS = ("duckdb", "postgres")
# DuckDB has one writer: dlt's default of up to 20 load jobs at once buys no speed there, and each
# job's parquet reader takes memory outside DuckDB's `memory_limit` (benchmarks/README.md).
DUCKDB_PARALLEL_LOAD_JOBS = 2


class CrmDestinationError(CrmConfigurationError):
    """CRM_DESTINATION names no destination this pipeline can load."""


def selected_destination() -> str:
    """The destination `CRM_DESTINATION` names now (`duckdb` when unset); raises if unknown."""
    raw = os.environ.get(DESTINATION_ENV, "")
    name = raw.strip().lower() or DEFAULT_DESTINATION
    if name not in ACCEPTED_DESTINATIONS:
        raise CrmDestinationError(
            f"{DESTINATION_ENV}={raw.strip()!r} is not a destination this pipeline can load. "
            f"Accepted values: {', '.join(ACCEPTED_DESTINATIONS)} (unset means "
            f"{DEFAULT_DESTINATION}). Credentials go in DESTINATION__<NAME>__CREDENTIALS, e.g. "
            "DESTINATION__POSTGRES__CREDENTIALS=postgresql://user:password@host:5432/database."
        )
    return name


def duckdb_path() -> Optional[str]:
    """The DuckDB file a sync writes, made absolute from the working directory now; None where the
    configured credentials are no plain file path (a TOML table, `:memory:`, MotherDuck).

    dlt would resolve a relative path against the folder a pipeline of this name first ran from,
    on this machine: a sync from another directory would then write the first one's warehouse."""
    configured = dlt.secrets.get("destination.duckdb.credentials")
    if configured is None:
        return os.path.abspath(DEFAULT_DUCKDB_FILE)
    if isinstance(configured, str) and "://" not in configured and not configured.startswith((":", "md:")):
        return os.path.abspath(os.path.expanduser(configured))
    return None


def destination_for(name: str, path: Optional[str], connection: Any = None) -> Any:
    """dlt's destination `name`; for DuckDB, the file `path` (None: dlt's configuration decides),
    or `connection`, the file already open (dlt then neither opens nor closes it)."""
    if name == "duckdb":
        return dlt.destinations.duckdb(
            credentials=connection if connection is not None else path,
            max_parallel_load_jobs=DUCKDB_PARALLEL_LOAD_JOBS,
        )
    return name


# Fields the pipeline binds to each client it makes (its dataset, its schema), not settings.
_PIPELINE_BOUND_FIELDS = frozenset({"dataset_name", "default_schema_name", "staging_config"})


def settled(destination: Any, pipeline_name: str) -> Any:
    """`destination` (a name or a factory) with its settings resolved once, for one run.

    dlt resolves a destination's whole configuration from its providers whenever it needs the
    destination's capabilities or a client, dozens of times a sync: in a small one, a large share
    of its CPU (benchmarks/README.md). Here dlt resolves it once, as it does inside the pipeline
    `pipeline_name` (whose name is a section its settings may be under), and a new factory gets
    the values as explicit arguments, which dlt then takes as they are. What the pipeline binds
    (dataset, schema) still comes from it, and a setting that does not resolve (missing
    credentials) is left out, for dlt to report when it needs it, as it would have."""
    factory = Destination.from_reference(destination)
    try:
        with inject_section(ConfigSectionContext(pipeline_name=pipeline_name)):
            config = factory.configuration(factory.spec(), accept_partial=True)
    except Exception:  # a value dlt cannot parse: dlt reports it where it always did
        return factory
    values = {}
    for field, hint in config.get_resolvable_fields().items():
        value = config.get(field)
        # fields dlt never reads from its providers (Final, NotResolved) are the pipeline's to set
        if field in _PIPELINE_BOUND_FIELDS or value is None or is_hint_not_resolvable(hint):
            continue
        if isinstance(value, BaseConfiguration) and not value.is_resolved():
            continue
        values[field] = value
    return type(factory)(**values, **factory.caps_params)


def run_options(pipeline: Pipeline) -> dict[str, Any]:
    """Keyword arguments for `pipeline.run` that suit the destination.

    Raises `CrmDestinationError` (naming `CRM_DESTINATION` and the accepted values) when the
    pipeline has no destination because the variable names an unknown one.

    DuckDB and PostgreSQL load parquet files faster than dlt's default INSERT statements
    (PostgreSQL with COPY through ADBC, `adbc-driver-postgresql`, a dependency; were it missing,
    dlt would fall back to INSERT statements with a warning). CSV, as fast on PostgreSQL, is not
    used: dlt's CSV writer counts fields rather than rows, so dagster-dlt's `rows_loaded` would
    read ~16x too high. Figures in benchmarks/README.md.
    """
    if pipeline.destination is None:
        selected_destination()  # raises the readable error
        raise CrmDestinationError(
            f"The pipeline has no destination: set {DESTINATION_ENV} "
            f"({', '.join(ACCEPTED_DESTINATIONS)})"
        )
    if pipeline.destination.destination_name in _PARQUET_DESTINATIONS:
        return {"loader_file_format": "parquet"}
    return {}
