"""Sensors: sync what changed in the CRM between scheduled syncs, report failed syncs, and audit
the tables whose row count stopped matching the API."""

import json
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import datetime, timezone
from typing import Any, Optional, Union

import requests
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    DagsterEventType,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    RunStatusSensorContext,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    run_status_sensor,
    sensor,
)

from .constants import (
    ALERT_WEBHOOK_ENV,
    ASSET_KEY_PREFIX,
    CHANGE_SENSOR_INTERVAL_SECONDS,
    CHANGE_SENSOR_OVERLAP_SECONDS,
)
from .assets import CRM_ENDPOINTS
from .audit import WAREHOUSE_MATCHES_API
from .checks import ROW_COUNT_MATCHES_API
from .jobs import active_runs, active_sync_runs, crm_audit, crm_checks, crm_sync
from .partitions import ACCOUNTS, PARTITION_TAG, Account, account_api_key
from .schedules import account_run_tags, active_runs_by_account
from .sources.crm import CrmError, connection_settings, count_records
from .sources.crm.accounts import configured_accounts, in_account_words
from .sources.crm.http import CrmSession
from .sources.crm.keyset import HOT_SECONDS

# A sensor tick must finish within Dagster's sensor timeout (60 s by default): one quick retry
# per request, short waits. A failed tick costs nothing, the next one asks again.
_SENSOR_SESSION = dict(max_retries=1, backoff_factor=1.0, max_retry_delay=5.0, request_timeout=15.0)
# With accounts, up to this many accounts' APIs are asked at once, and an account without an answer
# after the deadline is asked again next time (its cursor stays): the tick stays within the
# timeout even when some APIs hang (each request gives up after 15 s, and is tried twice).
CHANGE_SENSOR_ACCOUNT_THREADS = 8
CHANGE_SENSOR_ACCOUNTS_DEADLINE_SECONDS = 40
_ALERT_TIMEOUT_SECONDS = 10
_MAX_ALERT_ERROR_CHARS = 2500


def _readable(error: Any) -> str:
    """An error's message without its class's module path (`SomeError: text`), and without any
    class name for a `Failure`, whose description is already written for people."""
    message = error.message.strip()
    head, separator, text = message.partition(": ")
    if separator and error.cls_name and head.rsplit(".", 1)[-1] == error.cls_name:
        return text if error.cls_name == "Failure" else f"{error.cls_name}: {text}"
    return message


def _now() -> float:
    return time.time()


def _json_object(raw: Optional[str]) -> dict[str, Any]:
    """A stored cursor's JSON object; {} for none or anything else."""
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _cursor_of(value: dict[str, Any]) -> dict[str, int]:
    """{resource: epoch seconds}: changes with `date_updated` after it are not synced yet. Stored
    as UTC timestamps people can read (`2026-12-03T08:20:00Z`); an earlier version's epoch
    integers are read too."""
    cursor = {}
    for name, at in value.items():
        if isinstance(at, (int, float)) and not isinstance(at, bool):
            cursor[name] = int(at)
        elif isinstance(at, str):
            try:
                cursor[name] = int(datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp())
            except ValueError:
                continue
    return cursor


def _load_cursor(raw: Optional[str]) -> dict[str, int]:
    return _cursor_of(_json_object(raw))


def _dump_cursor(cursor: dict[str, int]) -> str:
    return json.dumps(
        {name: datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") for name, at in cursor.items()},
        sort_keys=True,
    )


def _dated_ahead_from() -> int:
    """Where dates count as ahead (a wrong clock): past the margin the sync allows between the
    API's clock and ours. Such a record is no change since the last tick, and counted it would
    request a sync at every tick until its date comes; the schedule's sync reads it."""
    return int(_now()) + HOT_SECONDS + 1


def _single_account(context: SensorEvaluationContext) -> Union[RunRequest, SkipReason]:
    active = active_sync_runs(context.instance)
    if active:
        # the cursor stays: whatever changes meanwhile is found once that run is over
        return SkipReason(
            f"crm_sync run {active[0].run_id} is {active[0].status.value.lower()}; "
            "not requesting another until it is over"
        )

    cursor = _load_cursor(context.cursor)
    # Our clock, taken before asking: anything stamped after it is found next time. The overlap
    # covers edits stamped in this very second and a server clock slightly behind ours.
    checked_until = int(_now()) - CHANGE_SENSOR_OVERLAP_SECONDS
    new_cursor = {
        endpoint.name: max(cursor.get(endpoint.name, checked_until), checked_until)
        for endpoint in CRM_ENDPOINTS
    }
    watched = [endpoint for endpoint in CRM_ENDPOINTS if endpoint.name in cursor]

    changed: dict[str, int] = {}
    if watched:
        session = CrmSession(endpoints=CRM_ENDPOINTS, **_SENSOR_SESSION)
        try:
            base_url, api_key = connection_settings()
            for endpoint in watched:
                updated = count_records(
                    endpoint, updated_after=cursor[endpoint.name], updated_before=_dated_ahead_from(),
                    base_url=base_url, api_key=api_key, session=session,
                )
                if updated:
                    changed[endpoint.name] = updated
        except CrmError as exc:  # configuration or API errors name what failed, never the key
            return SkipReason(f"Could not ask the CRM API for changes: {exc}")
        finally:
            session.close()

    context.update_cursor(_dump_cursor(new_cursor))
    if not watched:
        return SkipReason(
            "First evaluation: changes are watched from now on; earlier ones are the schedule's job."
        )
    new_names = sorted(set(new_cursor) - set(cursor))
    if not changed:
        return SkipReason(
            "No CRM resource has changed since the last evaluation"
            + (f" (now also watching {', '.join(new_names)})" if new_names else "")
        )
    summary = ", ".join(f"{name} ({count} updated)" for name, count in changed.items())
    context.log.info(f"Changed since the last evaluation: {summary}")
    return RunRequest(
        asset_selection=[AssetKey([ASSET_KEY_PREFIX, name]) for name in changed],
        tags={"crm_assets/changed": ",".join(changed)},
    )


def _load_account_cursors(raw: Optional[str]) -> dict[str, dict[str, int]]:
    """{account: {resource: epoch seconds}}; the single account's flat cursor (a deployment that
    has just configured accounts) reads as none: every account starts its clock."""
    return {
        name: _cursor_of(resources)
        for name, resources in _json_object(raw).items()
        if isinstance(resources, dict)
    }


def _dump_account_cursors(cursors: dict[str, dict[str, int]]) -> str:
    return json.dumps({name: json.loads(_dump_cursor(cursor)) for name, cursor in cursors.items()}, sort_keys=True)


def _account_changes(account: Account, watched: dict[str, int], over: threading.Event) -> dict[str, int]:
    """{resource: records updated since its cursor} of one account, asked with its own key. Raises
    what failed (a CrmError names the resource and path, never the key). Stops asking once the
    evaluation is `over` (its answer would not be used)."""
    endpoints = [endpoint for endpoint in account.endpoints if endpoint.name in watched]
    session = CrmSession(endpoints=endpoints, **_SENSOR_SESSION)
    try:
        api_key = account_api_key(account)
        changed = {}
        for endpoint in endpoints:
            if over.is_set():
                break
            updated = count_records(
                endpoint, updated_after=watched[endpoint.name], updated_before=_dated_ahead_from(),
                base_url=account.base_url, api_key=api_key, session=session,
            )
            if updated:
                changed[endpoint.name] = updated
        return changed
    finally:
        session.close()


def _ask_accounts(asked: dict[Account, dict[str, int]]) -> dict[str, Union[dict[str, int], str]]:
    """Each account's changes, or why it could not be asked. The accounts are asked side by side
    (a slow API costs its own account time, not everyone's); those without an answer within
    `CHANGE_SENSOR_ACCOUNTS_DEADLINE_SECONDS` are left for the next evaluation, so the tick ends
    within Dagster's sensor timeout whatever the APIs do."""
    if not asked:
        return {}
    executor = ThreadPoolExecutor(
        max_workers=min(CHANGE_SENSOR_ACCOUNT_THREADS, len(asked)), thread_name_prefix="crm_change_sensor"
    )
    over = threading.Event()
    # the accounts asked longest ago first: one left out by the deadline is among the first next time
    oldest_first = sorted(asked.items(), key=lambda item: (min(item[1].values()), item[0].name))
    futures = {executor.submit(_account_changes, account, watched, over): account for account, watched in oldest_first}
    done, _ = wait(futures, timeout=CHANGE_SENSOR_ACCOUNTS_DEADLINE_SECONDS)
    # a request still under way finishes on its own (it has its timeout), nothing waits for it, and
    # no account asks anything more
    over.set()
    executor.shutdown(wait=False, cancel_futures=True)
    outcomes: dict[str, Union[dict[str, int], str]] = {}
    for future, account in futures.items():
        if future not in done:
            outcomes[account.name] = (
                f"no answer within {CHANGE_SENSOR_ACCOUNTS_DEADLINE_SECONDS}s; asked again next evaluation"
            )
            continue
        error = future.exception()
        if error is None:
            outcomes[account.name] = future.result()
        elif isinstance(error, CrmError):
            outcomes[account.name] = in_account_words(account, str(error))
        else:  # whatever it is, it is this account's alone: the others are still requested
            outcomes[account.name] = scrub(f"{type(error).__name__}: {error}")
    return outcomes


def _per_account(context: SensorEvaluationContext, accounts: Sequence[Account]) -> SensorResult:
    """One run per account whose resources changed; an account with a crm_sync still queued or
    running, or whose API cannot be asked, is skipped (with a log line naming it) and keeps its
    cursor; the others are requested all the same."""
    cursors = _load_account_cursors(context.cursor)
    busy = active_runs_by_account(context.instance, crm_sync.name)
    checked_until = int(_now()) - CHANGE_SENSOR_OVERLAP_SECONDS
    new_cursors: dict[str, dict[str, int]] = {}
    asked: dict[Account, dict[str, int]] = {}
    moved: dict[str, dict[str, int]] = {}
    started, waiting = [], []
    for account in accounts:
        previous = cursors.get(account.name, {})
        run = busy.get(account.name)
        if run is not None:  # its cursor stays: what changes meanwhile is found once that run is over
            if previous:
                new_cursors[account.name] = previous
            waiting.append(f"{account.name} (crm_sync run {run.run_id} {run.status.value.lower()})")
            continue
        names = [endpoint.name for endpoint in account.endpoints]
        moved[account.name] = {name: max(previous.get(name, checked_until), checked_until) for name in names}
        watched = {name: previous[name] for name in names if name in previous}
        if watched:
            asked[account] = watched
        else:
            new_cursors[account.name] = moved[account.name]
            started.append(account.name)

    requests, failed, quiet = [], [], 0
    for account, outcome in sorted(_ask_accounts(asked).items()):
        if isinstance(outcome, str):
            new_cursors[account] = cursors[account]
            failed.append(f"{account}: {outcome}")
            continue
        new_cursors[account] = moved[account]
        if not outcome:
            quiet += 1
            continue
        summary = ", ".join(f"{name} ({count} updated)" for name, count in outcome.items())
        context.log.info(f"Account {account} changed since the last evaluation: {summary}")
        requests.append(
            RunRequest(
                partition_key=account,
                asset_selection=[AssetKey([ASSET_KEY_PREFIX, name]) for name in outcome],
                tags={**account_run_tags(account), "crm_assets/changed": ",".join(outcome)},
            )
        )

    if waiting:
        context.log.info("Not asked, a crm_sync is still queued or running: " + ", ".join(waiting))
    for line in failed:
        context.log.warning(f"Could not ask the CRM API of account {line}")
    if started:
        context.log.info(f"Changes are watched from now on for: {', '.join(started)}")
    cursor = _dump_account_cursors(new_cursors)
    if requests:
        return SensorResult(run_requests=requests, cursor=cursor)
    reasons = [f"nothing changed since the last evaluation in {quiet} account(s)"] if quiet else []
    if started:
        reasons.append(f"first evaluation for {', '.join(started)} (earlier changes are the schedule's job)")
    if waiting:
        reasons.append(f"still syncing: {', '.join(waiting)}")
    if failed:
        reasons.append(f"could not ask {'; '.join(failed)}")
    reason = "; ".join(reasons)
    return SensorResult(skip_reason=SkipReason(reason[:1].upper() + reason[1:]), cursor=cursor)


def change_sensor(accounts: Sequence[Account] = ACCOUNTS) -> SensorDefinition:
    """crm_change_sensor, for `accounts` (none: the single account)."""

    @sensor(
        name="crm_change_sensor",
        job=crm_sync,
        minimum_interval_seconds=CHANGE_SENSOR_INTERVAL_SECONDS,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Asks the CRM API, with one size=0 request per resource, which resources have records "
            "updated since the last evaluation, and runs crm_sync for only those assets. Never "
            "requests a run while a crm_sync run is queued or in progress. Its first evaluation only "
            "starts the clock (the hourly schedule does the first load)."
            + (
                " Per account: each account's API is asked with its own key, and one run is requested "
                "per changed account; an account whose sync is under way, or whose API fails, is "
                "skipped (named in the tick's log) without holding back the others."
                if accounts else ""
            )
        ),
    )
    def crm_change_sensor(context: SensorEvaluationContext) -> Union[RunRequest, SkipReason, SensorResult]:
        if accounts:
            return _per_account(context, accounts)
        return _single_account(context)

    return crm_change_sensor


crm_change_sensor = change_sensor()


def _secrets() -> list[str]:
    """The API keys wherever they may be configured (every account's too), longest first."""
    keys = {os.environ.get("SOURCES__CRM__API_KEY"), os.environ.get("API_KEY")}
    try:
        keys.add(connection_settings()[1])
    except Exception:  # not configured: nothing more to hide
        pass
    try:
        accounts = configured_accounts()  # read now: the keys are never kept with the accounts
    except Exception:  # a bad entry: its key, if any, is not a valid account's to leak
        accounts = ()
    for account in accounts:
        try:
            keys.add(account_api_key(account))
        except Exception:
            pass
    return sorted((key for key in keys if key), key=len, reverse=True)


def scrub(text: str) -> str:
    """The text with the API key, and any bearer token, replaced by `[redacted]`."""
    for secret in _secrets():
        text = text.replace(secret, "[redacted]")
    return re.sub(r"(?i)(bearer\s+)[^\s\"']+", r"\1[redacted]", text)


def _error_text(context: RunFailureSensorContext) -> str:
    parts = []
    for event in context.get_step_failure_events():
        error = event.step_failure_data.error
        messages = []
        while error is not None:
            messages.append(_readable(error))
            error = error.cause
        parts.append(f"{event.step_key}: " + "\ncaused by: ".join(messages))
    if not parts:  # the run failed outside any step (e.g. its worker crashed)
        parts.append(context.failure_event.message or "no error message")
    text = "\n".join(parts)
    if len(text) > _MAX_ALERT_ERROR_CHARS:
        text = text[:_MAX_ALERT_ERROR_CHARS] + " [...]"
    return text


@run_failure_sensor(
    name="crm_sync_failure_sensor",
    monitored_jobs=[crm_sync],
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "When a crm_sync run fails: logs the error and, if the CRM_ALERT_WEBHOOK_URL environment "
        'variable is set, posts a Slack-style {"text": ...} message with the job, run id, account '
        "(with accounts configured) and error (API keys scrubbed) to that URL."
    ),
)
def crm_sync_failure_sensor(context: RunFailureSensorContext) -> None:
    run = context.dagster_run
    account = run.tags.get(PARTITION_TAG)
    text = scrub(
        f"Dagster job `{run.job_name}` failed"
        + (f" for account `{account}`" if account else "")
        + f" (run `{run.run_id}`):\n{_error_text(context)}"
    )
    context.log.error(text)
    url = os.environ.get(ALERT_WEBHOOK_ENV, "").strip()
    if not url:
        return
    # The webhook URL is a secret too (Slack puts its token in the path): never in a message.
    try:
        response = requests.post(url, json={"text": text}, timeout=_ALERT_TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        raise RuntimeError(f"Could not post the failure alert ({type(exc).__name__})") from None
    if response.status_code >= 300:
        raise RuntimeError(f"The alert webhook answered HTTP {response.status_code}")
    context.log.info(f"Failure alert for run {run.run_id} posted")


def failed_row_counts(instance: Any, run_id: str) -> list[AssetKey]:
    """The assets whose `row_count_matches_api` failed in the run, from its event log."""
    records = instance.get_records_for_run(
        run_id=run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    failed = []
    for record in records:
        event = record.event_log_entry.dagster_event
        evaluation = event.event_specific_data if event is not None else None
        if (
            isinstance(evaluation, AssetCheckEvaluation)
            and evaluation.check_name == ROW_COUNT_MATCHES_API
            and not evaluation.passed
            and evaluation.asset_key not in failed
        ):
            failed.append(evaluation.asset_key)
    return failed


@run_status_sensor(
    name="crm_audit_sensor",
    run_status=DagsterRunStatus.SUCCESS,
    monitored_jobs=[crm_sync, crm_checks],
    request_job=crm_audit,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "After a successful crm_sync or crm_checks run in which row_count_matches_api failed, "
        "runs crm_audit for those tables (their warehouse_matches_api checks). Skips while an audit "
        "is queued or running. With accounts, per account: the audit is of the run's account, and "
        "only that account's audit under way makes it wait."
    ),
)
def crm_audit_sensor(context: RunStatusSensorContext) -> Union[RunRequest, SkipReason]:
    run_id = context.dagster_run.run_id
    account = context.dagster_run.tags.get(PARTITION_TAG)
    of_account = f" (account {account})" if account else ""
    failed = failed_row_counts(context.instance, run_id)
    if not failed:
        return SkipReason(f"Every row_count_matches_api of run {run_id}{of_account} passed")
    if account:
        under_way = active_runs_by_account(context.instance, crm_audit.name).get(account)
        active = [under_way] if under_way is not None else []
    else:
        active = active_runs(context.instance, crm_audit.name)
    if active:
        return SkipReason(
            f"crm_audit run {active[0].run_id}{of_account} is {active[0].status.value.lower()}; "
            "not requesting another"
        )
    tables = ", ".join(key.to_user_string() for key in failed)
    context.log.info(
        f"row_count_matches_api failed in run {run_id}{of_account} for {tables}: requesting crm_audit"
    )
    return RunRequest(
        run_key=f"crm_audit_after_{run_id}",
        asset_check_keys=[AssetCheckKey(key, WAREHOUSE_MATCHES_API) for key in failed],
        tags={"crm_assets/audit_after_run": run_id, **(account_run_tags(account) if account else {})},
    )
