"""Jobs over the `crm` group: the sync (load + checks), the checks on their own, and the audit."""

from typing import Any, Optional

from dagster import (
    AssetSelection,
    Backoff,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Jitter,
    PartitionedConfig,
    PartitionsDefinition,
    RetryPolicy,
    RunsFilter,
    define_asset_job,
)

from .assets import WAREHOUSE_POOL
from .audit import AUDIT_RUN_TAG, crm_audit_checks
from .constants import GROUP_NAME, SYNC_MAX_RETRIES, SYNC_RETRY_DELAY_SECONDS, WAREHOUSE_RUN_TAG
from .partitions import ACCOUNT_PARTITIONS

# Runs carrying this tag wait in the run queue while another one is in progress (dagster.yaml:
# concurrency > runs > tag_concurrency_limits). The `crm_warehouse` pool guards the same thing
# step by step, also for ad-hoc materializations launched from the UI.
WAREHOUSE_RUN_TAGS = {WAREHOUSE_RUN_TAG: WAREHOUSE_POOL}


def account_warehouse_tags(name: str) -> dict[str, str]:
    """With accounts, a run's warehouse tag names its account: deploy/dagster.yaml admits one run
    per value, so accounts run in parallel there (dagster.yaml, one DuckDB file: one at a time)."""
    return {WAREHOUSE_RUN_TAG: f"account:{name}"}


def _per_account(partitions_def: Optional[PartitionsDefinition], run_config: dict[str, Any]) -> dict[str, Any]:
    """A job's run tags and config: the shared warehouse tag, or with accounts the account's own,
    set by Dagster on every run of a partition however it is launched (schedule, sensor, the UI's
    launchpad, `dg launch --partition`)."""
    if partitions_def is None:
        return {"run_tags": WAREHOUSE_RUN_TAGS, **({"config": run_config} if run_config else {})}
    return {
        "partitions_def": partitions_def,
        "config": PartitionedConfig(
            partitions_def=partitions_def,
            run_config_for_partition_key_fn=lambda _: run_config,
            tags_for_partition_key_fn=account_warehouse_tags,
        ),
    }

# The audit's checks (`warehouse_matches_api`) list the whole API: they run in `crm_audit` only.
AUDIT_CHECKS = AssetSelection.checks(crm_audit_checks)

crm_sync = define_asset_job(
    name="crm_sync",
    # a group selection includes the checks that target the group's assets: they run after the load
    selection=AssetSelection.groups(GROUP_NAME) - AUDIT_CHECKS,
    description=(
        "Load the CRM resources into the warehouse (merge on id), then run their checks. "
        "Transient API failures are retried up to 3 times with exponential backoff; a failed "
        "blocking check (duplicate or NULL id) fails the run."
    ),
    **_per_account(ACCOUNT_PARTITIONS, {}),
    op_retry_policy=RetryPolicy(
        max_retries=SYNC_MAX_RETRIES,
        delay=SYNC_RETRY_DELAY_SECONDS,
        backoff=Backoff.EXPONENTIAL,
        jitter=Jitter.PLUS_MINUS,
    ),
)

_CHECKS_DESCRIPTION = (
    "Run the checks on the crm.* tables without loading anything: unique and non-null ids "
    "(fail the run) and row counts against the API (warn)."
)


def build_crm_checks(partitions_def: Optional[PartitionsDefinition] = None) -> Any:
    """The job `crm_checks`; with accounts (`partitions_def`), one account per run.

    Dagster finds no partitions in a selection of checks alone ("no PartitionsDefinition shared by
    all the provided assets"), so with accounts the job selects the assets with their table checks
    and tells the step to load nothing: the assets are skippable then (assets.py), and the step
    yields only the checks' results."""
    if partitions_def is None:
        return define_asset_job(
            name="crm_checks",
            selection=(AssetSelection.all_asset_checks() & AssetSelection.groups(GROUP_NAME)) - AUDIT_CHECKS,
            description=_CHECKS_DESCRIPTION,
            run_tags=WAREHOUSE_RUN_TAGS,
        )
    return define_asset_job(
        name="crm_checks",
        selection=AssetSelection.groups(GROUP_NAME) - AUDIT_CHECKS,
        description=_CHECKS_DESCRIPTION.replace("crm.*", "crm_<account>.*") + " One account per run.",
        **_per_account(partitions_def, {"ops": {"crm_sync_assets": {"config": {"checks_only": True}}}}),
    )


crm_checks = build_crm_checks(ACCOUNT_PARTITIONS)

crm_audit = define_asset_job(
    name="crm_audit",
    selection=AUDIT_CHECKS,
    description=(
        "Prove every crm.* table equals the API and repair it where it does not: missing and stale "
        "records are loaded again, records gone from the API are marked (_crm_deleted_at) or removed "
        "(SOURCES__CRM__HARD_DELETE). A check fails when it cannot repair (the guard, an API error)."
    ),
    run_tags={**WAREHOUSE_RUN_TAGS, AUDIT_RUN_TAG: "true"},
)

# Statuses of a run that has not finished: a new sync must not be requested behind it.
ACTIVE_RUN_STATUSES = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


def active_sync_runs(instance: DagsterInstance) -> list[DagsterRun]:
    """`crm_sync` runs that are queued or in progress."""
    return active_runs(instance, crm_sync.name)


def active_runs(instance: DagsterInstance, job_name: str) -> list[DagsterRun]:
    """Runs of `job_name` that are queued or in progress."""
    return list(
        instance.get_runs(filters=RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES), limit=5)
    )
