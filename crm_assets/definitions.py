"""The code location: composition only."""

from dagster import Definitions, in_process_executor, map_asset_specs

from .assets import crm_sync_assets
from .audit import crm_audit_checks
from .checks import with_crm_freshness_policy
from .jobs import crm_audit, crm_checks, crm_sync
from .resources import RESOURCES
from .schedules import crm_audit_schedule, crm_sync_schedule
from .sensors import crm_audit_sensor, crm_change_sensor, crm_sync_failure_sensor

defs = Definitions(
    # every crm/* asset carries the freshness policy (WARN after 75 min, FAIL after 2 h)
    assets=map_asset_specs(with_crm_freshness_policy, [crm_sync_assets]),
    # the table checks are part of crm_sync_assets (checks.py); the audit's are their own step
    asset_checks=[crm_audit_checks],
    jobs=[crm_sync, crm_checks, crm_audit],
    schedules=[crm_sync_schedule, crm_audit_schedule],
    sensors=[crm_change_sensor, crm_sync_failure_sensor, crm_audit_sensor],
    resources=RESOURCES,
    # The sync and its checks are one step (dlt parallelises inside it): a process per step
    # would only add ~2 s of start-up and imports to every run.
    executor=in_process_executor,
)
