"""Breaking things on purpose: crashes, corrupt answers, concurrent runs, exhausted retries, secrets."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dagster import Backoff, DagsterInstance, RetryPolicy, define_asset_job, materialize

from crm_assets.assets import crm_sync_assets
from crm_assets.resources import RESOURCES as DAGSTER_RESOURCES

from .conftest import (
    API_KEY,
    RESOURCES,
    all_event_text,
    assert_exact,
    failure_message,
    run_sync,
    table_state,
)

REPO = Path(__file__).resolve().parent.parent
DAGSTER = str(Path(sys.executable).parent / "dagster")


@pytest.mark.parametrize("kill_point", ["extract", "normalize", "load"])
def test_a_run_killed_at_any_point_leaves_the_warehouse_consistent_and_the_next_run_exact(
    start_simulator, crm_env, warehouse, kill_point
):
    simulator = start_simulator(page_cap=60)
    crm_env(simulator)
    assert run_sync().success
    simulator.mutate("jobs", edit=6, insert=3, deactivate=2)
    simulator.mutate("tasks", edit=4, insert=2)

    killed = subprocess.run(
        [sys.executable, "-m", "crm_assets_tests._crash_child", kill_point],
        cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    # whatever the killed run left behind, the tables are readable and hold each id once
    for name in RESOURCES:
        ids = list(table_state(warehouse, name))
        assert len(ids) == len(set(ids))

    simulator.mutate("jobs", edit=2)
    assert run_sync().success
    # the killed run's changes were not skipped: its cursor never advanced past unloaded data
    assert_exact(warehouse, simulator)


@pytest.mark.parametrize(
    "corruption, says",
    [("html", "not JSON"), ("truncated", "not JSON"), ("no_key", "without a 'results' list")],
)
def test_a_corrupt_answer_fails_the_run_by_name_leaves_its_table_untouched_and_the_others_land(
    start_simulator, crm_env, warehouse, corruption, says
):
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync().success
    before = table_state(warehouse, "contacts")
    simulator.mutate("contacts", edit=3)
    simulator.mutate("jobs", edit=3)

    simulator.configure(corrupt={"contacts": corruption})
    result = run_sync(raise_on_error=False)

    assert not result.success
    message = failure_message(result)
    assert "contacts" in message and "/v1/contacts" in message and says in message, message
    assert table_state(warehouse, "contacts") == before
    assert_exact(warehouse, simulator, resources=[name for name in RESOURCES if name != "contacts"])


def _cli_env(simulator, warehouse: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "DESTINATION__"))},
        "SOURCES__CRM__BASE_URL": simulator.url,
        "SOURCES__CRM__API_KEY": API_KEY,
        "DESTINATION__DUCKDB__CREDENTIALS": str(warehouse),
    }


MATERIALIZE_ALL = [DAGSTER, "asset", "materialize", "-m", "crm_assets.definitions", "--select", "*"]


def test_two_syncs_started_at_once_both_succeed_and_the_result_is_exact(
    start_simulator, warehouse, tmp_path
):
    simulator = start_simulator(page_cap=50, latency_ms=5)
    runs = [
        subprocess.Popen(MATERIALIZE_ALL, cwd=tmp_path, env=_cli_env(simulator, warehouse),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]

    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert_exact(warehouse, simulator)


def test_a_sync_waits_for_the_run_holding_the_pipeline_and_says_so(
    start_simulator, warehouse, tmp_path
):
    from crm_assets.sources.run_lock import exclusive_run

    simulator = start_simulator()
    with exclusive_run():  # "another run" holds the pipeline
        waiting = subprocess.Popen(MATERIALIZE_ALL, cwd=tmp_path, env=_cli_env(simulator, warehouse),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in waiting.stdout:
            seen.append(line)
            if "waiting for it to finish" in line:
                break
        assert sum(simulator.stats()["requests"].values()) == 0  # nothing read while waiting
    output = "".join(seen) + waiting.communicate(timeout=300)[0]

    assert waiting.returncode == 0, output[-3000:]
    assert "The other run finished" in output
    assert_exact(warehouse, simulator)


def test_retries_exhausted_fail_the_attempt_by_name_and_dagsters_retry_recovers(
    start_simulator, crm_env, warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    simulator.configure(fail_resources={"activities": 503})

    def bring_the_api_back() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if simulator.stats()["statuses"].get("activities", {}).get("503", 0) >= 4:
                simulator.configure(fail_resources={})
                return
            time.sleep(0.05)

    healer = threading.Thread(target=bring_the_api_back, daemon=True)
    healer.start()
    job = define_asset_job(
        "crm_sync_with_quick_retries",
        op_retry_policy=RetryPolicy(max_retries=2, delay=0.2, backoff=Backoff.EXPONENTIAL),
    )
    from dagster import Definitions

    defs = Definitions(assets=[crm_sync_assets], jobs=[job], resources=DAGSTER_RESOURCES)
    result = defs.resolve_job_def("crm_sync_with_quick_retries").execute_in_process(
        raise_on_error=False
    )
    healer.join(timeout=5)

    assert result.success
    retried = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retried) == 1
    first_failure = str(retried[0].event_specific_data.error)
    assert "activities" in first_failure and "503" in first_failure and "3 retries" in first_failure
    assert_exact(warehouse, simulator)


def test_the_api_key_appears_nowhere(start_simulator, crm_env, warehouse, tmp_path, capfd, caplog):
    secret = "SECRET-crm-key-5e1f9a7c"
    simulator = start_simulator(page_cap=80, api_key=secret)
    other = start_simulator(api_key="some-other-key")
    instance_dir = tmp_path / "dagster_home"
    instance_dir.mkdir()
    results = []
    with DagsterInstance.local_temp(str(instance_dir)) as instance:

        def sync():
            result = materialize([crm_sync_assets], resources=DAGSTER_RESOURCES,
                                 instance=instance, raise_on_error=False)
            results.append(result)
            return result

        def checks():
            from crm_assets.definitions import defs

            result = defs.resolve_job_def("crm_checks").execute_in_process(
                instance=instance, raise_on_error=False
            )
            results.append(result)
            return result

        crm_env(simulator, api_key=secret)
        assert sync().success  # a full sync
        assert checks().success  # the checks, asking the API for its counts with the key
        simulator.mutate("jobs", edit=2)
        simulator.configure(fail_resources={"files": 503})
        assert not sync().success  # a failing sync, after retries
        crm_env(other, api_key=secret)
        assert not sync().success  # a rejected key
        assert "401" in failure_message(results[-1])
        checks()  # the completeness check's API call is rejected too: a WARN, without the key
        warned = [e for e in results[-1].all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
                  and not e.event_specific_data.passed]
        assert warned and all("401" in str(e.event_specific_data.description) for e in warned)

    captured = capfd.readouterr()
    texts = [all_event_text(result) for result in results] + [captured.out, captured.err, caplog.text]
    for text in texts:
        assert secret not in text
    scanned = 0
    for root in (instance_dir, Path(os.environ["DLT_DATA_DIR"]), warehouse.parent):
        for path in root.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
                scanned += 1
    assert scanned > 3 and warehouse.exists()


def test_secrets_toml_is_ignored_by_git_and_only_an_example_is_committed():
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".dlt/secrets.toml"], cwd=REPO, capture_output=True
    )
    assert ignored.returncode == 0
    assert (REPO / ".dlt" / "example.secrets.toml").is_file()
