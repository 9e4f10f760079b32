"""The audit as Dagster runs it: one `warehouse_matches_api` check per table (job `crm_audit`).

Each check proves its table equals the API and repairs it where it does not (sources/audit.py):
missing and stale records are merged again, records gone from the API are marked
(`_crm_deleted_at`) or, under `SOURCES__CRM__HARD_DELETE`, removed. It passes when the table equals
the API after the repair, and fails with severity ERROR when it cannot repair (the guard on
`SOURCES__CRM__AUDIT_MAX_GONE_SHARE` tripped, an API error). It writes the warehouse, so it takes the
sync's pool, its machine-wide lock and its process tuning: an audit and a sync never write at once.

With accounts (partitions.py) the checks are partitioned like the assets: the audit of a run is of
its account (the run's `dagster/partition` tag; crm_audit is checks-only, so its runs carry the tag
rather than a partition key, schedules.py), against that account's API with its own key, in its own
pipeline and dataset (`crm_<name>`), and each account keeps its own check status.
"""

# No `from __future__ import annotations`: Dagster checks the context annotation at runtime.

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetChecksDefinition,
    AssetCheckSpec,
    AssetKey,
    DagsterEventType,
    PartitionsDefinition,
    PreviewWarning,
    multi_asset_check,
)

from .assets import CRM_ENDPOINTS, WAREHOUSE_POOL, _source_logs_in, union_endpoints
from .constants import ASSET_KEY_PREFIX
from .partitions import ACCOUNTS, Account, account_partitions
from .sources.audit import audit
from .sources.crm import CrmConfigurationError, Endpoint, find_crm_error
from .sources.crm.accounts import source_arguments
from .sources.crm.audit import audit_settings
from .sources.crm_pipeline import DATASET_NAME, PIPELINE_NAME, account_pipeline, crm_pipeline
from .sources.destination import selected_destination
from .sources.run_lock import exclusive_run
from .sources.tuning import sync_tuning

WAREHOUSE_MATCHES_API = "warehouse_matches_api"
# crm_audit's runs carry it (jobs.py); see `_audits`.
AUDIT_RUN_TAG = "crm_assets/audit"


def _specs(endpoints: Sequence[Endpoint], partitions: Optional[PartitionsDefinition]) -> list[AssetCheckSpec]:
    # Partitioned check specs are a preview feature of Dagster 1.13 (a PreviewWarning each time
    # one is built, here at load time): they are what keeps one account's failed audit visible
    # after another account's passes, so they are used, and the warning is not repeated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return [
            AssetCheckSpec(
                WAREHOUSE_MATCHES_API,
                asset=AssetKey([ASSET_KEY_PREFIX, endpoint.name]),
                description=(
                    f"crm.{endpoint.name} holds exactly the records GET {endpoint.path} lists, with their "
                    "date_updated: missing and stale rows are loaded again, rows the API no longer lists "
                    "are marked (_crm_deleted_at) or, with SOURCES__CRM__HARD_DELETE, removed. Fails (ERROR) "
                    "when it cannot repair: more than SOURCES__CRM__AUDIT_MAX_GONE_SHARE of the table gone, "
                    "or an API error."
                ),
                partitions_def=partitions,
            )
            for endpoint in endpoints
        ]


def build_crm_audit_checks(accounts: Sequence[Account] = ACCOUNTS) -> AssetChecksDefinition:
    """The audit's checks, for `accounts` (none: the single account): partitioned by account like
    the assets, each run auditing its own account."""
    endpoints = union_endpoints(accounts) if accounts else CRM_ENDPOINTS
    by_name = {account.name: account for account in accounts}

    @multi_asset_check(
        name="crm_audit_checks",
        specs=_specs(endpoints, account_partitions(accounts)),
        can_subset=True,
        pool=WAREHOUSE_POOL,
        description="The audit: each crm.* table against a complete listing of the API, repaired where it differs.",
    )
    def crm_audit_checks(context: AssetCheckExecutionContext) -> Iterator[AssetCheckResult]:
        if not _audits(context):
            context.log.info(
                "warehouse_matches_api is skipped in a run that materializes assets: it lists the whole "
                "API, so it runs in crm_audit (dg launch --job crm_audit) or on its own"
            )
            return
        yield from _audit_checks(context, _account(context, by_name))

    return crm_audit_checks


def _account(context: AssetCheckExecutionContext, accounts: Mapping[str, Account]) -> Optional[Account]:
    """The account this run audits: its partition (crm_audit's runs carry it as a tag)."""
    if not accounts:
        return None
    if not context.has_partition_key:
        example = next(iter(accounts))
        raise CrmConfigurationError(
            "Accounts are configured, so an audit is of one account: launch crm_audit with the tag "
            f"dagster/partition=<account> (one of {', '.join(accounts)}), e.g. dagster job execute "
            f"-m crm_assets.definitions -j crm_audit --tags '{{\"dagster/partition\": \"{example}\"}}'"
        )
    try:
        return accounts[context.partition_key]
    except KeyError:
        raise CrmConfigurationError(
            f"No account {context.partition_key!r} is configured; configured: {', '.join(accounts)}"
        ) from None


def _audit_checks(context: AssetCheckExecutionContext, account: Optional[Account]) -> Iterator[AssetCheckResult]:
    keys = sorted(context.selected_asset_check_keys, key=lambda k: k.to_user_string())
    if account is not None:
        own = {endpoint.name for endpoint in account.endpoints}
        absent = [key for key in keys if key.asset_key.path[-1] not in own]
        if absent:  # the assets are every account's resources together; this one lacks these
            context.log.info(
                f"Account {account.name} has no resource {', '.join(k.asset_key.path[-1] for k in absent)}: "
                "nothing to audit there"
            )
            keys = [key for key in keys if key not in absent]
    names = [key.asset_key.path[-1] for key in keys]
    dataset = account.dataset_name if account is not None else DATASET_NAME
    pipeline_name = account.pipeline_name if account is not None else PIPELINE_NAME
    try:
        settings = audit_settings(**source_arguments(account)) if account is not None else audit_settings()
        selected_destination()
    except CrmConfigurationError as exc:
        results = {name: str(exc) for name in names}
    else:
        with _source_logs_in(context):  # type: ignore[arg-type]
            try:
                with exclusive_run(pipeline_name=pipeline_name) as connection, sync_tuning():
                    pipeline = (
                        account_pipeline(account, connection=connection) if account is not None
                        else crm_pipeline(connection=connection)
                    )
                    audits = audit(pipeline, settings, names)
            except Exception as exc:
                error = find_crm_error(exc)
                if error is None:
                    raise
                results = {name: str(error) for name in names}
            else:
                results = audits  # type: ignore[assignment]
    for key, name in zip(keys, names):
        outcome = results[name]
        if isinstance(outcome, str):
            passed, description, metadata = False, outcome, {}
        else:
            passed, description, metadata = outcome.passed, outcome.problem, outcome.metadata()
            if passed:
                description = (
                    f"{dataset}.{name} equals the API ({outcome.listed} records): {outcome.missing} missing, "
                    f"{outcome.stale} stale and {outcome.gone} gone before the audit, "
                    f"{outcome.repaired} repaired, {outcome.deleted} "
                    f"{'removed' if settings.hard_delete else 'marked deleted'}"
                )
        if not passed:
            context.log.error(f"{key.to_user_string()}: {description}")
        yield AssetCheckResult(
            asset_key=key.asset_key,
            check_name=key.name,
            passed=passed,
            severity=AssetCheckSeverity.ERROR,
            description=description,
            metadata=metadata,
        )


crm_audit_checks = build_crm_audit_checks()


def _audits(context: AssetCheckExecutionContext) -> bool:
    """Whether this run is an audit: one of crm_audit (its tag), or a run of checks alone. Dagster
    adds the checks of the assets a run materializes to it (`dg launch --assets '*'`, the UI's
    Materialize): there the audit, a listing of the whole API, is left out (skipped)."""
    if context.run.tags.get(AUDIT_RUN_TAG) == "true":
        return True
    planned = context.instance.get_records_for_run(
        run_id=context.run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION_PLANNED, limit=1
    ).records
    return not planned
