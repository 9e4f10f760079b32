"""The dlt pipeline on its own (no Dagster), and what a sync's tuning does around it."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
from dlt.pipeline.exceptions import PipelineStepFailed

from crm_assets.sources.crm import crm
from crm_assets.sources.crm_pipeline import crm_pipeline
from crm_assets.sources.destination import run_options
from crm_assets.sources.tuning import STEP_GC_THRESHOLDS, sync_tuning

from .conftest import SMALL_COUNTS, assert_exact


def _jobs_recording_gc_thresholds(seen: list[tuple[int, ...]]):
    source = crm().with_resources("jobs")

    def record(item):
        seen.append(gc.get_threshold())
        return item

    source.resources["jobs"].add_map(record)
    return source


def test_a_sync_collects_garbage_less_often_and_the_thresholds_come_back(
    start_simulator, crm_env, warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    before = gc.get_threshold()
    assert before != STEP_GC_THRESHOLDS
    seen: list[tuple[int, ...]] = []

    pipeline = crm_pipeline()
    with sync_tuning():
        pipeline.run(_jobs_recording_gc_thresholds(seen), **run_options(pipeline))

    assert seen and set(seen) == {STEP_GC_THRESHOLDS}  # every record extracted under them
    assert gc.get_threshold() == before
    assert_exact(warehouse, simulator, resources=["jobs"])


def test_a_failing_sync_gives_the_gc_thresholds_back(start_simulator, crm_env):
    simulator = start_simulator()
    crm_env(simulator, api_key="not-the-key")
    before = gc.get_threshold()

    pipeline = crm_pipeline()
    with pytest.raises(PipelineStepFailed, match="401"), sync_tuning():
        pipeline.run(_jobs_recording_gc_thresholds([]), **run_options(pipeline))

    assert gc.get_threshold() == before


def test_a_pipeline_run_outside_a_sync_leaves_the_thresholds_alone(start_simulator, crm_env):
    simulator = start_simulator()
    crm_env(simulator)
    seen: list[tuple[int, ...]] = []
    pipeline = crm_pipeline()
    pipeline.run(_jobs_recording_gc_thresholds(seen), **run_options(pipeline))
    assert set(seen) == {gc.get_threshold()} != {STEP_GC_THRESHOLDS}


def test_overlapping_syncs_restore_the_thresholds_once_both_end():
    before = gc.get_threshold()
    first, second = sync_tuning(), sync_tuning()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first sync ends while the second runs
    assert gc.get_threshold() == STEP_GC_THRESHOLDS
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before


def test_the_readme_command_syncs_without_dagster(start_simulator, crm_env, warehouse):
    simulator = start_simulator()
    crm_env(simulator)
    completed = subprocess.run([sys.executable, "-m", "crm_assets.sources"], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"crm.jobs: {SMALL_COUNTS['jobs']} rows" in completed.stdout
    assert f"database: {warehouse}" in completed.stdout
    assert_exact(warehouse, simulator)


def test_a_runs_destination_takes_its_settings_once_as_dlt_resolves_them(monkeypatch):
    """`settled` gives the run's pipeline the values dlt resolves, including those under the
    pipeline's own section; what the pipeline binds, and credentials that do not resolve, stay
    dlt's to resolve and report."""
    from dlt.common.configuration.exceptions import ConfigFieldMissingException

    monkeypatch.setenv("CRM_DESTINATION", "postgres")
    monkeypatch.setenv("DESTINATION__POSTGRES__STAGING_DATASET_NAME_LAYOUT", "%s_scratch")
    monkeypatch.setenv("CRM_WAREHOUSE__DESTINATION__POSTGRES__CREDENTIALS", "postgresql://u:p@db.internal:5433/w")
    pipeline = crm_pipeline()
    params = pipeline.destination.config_params
    assert params["staging_dataset_name_layout"] == "%s_scratch"
    assert params["credentials"].host == "db.internal" and params["credentials"].port == 5433
    assert not {"dataset_name", "default_schema_name"} & set(params)
    client_config = pipeline.destination.configuration(
        pipeline.destination.spec(credentials=None), accept_partial=True
    )
    assert client_config.staging_dataset_name_layout == "%s_scratch"

    monkeypatch.delenv("CRM_WAREHOUSE__DESTINATION__POSTGRES__CREDENTIALS")
    unresolved = crm_pipeline()
    assert "credentials" not in unresolved.destination.config_params
    with pytest.raises(ConfigFieldMissingException, match="credentials"):
        unresolved.destination.configuration(unresolved.destination.spec())
    # the definitions' pipeline resolves nothing ahead
    assert crm_pipeline(for_run=False).destination.config_params == {}


def test_a_destination_setting_dlt_cannot_parse_fails_the_run_as_dlt_reports_it(monkeypatch):
    from dlt.common.configuration.exceptions import InvalidNativeValue

    monkeypatch.setenv("CRM_DESTINATION", "postgres")
    monkeypatch.setenv("DESTINATION__POSTGRES__CREDENTIALS", "not a connection string")
    pipeline = crm_pipeline()  # creating the pipeline does not fail on it
    with pytest.raises(InvalidNativeValue, match="PostgresCredentials"):
        pipeline.destination.configuration(pipeline.destination.spec())
