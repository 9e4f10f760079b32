"""The dlt pipeline that lands the `crm` source in the warehouse, usable without Dagster.

    SOURCES__CRM__BASE_URL=http://127.0.0.1:8765 SOURCES__CRM__API_KEY=demo-key \
        python -m crm_assets.sources.crm_pipeline

Destination: `CRM_DESTINATION` names it, read each time the pipeline is created (so at run
time): DuckDB when unset, in `crm_warehouse.duckdb` in the working directory unless
`DESTINATION__DUCKDB__CREDENTIALS` names another file. `CRM_DESTINATION=postgres` loads into
PostgreSQL with dlt's standard `DESTINATION__POSTGRES__CREDENTIALS=postgresql://user:password@
host:5432/database`; the other SQL warehouses dlt ships (snowflake, bigquery, motherduck,
databricks, ...) work the same way with their `dlt[<name>]` extra installed and their
`DESTINATION__<NAME>__CREDENTIALS`. The dataset (schema) is `crm`, so the tables are
`crm.jobs`, `crm.contacts`, ... The DuckDB file is deliberately not called `crm.duckdb`:
DuckDB would then have a catalog and a schema both named `crm`, and loads fail as ambiguous.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterable
from typing import Any, Optional

import dlt
from dlt.common.runtime.collector import LogCollector
from dlt.pipeline.pipeline import Pipeline

from .crm.errors import CrmConfigurationError
from .tuning import release_freed_memory, sync_tuning

PIPELINE_NAME = "crm_warehouse"
DATASET_NAME = "crm"

DESTINATION_ENV = "CRM_DESTINATION"
DEFAULT_DESTINATION = "duckdb"
# dlt's SQL destinations: the merge (`delete-insert` on `id`) and the checks' SQL need one.
# Only duckdb and postgres are tested here; the others are a configuration change plus
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

logger = logging.getLogger(__name__)


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


# DuckDB has one writer: dlt's default of up to 20 load jobs at once buys no speed there, and each
# job's parquet reader takes memory outside DuckDB's `memory_limit` (1,000,000 records through
# Dagster, peak RSS: 20 jobs 506 MB, 2 jobs 470 MB, 1 job 456 MB; 109,000 records, load step:
# 0.76 s, 0.87 s, 1.30 s). Two is the compromise.
DUCKDB_PARALLEL_LOAD_JOBS = 2


DEFAULT_DUCKDB_FILE = "crm_warehouse.duckdb"


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


def _destination(name: str, path: Optional[str]) -> Any:
    if name == "duckdb":
        return dlt.destinations.duckdb(credentials=path, max_parallel_load_jobs=DUCKDB_PARALLEL_LOAD_JOBS)
    return name


def _pipelines_dir_for(path: str) -> str:
    """dlt's working folder for the pipeline that writes the DuckDB file `path`: its state and
    cursors belong to that warehouse, not to every sync on the machine."""
    from dlt.common.pipeline import get_dlt_pipelines_dir

    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]
    return os.path.join(get_dlt_pipelines_dir(), "by_warehouse", digest)


# Python's cyclic garbage collector during each dlt step (extract, normalize, load). Its default
# (700, 10, 10) starts a collection every 700 net allocations and a full one, walking every object
# of the process (Dagster and dlt bring about 180,000), every ~70,000 while the heap
# grows: a sync allocates millions of short-lived dicts (parsed pages, normalized rows) that
# reference counting frees anyway. With these thresholds a step sees next to no full collections.
# Measured with plain dlt on 109,000 records (`make bench BENCH_ARGS="--only c2"`, 3 runs each):
# pipeline.run 4.64-4.72 s -> 3.91-4.04 s (extract 1.05 -> 0.83 s, normalize 2.6 -> 2.2 s).
# The previous thresholds come back when the step ends, also when it fails.
STEP_GC_THRESHOLDS = (50_000, 20, 100)


class _FewerGcPasses:
    """STEP_GC_THRESHOLDS while at least one step runs in this process. Steps of two pipelines
    may overlap (two syncs in one process): the first to start saves the thresholds, the last to
    stop restores them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved: tuple[int, ...] = ()

    def enter(self) -> None:
        with self._lock:
            if self._active == 0:
                self._saved = gc.get_threshold()
                gc.set_threshold(*STEP_GC_THRESHOLDS)
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                gc.set_threshold(*self._saved)


_FEWER_GC_PASSES = _FewerGcPasses()


class _StepCollector(LogCollector):
    """dlt's progress log (to the `crm_assets.sources.progress` logger, which Dagster runs show)
    that also, around each step: hands freed heap back to the OS (the extract's parsed pages would
    otherwise still count in the process's memory while DuckDB loads), and runs the garbage
    collector less often (STEP_GC_THRESHOLDS)."""

    _in_step = False

    def _start(self, step: str) -> None:
        release_freed_memory()
        if not self._in_step:
            _FEWER_GC_PASSES.enter()
            self._in_step = True
        super()._start(step)

    def _stop(self) -> None:
        try:
            super()._stop()
        finally:
            if self._in_step:
                self._in_step = False
                _FEWER_GC_PASSES.leave()


def crm_pipeline(pipelines_dir: Optional[str] = None) -> Pipeline:
    """A fresh handle on the pipeline; config (destination path, state dir) resolves when it runs.

    The destination is the one `CRM_DESTINATION` names at the moment of the call. Dagster also
    calls this when it loads the code location (to build the asset definitions): an unknown
    name must not stop that, so it only logs here and the pipeline has no destination; the run
    then fails in `run_options()` with the message naming the variable and the accepted values.
    """
    destination: Any
    try:
        name = selected_destination()
    except CrmDestinationError as exc:
        logger.warning("%s", exc)
        destination = None
    else:
        path = duckdb_path() if name == "duckdb" else None
        destination = _destination(name, path)
        if pipelines_dir is None and path is not None:
            pipelines_dir = _pipelines_dir_for(path)
    for attempt in (1, 2):
        try:
            return dlt.pipeline(
                pipeline_name=PIPELINE_NAME,
                destination=destination,
                dataset_name=DATASET_NAME,
                pipelines_dir=pipelines_dir,
                progress=_StepCollector(
                    log_period=15.0, logger=logging.getLogger("crm_assets.sources.progress"),
                    dump_system_stats=False,
                ),
            )
        except FileExistsError:
            # another process created the pipeline's folder between dlt's check and its mkdir
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def definitions_pipelines_dir() -> str:
    """Where the pipeline handle Dagster builds its asset definitions from keeps its (empty)
    working folder, apart from the one syncs use."""
    from dlt.common.pipeline import get_dlt_pipelines_dir

    return os.path.join(get_dlt_pipelines_dir(), "_definitions")


def run_options(pipeline: Pipeline) -> dict[str, Any]:
    """Keyword arguments for `pipeline.run` that suit the destination.

    Raises `CrmDestinationError` (naming `CRM_DESTINATION` and the accepted values) when the
    pipeline has no destination because the variable names an unknown one.

    DuckDB loads parquet files several times faster than dlt's default INSERT statements.
    PostgreSQL loads them with COPY through ADBC (`adbc-driver-postgresql`, a dependency; were it
    missing, dlt would fall back to INSERT statements with a warning). Measured on 20,000 jobs
    (68,826 rows with their child tables), full load: INSERT 4.4-4.8 s, CSV 3.5-4.0 s, parquet
    3.1-3.6 s; on 100,000 records: 10.6 s, 8.9 s, 8.5 s. CSV (COPY too) is not used although as
    fast: dlt's CSV writer counts fields rather than rows, so dagster-dlt's `rows_loaded` would
    read ~16x too high (3841 for 240 jobs).
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
    from crm_assets.sources.crm import CrmConfigurationError

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


def main(argv: Optional[list[str]] = None) -> int:
    from crm_assets.sources.crm import configured_endpoints, crm, find_crm_error
    from crm_assets.sources.run_lock import exclusive_run

    with exclusive_run(), sync_tuning():
        pipeline = crm_pipeline()
        try:
            refuse_bigint_dates(pipeline, configured_endpoints())
            load_info = pipeline.run(crm(), **run_options(pipeline))
        except Exception as exc:  # dlt wraps our errors: show ours, plainly
            print(f"crm sync failed: {find_crm_error(exc) or exc}", file=sys.stderr)
            return 1
        print(load_info)
        tables = [endpoint.name for endpoint in configured_endpoints()]
        for table, rows in table_row_counts(pipeline, tables).items():
            print(f"{DATASET_NAME}.{table}: {rows} rows")
        print(f"database: {database_location(pipeline)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
