"""Jobs over the `crm` group: the sync (load + checks) and the checks on their own."""

from dagster import (
    AssetSelection,
    Backoff,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Jitter,
    RetryPolicy,
    RunsFilter,
    define_asset_job,
)

from .assets import WAREHOUSE_POOL
from .constants import GROUP_NAME, SYNC_MAX_RETRIES, SYNC_RETRY_DELAY_SECONDS, WAREHOUSE_RUN_TAG

# Runs carrying this tag wait in the run queue while another one is in progress (dagster.yaml:
# concurrency > runs > tag_concurrency_limits). The `crm_warehouse` pool guards the same thing
# step by step, also for ad-hoc materializations launched from the UI.
WAREHOUSE_RUN_TAGS = {WAREHOUSE_RUN_TAG: WAREHOUSE_POOL}

crm_sync = define_asset_job(
    name="crm_sync",
    # a group selection includes the checks that target the group's assets: they run after the load
    selection=AssetSelection.groups(GROUP_NAME),
    description=(
        "Load the CRM resources into the warehouse (merge on id), then run their checks. "
        "Transient API failures are retried up to 3 times with exponential backoff; a failed "
        "blocking check (duplicate or NULL id) fails the run."
    ),
    run_tags=WAREHOUSE_RUN_TAGS,
    op_retry_policy=RetryPolicy(
        max_retries=SYNC_MAX_RETRIES,
        delay=SYNC_RETRY_DELAY_SECONDS,
        backoff=Backoff.EXPONENTIAL,
        jitter=Jitter.PLUS_MINUS,
    ),
)

crm_checks = define_asset_job(
    name="crm_checks",
    selection=AssetSelection.all_asset_checks() & AssetSelection.groups(GROUP_NAME),
    description=(
        "Run the checks on the crm.* tables without loading anything: unique and non-null ids "
        "(fail the run) and row counts against the API (warn)."
    ),
    run_tags=WAREHOUSE_RUN_TAGS,
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
    return list(
        instance.get_runs(
            filters=RunsFilter(job_name=crm_sync.name, statuses=ACTIVE_RUN_STATUSES), limit=5
        )
    )
