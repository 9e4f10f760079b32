"""The hourly sync. To change when it runs, edit `CRM_SYNC_CRON` in constants.py (UTC)."""

from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from .constants import CRM_SYNC_CRON, SCHEDULE_TIMEZONE
from .jobs import active_sync_runs, crm_sync


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
