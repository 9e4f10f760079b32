"""The `crm/*` assets: one `@dlt_assets` multi-asset over the `crm` dlt source."""

# No `from __future__ import annotations` here: Dagster reads the config class from the signature.


import atexit
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from dagster import AssetExecutionContext, Config, Failure, MaterializeResult, MetadataValue
from dlt.common.configuration.container import Container
from dlt.common.pipeline import PipelineContext
from dlt.common.schema.exceptions import DataValidationError
from dlt.pipeline.pipeline import Pipeline
from dagster_dlt import DagsterDltResource, dlt_assets
from pydantic import Field

from .sources.crm import (
    CrmApiError,
    CrmConfigurationError,
    CrmError,
    configured_endpoints,
    crm,
    find_crm_error,
)
from .sources.crm.settings import CURSOR_FIELD, RETRY_STATUSES
from .sources.crm_pipeline import DATASET_NAME, crm_pipeline, drop_staging
from .sources.destination import run_options, selected_destination
from .sources.readback import refuse_earlier_layout, schema_changes, table_row_counts
from .sources.run_lock import exclusive_run
from .sources.tuning import sync_tuning
from .translator import CrmTranslator

# Only one run may write the warehouse at a time (DuckDB allows a single writer; dlt state
# must not be committed by two runs at once). The pool's limit is set on the instance.
WAREHOUSE_POOL = "crm_warehouse"

# Which resources there are, and their keys, is configuration (sources/crm/catalog.py), read
# when the code location loads: a bad setting fails `dg check defs`, naming it.
CRM_ENDPOINTS = configured_endpoints()

# The source as Dagster sees it when it loads the code location: names and hints only. The
# connection arguments are placeholders; the run builds the real source from configuration.
_DEFINITION_SOURCE = crm(
    base_url="http://crm-api.invalid",
    api_key="not-used-at-definition-time",
    page_sizes={},
    hard_delete=False,
    max_retries=0,
    backoff_factor=0,
    request_timeout=1,
)


def _definition_pipeline() -> Pipeline:
    """The pipeline handle the definitions are built from: its names and destination only (a run
    creates its own). Its working folder is a temporary one, gone once it exists, and dlt's active
    pipeline is put back as it was: loading the code location leaves no trace on disk or in dlt."""
    context = Container()[PipelineContext]
    previous = context.pipeline() if context.is_active() else None
    with tempfile.TemporaryDirectory(prefix="crm_definitions_") as folder:
        pipeline = crm_pipeline(pipelines_dir=folder)
    pipeline.deactivate()
    if previous is not None:
        previous.activate()  # type: ignore[attr-defined]
    return pipeline


_DEFINITION_PIPELINE = _definition_pipeline()


class CrmSyncConfig(Config):
    full_refresh: bool = Field(
        default=False,
        description=(
            "Drop the selected resources' tables and incremental cursors, then reload them "
            "from scratch. Resources that are not selected are left alone."
        ),
    )


class _ForwardToDagster(logging.Handler):
    def __init__(self, context: AssetExecutionContext) -> None:
        super().__init__(level=logging.INFO)
        self._log = context.log

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            self._log.error(message)
        elif record.levelno >= logging.WARNING:
            self._log.warning(message)
        else:
            self._log.info(message)


@contextmanager
def _source_logs_in(context: AssetExecutionContext) -> Iterator[None]:
    """Show the source's progress and retry messages in the run's log."""
    source_logger = logging.getLogger("crm_assets.sources")
    handler = _ForwardToDagster(context)
    previous_level = source_logger.level
    source_logger.addHandler(handler)
    source_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        source_logger.removeHandler(handler)
        source_logger.setLevel(previous_level)


def _is_transient(error: CrmError) -> bool:
    """Worth another attempt by the run's retry policy: the API was down, not wrong. A host name
    that does not resolve is a wrong base URL far more often than an outage; an API that refused
    the run's first connection is not running there (http.py)."""
    if not isinstance(error, CrmApiError) or error.unresolvable or error.unreachable:
        return False
    return error.status is None or error.status in RETRY_STATUSES


@dlt_assets(
    dlt_source=_DEFINITION_SOURCE,
    dlt_pipeline=_DEFINITION_PIPELINE,
    name="crm_sync_assets",
    dagster_dlt_translator=CrmTranslator(CRM_ENDPOINTS),
    pool=WAREHOUSE_POOL,
)
def crm_sync_assets(
    context: AssetExecutionContext, dlt: DagsterDltResource, config: CrmSyncConfig
) -> Iterator[MaterializeResult]:
    names = {key.path[-1] for key in context.selected_asset_keys}
    try:
        source = crm()
        selected_destination()
        # the run's own settings (the definitions' may be older): what the stored tables must take
        selected = [endpoint for endpoint in configured_endpoints() if endpoint.name in names]
    except CrmConfigurationError as exc:
        raise _failure(str(exc), allow_retries=False) from None
    if config.full_refresh:
        context.log.info("Full refresh: dropping and reloading %s" % ", ".join(
            key.to_user_string() for key in sorted(context.selected_asset_keys)))
    with _source_logs_in(context):
        try:
            with exclusive_run(), sync_tuning():
                pipeline = crm_pipeline()
                options: dict[str, Any] = run_options(pipeline)
                if config.full_refresh:
                    options["refresh"] = "drop_resources"
                else:
                    refuse_earlier_layout(pipeline, selected)
                results = list(
                    dlt.run(context=context, dlt_source=source, dlt_pipeline=pipeline, **options)
                )
                drop_staging(pipeline)
                # read back while no other run can be writing the warehouse
                tables = [result.asset_key.path[-1] for result in results]
                counts = table_row_counts(pipeline, tables)
                cursors = {table: _cursor_metadata(pipeline, table) for table in tables}
                changes = {table: schema_changes(pipeline, table) for table in tables}
        except Exception as exc:
            error = find_crm_error(exc)
            if error is not None:
                raise _failure(str(error), allow_retries=_is_transient(error)) from None
            violation = _contract_violation(exc)
            if violation is not None:
                raise _failure(violation, allow_retries=False) from None
            raise

    _unresolved_failure.clear()
    for result, table in zip(results, tables, strict=True):
        metadata = dict(result.metadata or {})
        metadata["dagster/row_count"] = counts.get(table)  # rows in the table after this run
        metadata["dagster/table_name"] = f"{DATASET_NAME}.{table}"
        # dagster-dlt's `rows_loaded` counts every copy of a record the read met (the merge keeps
        # one), and its `first_run` is the pipeline's first run ever, false on a full refresh:
        # both said something else than they seemed to
        read = metadata.pop("rows_loaded", None)
        metadata["crm/records_read"] = MetadataValue.int(int(getattr(read, "value", read) or 0))
        metadata.pop("first_run", None)
        metadata.update(cursors[table])
        for kind, entries in changes[table].items():
            metadata[f"crm/{kind}"] = MetadataValue.json(entries)
        variants, new_columns = changes[table]["variant_columns"], changes[table]["new_columns"]
        if variants:
            context.log.warning(
                f"{table}: a field changed type, dlt added variant column(s) {', '.join(variants)}"
            )
        elif new_columns and not changes[table]["new_tables"]:
            context.log.info(f"{table}: new column(s) {', '.join(new_columns)}")
        yield MaterializeResult(asset_key=result.asset_key, metadata=metadata)


# The command lines that run the assets in their own process and end with their own words
# ("Error: Materialization failed.") below every stack trace: `dg launch`, `dagster asset materialize`.
_CLI_RUNS = {("dg", "launch"), ("dagster", "asset")}
_unresolved_failure: list[str] = []  # the last sync's failure in this process, until one succeeds


def _say_failure_last() -> None:
    if _unresolved_failure:
        print(f"crm sync failed: {_unresolved_failure[-1]}", file=sys.stderr, flush=True)


def _failure(description: str, allow_retries: bool) -> Failure:
    """The step's failure: its description is the one line that says what to do. From a command
    line that runs the assets itself, that line is also the last one it prints (unless a retry
    of the step succeeded)."""
    if tuple(os.path.basename(arg) for arg in sys.argv[:2]) in _CLI_RUNS:
        if not _unresolved_failure:
            atexit.register(_say_failure_last)
        _unresolved_failure.append(description)
    return Failure(description=description, allow_retries=allow_retries)


def _cursor_metadata(pipeline: Pipeline, resource: str) -> dict[str, Any]:
    """The resource's incremental cursor after the run, from dlt's state: `crm/cursor`, the newest
    `date_updated` loaded (the next run reads from there), and `crm/full_load`, whether this run
    read the resource from scratch (no cursor before it: its first load, or a full refresh)."""
    incremental = (
        pipeline.state.get("sources", {}).get(pipeline.default_schema_name, {})
        .get("resources", {}).get(resource, {}).get("incremental", {}).get(CURSOR_FIELD)
    )
    if not isinstance(incremental, dict):
        return {"crm/full_load": MetadataValue.bool(True)}
    metadata: dict[str, Any] = {"crm/full_load": MetadataValue.bool(incremental.get("start_value") is None)}
    last = incremental.get("last_value")
    if isinstance(last, (int, float)) and not isinstance(last, bool):
        metadata["crm/cursor"] = MetadataValue.timestamp(float(last))
    return metadata


def _contract_violation(exc: BaseException) -> Optional[str]:
    """A readable message for a refused schema change (`schema_contract="freeze"`)."""
    current: Optional[BaseException] = exc
    while current is not None:
        if isinstance(current, DataValidationError):
            what = f"column `{current.column_name}`" if current.column_name else "table"
            return (
                f"Schema contract refused a change in table `{current.table_name}`: new {what} "
                "(SOURCES__CRM__SCHEMA_CONTRACT=freeze). The API sent a field the warehouse does "
                "not have; the columns are frozen, set SOURCES__CRM__SCHEMA_CONTRACT=evolve to let it in."
            )
        current = current.__cause__ or current.__context__
    return None

