"""The hourly sync and the daily audit. To change when they run, edit `CRM_SYNC_CRON` or
`CRM_AUDIT_CRON` in constants.py (UTC).

With accounts configured (partitions.py), each tick requests one run per account (its partition),
and skips only the accounts whose previous run of that job is still queued or running: a slow or
failing account never holds back the others. Without accounts, one run per tick, as always.
"""

from collections.abc import Sequence
from datetime import timezone
from typing import Any, Union

from dagster import (
    DagsterInstance,
    DagsterRun,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from .constants import CRM_AUDIT_CRON, CRM_SYNC_CRON, SCHEDULE_TIMEZONE
from .jobs import ACTIVE_RUN_STATUSES, account_warehouse_tags, active_runs, crm_audit, crm_sync
from .partitions import ACCOUNTS, PARTITION_TAG, Account

def account_run_tags(name: str) -> dict[str, str]:
    """The tags of a run for account `name`. Its own value of the warehouse tag: deploy/dagster.yaml
    admits one run per value (so one per account, accounts in parallel), dagster.yaml (DuckDB, one
    file for every account) one run across all values. Dagster's own `dagster/partition` is limited
    per value as well, which also covers partitioned runs launched from the UI. crm_audit is
    checks-only and has no partitions of its own, so its runs carry the partition as this tag
    (Dagster then runs the partitioned checks for that account) instead of a `partition_key`."""
    return {**account_warehouse_tags(name), PARTITION_TAG: name}


def active_runs_by_account(instance: DagsterInstance, job_name: str) -> dict[str, DagsterRun]:
    """{account: a queued or running run of `job_name` for it}."""
    runs = instance.get_runs(filters=RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES))
    return {run.tags[PARTITION_TAG]: run for run in runs if PARTITION_TAG in run.tags}


def _tick(context: ScheduleEvaluationContext) -> str:
    """The tick's time (the daemon always sets it), in UTC."""
    return context.scheduled_execution_time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _per_account(
    context: ScheduleEvaluationContext, job: Any, accounts: Sequence[Account], partitioned: bool
) -> Union[list[RunRequest], SkipReason]:
    """One request per account without a queued or running run of `job`; the others are named in
    the tick's log (and in the skip reason when none is left)."""
    busy = active_runs_by_account(context.instance, job.name)
    tick = _tick(context)
    requests, skipped = [], []
    for account in accounts:
        run = busy.get(account.name)
        if run is not None:
            skipped.append(f"{account.name} (run {run.run_id} {run.status.value.lower()})")
            continue
        requests.append(
            RunRequest(
                # one per account and tick: a re-evaluated tick requests nothing twice
                run_key=f"{job.name}:{account.name}:{tick}",
                partition_key=account.name if partitioned else None,
                tags=account_run_tags(account.name),
            )
        )
    if skipped:
        context.log.info(
            f"{job.name} still queued or running for {len(skipped)} account(s), skipped this tick: "
            + ", ".join(skipped)
        )
    if not requests:
        return SkipReason(f"Every account's previous {job.name} run is still queued or running: " + ", ".join(skipped))
    return requests


def sync_schedule(accounts: Sequence[Account] = ACCOUNTS) -> ScheduleDefinition:
    """crm_sync_schedule, for `accounts` (none: the single account)."""

    @schedule(
        name="crm_sync_schedule",
        job=crm_sync,
        cron_schedule=CRM_SYNC_CRON,
        execution_timezone=SCHEDULE_TIMEZONE,
        default_status=DefaultScheduleStatus.RUNNING,
        description=(
            f"Runs crm_sync (load every CRM resource, then check the tables) on `{CRM_SYNC_CRON}` "
            f"({SCHEDULE_TIMEZONE}). Skips a tick while an earlier crm_sync is still queued or running, "
            "so slow syncs never pile up."
            + (
                " One run per account (partition); an account whose previous run is still queued or "
                "running is skipped, the others are requested."
                if accounts else ""
            )
        ),
    )
    def crm_sync_schedule(context: ScheduleEvaluationContext):
        if accounts:
            return _per_account(context, crm_sync, accounts, partitioned=True)
        active = active_runs(context.instance, crm_sync.name)
        if active:
            return SkipReason(
                f"crm_sync run {active[0].run_id} is still {active[0].status.value.lower()}; "
                "this tick is skipped rather than queued behind it"
            )
        return RunRequest()

    return crm_sync_schedule


def audit_schedule(accounts: Sequence[Account] = ACCOUNTS) -> ScheduleDefinition:
    """crm_audit_schedule, for `accounts` (none: the single account)."""

    @schedule(
        name="crm_audit_schedule",
        job=crm_audit,
        cron_schedule=CRM_AUDIT_CRON,
        execution_timezone=SCHEDULE_TIMEZONE,
        default_status=DefaultScheduleStatus.RUNNING,
        description=(
            f"Runs crm_audit (every crm.* table against a complete listing of the API, repaired where it "
            f"differs) on `{CRM_AUDIT_CRON}` ({SCHEDULE_TIMEZONE}). Skips a tick while an audit is still "
            "queued or running."
            + (" One run per account, skipping an account whose audit is still under way." if accounts else "")
        ),
    )
    def crm_audit_schedule(context: ScheduleEvaluationContext):
        if accounts:
            return _per_account(context, crm_audit, accounts, partitioned=False)
        active = active_runs(context.instance, crm_audit.name)
        if active:
            return SkipReason(f"crm_audit run {active[0].run_id} is still {active[0].status.value.lower()}")
        return RunRequest()

    return crm_audit_schedule


crm_sync_schedule = sync_schedule()
crm_audit_schedule = audit_schedule()
