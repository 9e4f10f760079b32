"""Names shared by the Dagster side of the project."""

GROUP_NAME = "crm"
ASSET_KEY_PREFIX = "crm"
OWNERS = ["team:data-engineering"]

# --- orchestration (jobs.py, schedules.py, sensors.py, checks.py) -----------------------------
# The constants below are read when the code location loads; to change one, edit it here and
# reload the code location (nothing is taken from the environment at import time).

# Hourly, on the hour, evaluated in UTC. Change it here; `dagster dev` picks it up on reload.
CRM_SYNC_CRON = "0 * * * *"
SCHEDULE_TIMEZONE = "UTC"
# The audit (job crm_audit): daily at 03:30 UTC, between two hourly syncs.
CRM_AUDIT_CRON = "30 3 * * *"

# crm_sync's op retry policy: at most 3 retries, 30 s base delay, exponential (30, 90, 210 s)
# with +/- 30 s jitter. Only transient API failures are retried (assets.py raises
# Failure(allow_retries=False) for everything else); HTTP-level retries happen inside each
# attempt already.
SYNC_MAX_RETRIES = 3
SYNC_RETRY_DELAY_SECONDS = 30

# Runs that touch the warehouse carry this tag; dagster.yaml limits it to one run at a time.
WAREHOUSE_RUN_TAG = "crm_assets/warehouse"

# crm_change_sensor: how often it asks the API (5 size=0 requests per evaluation), and how far
# back it looks before its last evaluation, so an edit stamped in the same second as that
# evaluation (or by a server clock a few seconds behind ours) is not missed. The price is
# that an edit made within the overlap may be synced twice; the sync is idempotent.
CHANGE_SENSOR_INTERVAL_SECONDS = 120
CHANGE_SENSOR_OVERLAP_SECONDS = 5

# Freshness (a Dagster FreshnessPolicy on every crm/* asset): WARN once the newest load is
# older than one schedule interval plus a margin for a slow run, FAIL at two intervals (a
# missed or failed sync, and the next one not in yet).
FRESHNESS_WARN_AFTER_MINUTES = 75
FRESHNESS_FAIL_AFTER_MINUTES = 120

# crm_sync_failure_sensor posts failures here when set (read at evaluation time).
ALERT_WEBHOOK_ENV = "CRM_ALERT_WEBHOOK_URL"
