"""The audit as Dagster runs it: one `warehouse_matches_api` check per table (job `crm_audit`).

Each check proves its table equals the API and repairs it where it does not (sources/audit.py):
missing and stale records are merged again, records gone from the API are marked
(`_crm_deleted_at`) or, under `SOURCES__CRM__HARD_DELETE`, removed. It passes when the table equals
the API after the repair, and fails with severity ERROR when it cannot repair (the guard on
`SOURCES__CRM__AUDIT_MAX_GONE_SHARE` tripped, an API error). It writes the warehouse, so it takes the
sync's pool, its machine-wide lock and its process tuning: an audit and a sync never write at once.
"""

# No `from __future__ import annotations`: Dagster checks the context annotation at runtime.

from collections.abc import Iterator

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    DagsterEventType,
    multi_asset_check,
)

from .assets import CRM_ENDPOINTS, WAREHOUSE_POOL, _source_logs_in
from .constants import ASSET_KEY_PREFIX
from .sources.audit import audit
from .sources.crm import CrmConfigurationError, find_crm_error
from .sources.crm.audit import audit_settings
from .sources.crm_pipeline import crm_pipeline
from .sources.destination import selected_destination
from .sources.run_lock import exclusive_run
from .sources.tuning import sync_tuning

WAREHOUSE_MATCHES_API = "warehouse_matches_api"
# crm_audit's runs carry it (jobs.py); see `_audits`.
AUDIT_RUN_TAG = "crm_assets/audit"


def _specs() -> list[AssetCheckSpec]:
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
        )
        for endpoint in CRM_ENDPOINTS
    ]


@multi_asset_check(
    name="crm_audit_checks",
    specs=_specs(),
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
    keys = sorted(context.selected_asset_check_keys, key=lambda k: k.to_user_string())
    names = [key.asset_key.path[-1] for key in keys]
    try:
        settings = audit_settings()
        selected_destination()
    except CrmConfigurationError as exc:
        results = {name: str(exc) for name in names}
    else:
        with _source_logs_in(context):  # type: ignore[arg-type]
            try:
                with exclusive_run(), sync_tuning():
                    audits = audit(crm_pipeline(), settings, names)
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
                    f"crm.{name} equals the API ({outcome.listed} records): {outcome.missing} missing, "
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
