"""The `crm/*` assets: one multi-asset over the `crm` dlt source, its table checks in the same step.

With accounts configured (docs/accounts.md) the same assets are partitioned by account: a run
loads one account, with its own source (base URL, key, resources) and its own dlt pipeline and
dataset `crm_<name>`, so its cursors and tables are its own.
"""

# No `from __future__ import annotations` here: Dagster reads the config class from the signature.


import atexit
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Optional, Union

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetsDefinition,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)
from dlt.common.configuration.container import Container
from dlt.common.pipeline import PipelineContext
from dlt.common.schema.exceptions import DataValidationError
from dlt.extract import DltSource
from dlt.pipeline.pipeline import Pipeline
from dagster_dlt import DagsterDltResource, build_dlt_asset_specs
from pydantic import Field

from .checks import table_check_specs, table_checks
from .constants import ASSET_KEY_PREFIX
from .partitions import ACCOUNTS, account_partitions
from .sources.crm import (
    CrmApiError,
    CrmConfigurationError,
    CrmError,
    Endpoint,
    configured_endpoints,
    crm,
    find_crm_error,
)
from .sources.crm.accounts import Account, in_account_words, source_arguments
from .sources.crm.settings import CURSOR_FIELD, RETRY_STATUSES
from .sources.crm_pipeline import DATASET_NAME, PIPELINE_NAME, crm_pipeline, drop_staging
from .sources.destination import run_options, selected_destination
from .sources.isolation import load_leaving_out_failures
from .sources.readback import refuse_earlier_layout, schema_changes, table_row_counts
from .sources.run_lock import exclusive_run
from .sources.tuning import sync_tuning
from .sources.union_views import refresh_union_views, union_views_dropped
from .translator import CrmTranslator

# Only one run may write the warehouse at a time (DuckDB allows a single writer; dlt state
# must not be committed by two runs at once). The pool's limit is set on the instance.
WAREHOUSE_POOL = "crm_warehouse"


def union_endpoints(accounts: Sequence[Account]) -> tuple[Endpoint, ...]:
    """Every resource any account has, once (the first account's settings describe it): the
    assets are their union, and an account without one of them does not materialize it."""
    union: dict[str, Endpoint] = {}
    for account in accounts:
        for endpoint in account.endpoints:
            union.setdefault(endpoint.name, endpoint)
    return tuple(union.values())


# Which resources there are, and their keys, is configuration (sources/crm/catalog.py; with
# accounts, each account's), read when the code location loads: a bad setting fails
# `dg check defs`, naming it.
CRM_ENDPOINTS = union_endpoints(ACCOUNTS) if ACCOUNTS else configured_endpoints()


def _definition_source(accounts: Sequence[Account], endpoints: Sequence[Endpoint]) -> Any:
    """The source as Dagster sees it when it loads the code location: names and hints only. The
    connection arguments are placeholders; the run builds the real source from configuration.
    With accounts, its resources are every account's (placeholder paths: only names count here)."""
    options: dict[str, Any] = {}
    if accounts:
        options["resources"] = {e.name: {"path": f"/definitions/{e.name}"} for e in endpoints}
    return crm(
        base_url="http://crm-api.invalid",
        api_key="not-used-at-definition-time",
        page_sizes={},
        hard_delete=False,
        max_retries=0,
        backoff_factor=0,
        request_timeout=1,
        **options,
    )


def _definition_pipeline() -> Pipeline:
    """The pipeline handle the definitions are built from: its names and destination only (a run
    creates its own). Its working folder is a temporary one, gone once it exists, and dlt's active
    pipeline is put back as it was: loading the code location leaves no trace on disk or in dlt."""
    context = Container()[PipelineContext]
    previous = context.pipeline() if context.is_active() else None
    with tempfile.TemporaryDirectory(prefix="crm_definitions_") as folder:
        pipeline = crm_pipeline(pipelines_dir=folder, for_run=False)
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
    checks_only: bool = Field(
        default=False,
        description=(
            "Load nothing: run only the selected checks. With accounts, a partitioned run of checks "
            "alone must select the assets too (Dagster finds no partitions in checks alone); "
            "crm_checks sets this when accounts are configured."
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


def build_crm_sync_assets(accounts: Sequence[Account] = ()) -> AssetsDefinition:
    """`crm_sync_assets` over the single account ([sources.crm]) or, with `accounts`, partitioned by
    account: the union of their resources, each run loading one account."""
    by_name = {account.name: account for account in accounts}
    endpoints = union_endpoints(accounts) if accounts else CRM_ENDPOINTS
    partitions = account_partitions(accounts)
    specs = build_dlt_asset_specs(
        _definition_source(accounts, endpoints), _DEFINITION_PIPELINE,
        CrmTranslator(endpoints, dataset="crm_<account>" if accounts else DATASET_NAME),
    )
    if accounts:
        # an account without a resource, and a run of checks alone (checks_only), yield no
        # materialization of it
        note = (
            f" Partitioned by CRM account: one partition per account under [sources.crm.accounts] "
            f"({len(accounts)} configured)."
        )
        specs = [
            spec.replace_attributes(skippable=True, description=(spec.description or "") + note)
            for spec in specs
        ]

    @multi_asset(
        name="crm_sync_assets",
        # what @dlt_assets would build, plus the table checks: evaluated in this step, they run for
        # every resource that landed even when another one failed (checks.py)
        specs=specs,
        check_specs=table_check_specs(endpoints, partitions),
        can_subset=True,
        pool=WAREHOUSE_POOL,
        partitions_def=partitions,
    )
    def crm_sync_assets(
        context: AssetExecutionContext, dlt: DagsterDltResource, config: CrmSyncConfig
    ) -> Iterator[Union[MaterializeResult, AssetCheckResult]]:
        account = _account(context, by_name)
        own = {e.name: e for e in (account.endpoints if account else endpoints)}
        selected = {key.path[-1] for key in context.selected_asset_keys}
        names = [name for name in own if name in selected and not config.checks_only]
        if account is not None and not config.checks_only and selected - set(own):
            context.log.info(
                f"Account {account.name} has no resource {', '.join(sorted(selected - set(own)))}: "
                "not materialized for it"
            )
        failed: dict[str, CrmError] = {}
        if names:  # none when only checks are selected (job crm_checks), or with checks_only
            materializations, failed = _load(context, dlt, config, names, account, accounts)
            yield from materializations
        checked = [
            key for key in context.selected_asset_check_keys
            if key.asset_key.path[-1] in own and key.asset_key.path[-1] not in failed
        ]
        if checked:
            yield from table_checks(context.log, checked, list(own.values()), account)
        if failed:
            raise _failure(
                _failure_description(failed, [name for name in names if name not in failed], account),
                allow_retries=all(_is_transient(error) for error in failed.values()),
                account=account,
            )
        _unresolved_failure.clear()

    return crm_sync_assets


def _account(context: AssetExecutionContext, by_name: Mapping[str, Account]) -> Optional[Account]:
    """The run's account (its partition key); None on the single-account path."""
    if not by_name:
        return None
    name = context.partition_key if context.has_partition_key else None
    if name not in by_name:
        raise _failure(
            f"No account {name!r} is configured (configured: {', '.join(by_name)}): every run of the "
            "crm assets is for one account, picked as its partition (--partition <name>); after "
            "changing the accounts, reload the code location",
            allow_retries=False,
        )
    return by_name[name]


crm_sync_assets = build_crm_sync_assets(ACCOUNTS)


def _failure_description(
    failed: dict[str, CrmError], loaded: list[str], account: Optional[Account] = None
) -> str:
    """One line: each failed resource with its reason, then what landed and how to re-run the rest."""
    reasons = "; ".join(str(error) for error in failed.values())
    if not loaded:
        return reasons
    assets = ",".join(f"{ASSET_KEY_PREFIX}/{name}" for name in failed)
    partition = f" --partition {account.name}" if account else ""
    return (
        f"{reasons}. Loaded and checked the others ({', '.join(loaded)}); once that is fixed, "
        f"re-run only the failed asset(s): dg launch --assets {assets}{partition}"
    )


def _load(
    context: AssetExecutionContext,
    dlt: DagsterDltResource,
    config: CrmSyncConfig,
    names: list[str],
    account: Optional[Account] = None,
    accounts: Sequence[Account] = (),
) -> tuple[list[MaterializeResult], dict[str, CrmError]]:
    """Load the resources `names`: the materializations of those that landed, and the errors of
    those that failed on their own (`isolatable`). All are read in one dlt run; when one fails,
    the run is repeated without it. dlt stops the whole extract at a resource's error and
    dagster-dlt drops the pipeline's local state before every run, so a failed attempt loads
    nothing and moves no cursor: the failed resource's table and cursor stay as they were.

    `account`: load that account, with its own source, pipeline and dataset, then refresh the
    views over every one of `accounts` (union_views.py)."""
    try:
        if account is None:
            connection: dict[str, Any] = {}
            # the run's own settings (the definitions' may be older): what the stored tables must take
            endpoints = configured_endpoints()
        else:
            # its key is read now, from dlt's providers, and goes nowhere but the requests
            connection = source_arguments(account)
            endpoints = account.endpoints
        first_source: Optional[DltSource] = crm(**connection)  # a bad setting fails here, before any request
        selected_destination()
        selected = [endpoint for endpoint in endpoints if endpoint.name in names]
    except CrmConfigurationError as exc:
        raise _failure(str(exc), allow_retries=False, account=account) from None
    pipeline_names = (
        {"pipeline_name": account.pipeline_name, "dataset_name": account.dataset_name} if account else {}
    )
    if config.full_refresh:
        context.log.info("Full refresh: dropping and reloading %s" % ", ".join(
            key.to_user_string() for key in sorted(context.selected_asset_keys)))
    failed: dict[str, CrmError] = {}
    with _source_logs_in(context):
        try:
            with exclusive_run(pipeline_name=pipeline_names.get("pipeline_name", PIPELINE_NAME)) as database, \
                    sync_tuning():
                pipeline = crm_pipeline(**pipeline_names, connection=database)
                options: dict[str, Any] = run_options(pipeline)
                if config.full_refresh:
                    options["refresh"] = "drop_resources"
                else:
                    refuse_earlier_layout(pipeline, selected, account.name if account else None)
                # PostgreSQL drops no table a view reads: a full refresh of an account's tables
                # first drops their union views, and holds off the other accounts' refresh of them
                views_held = (
                    union_views_dropped(pipeline, names) if account is not None and config.full_refresh
                    else nullcontext()
                )

                def attempt(resources: list[str]) -> list[Any]:
                    nonlocal first_source
                    # a fresh source for each attempt: no step of the read keeps what a failed one
                    # saw (the first attempt takes the one that checked the settings)
                    source = (first_source or crm(**connection)).with_resources(*resources)
                    first_source = None
                    return list(dlt.run(context=context, dlt_source=source, dlt_pipeline=pipeline, **options))

                def left_out(resource: str, error: CrmError, remaining: list[str]) -> None:
                    context.log.error(f"{resource} failed and is left out of this run: {error}")
                    if remaining:
                        context.log.info(f"Loading the others without it: {', '.join(remaining)}")

                with views_held:
                    loaded, failed = load_leaving_out_failures(names, attempt, left_out)
                results = loaded or []
                tables = [result.asset_key.path[-1] for result in results]
                if tables:
                    drop_staging(pipeline)
                # read back while no other run can be writing the warehouse
                counts = table_row_counts(pipeline, tables) if tables else {}
                cursors = {table: _cursor_metadata(pipeline, table) for table in tables}
                changes = {table: schema_changes(pipeline, table) for table in tables}
                if account is not None and tables:
                    views = refresh_union_views(pipeline, {a.name: a.dataset_name for a in accounts}, tables)
                    if views:
                        context.log.info(f"Every account's rows: {', '.join(views)}")
        except Exception as exc:
            error = find_crm_error(exc)
            if error is not None:
                raise _failure(str(error), allow_retries=_is_transient(error), account=account) from None
            violation = _contract_violation(exc)
            if violation is not None:
                raise _failure(violation, allow_retries=False, account=account) from None
            raise

    materializations = []
    for result, table in zip(results, tables, strict=True):
        metadata = dict(result.metadata or {})
        metadata["dagster/row_count"] = counts.get(table)  # rows in the table after this run
        metadata["dagster/table_name"] = f"{pipeline.dataset_name}.{table}"
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
        materializations.append(MaterializeResult(asset_key=result.asset_key, metadata=metadata))
    return materializations, failed


# The command lines that run the assets in their own process and end with their own words
# ("Error: Materialization failed.") below every stack trace: `dg launch`, `dagster asset materialize`.
_CLI_RUNS = {("dg", "launch"), ("dagster", "asset")}
_unresolved_failure: list[str] = []  # the last sync's failure in this process, until one succeeds


def _say_failure_last() -> None:
    if _unresolved_failure:
        print(f"crm sync failed: {_unresolved_failure[-1]}", file=sys.stderr, flush=True)


def _failure(description: str, allow_retries: bool, account: Optional[Account] = None) -> Failure:
    """The step's failure: its description is the one line that says what to do (for `account`,
    naming it first). From a command line that runs the assets itself, that line is also the
    last one it prints (unless a retry of the step succeeded)."""
    if account is not None:
        description = f"Account {account.name}: {in_account_words(account, description)}"
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

