"""The dlt pipeline on its own (no Dagster): what `crm_pipeline()` does around dlt's steps."""

from __future__ import annotations

import gc

import pytest
from dlt.pipeline.exceptions import PipelineStepFailed

from crm_assets.sources.crm import crm
from crm_assets.sources.crm_pipeline import STEP_GC_THRESHOLDS, crm_pipeline, run_options

from .conftest import assert_exact


def _jobs_recording_gc_thresholds(seen: list[tuple[int, ...]]):
    source = crm().with_resources("jobs")

    def record(item):
        seen.append(gc.get_threshold())
        return item

    source.resources["jobs"].add_map(record)
    return source


def test_each_step_collects_garbage_less_often_and_the_thresholds_come_back(
    start_simulator, crm_env, warehouse
):
    simulator = start_simulator()
    crm_env(simulator)
    before = gc.get_threshold()
    assert before != STEP_GC_THRESHOLDS
    seen: list[tuple[int, ...]] = []

    pipeline = crm_pipeline()
    pipeline.run(_jobs_recording_gc_thresholds(seen), **run_options(pipeline))

    assert seen and set(seen) == {STEP_GC_THRESHOLDS}  # every record extracted under them
    assert gc.get_threshold() == before
    assert_exact(warehouse, simulator, resources=["jobs"])


def test_a_failing_step_gives_the_gc_thresholds_back(start_simulator, crm_env):
    simulator = start_simulator()
    crm_env(simulator, api_key="not-the-key")
    before = gc.get_threshold()

    pipeline = crm_pipeline()
    with pytest.raises(PipelineStepFailed, match="401"):
        pipeline.run(_jobs_recording_gc_thresholds([]), **run_options(pipeline))

    assert gc.get_threshold() == before


def test_overlapping_steps_of_two_pipelines_restore_the_thresholds_once_both_end(tmp_path):
    before = gc.get_threshold()
    first = crm_pipeline(pipelines_dir=str(tmp_path / "a")).collector
    second = crm_pipeline(pipelines_dir=str(tmp_path / "b")).collector

    first("Extract crm").__enter__()
    second("Normalize crm").__enter__()
    first.__exit__(None, None, None)  # the first pipeline's step ends while the second's runs
    assert gc.get_threshold() == STEP_GC_THRESHOLDS
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before
