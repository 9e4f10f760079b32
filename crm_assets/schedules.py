"""The hourly sync and the daily audit. To change when they run, edit `CRM_SYNC_CRON` or
`CRM_AUDIT_CRON` in constants.py (UTC)."""

from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from .constants import CRM_AUDIT_CRON, CRM_SYNC_CRON, SCHEDULE_TIMEZONE
from .jobs import active_runs, active_sync_runs, crm_audit, crm_sync


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
    ),
)
def crm_sync_schedule(context: ScheduleEvaluationContext):
    active = active_sync_runs(context.instance)
    if active:
        return SkipReason(
            f"crm_sync run {active[0].run_id} is still {active[0].status.value.lower()}; "
            "this tick is skipped rather than queued behind it"
        )
    return RunRequest()


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
    ),
)
def crm_audit_schedule(context: ScheduleEvaluationContext):
    active = active_runs(context.instance, crm_audit.name)
    if active:
        return SkipReason(f"crm_audit run {active[0].run_id} is still {active[0].status.value.lower()}")
    return RunRequest()
