"""The checks on the crm.* tables: real simulator, real DuckDB, jobs run through Dagster in-process."""

from __future__ import annotations

import shutil

import duckdb
import pytest
from dagster import AssetCheckSeverity, DagsterInstance

from crm_assets.checks import ID_IS_NOT_NULL, ID_IS_UNIQUE, ROW_COUNT_MATCHES_API
from crm_assets.definitions import defs
from crm_assets.simulator import CrmSimulator, SimulatorConfig
from crm_assets.sources.crm import count_every_record, count_records
from crm_assets.warehouse import DatabaseUndefinedRelation, query

from .conftest import API_KEY, RESOURCES, SMALL_COUNTS, failure_message, isolate_dlt

ALL_CHECKS = {
    f"crm/{resource}:{check}"
    for resource in RESOURCES
    for check in (ID_IS_UNIQUE, ID_IS_NOT_NULL, ROW_COUNT_MATCHES_API)
}


def run_job(name: str, instance: DagsterInstance, **kwargs):
    return defs.resolve_job_def(name).execute_in_process(
        instance=instance, raise_on_error=False, **kwargs
    )


def evaluations(result) -> dict:
    return {e.asset_check_key.to_user_string(): e for e in result.get_asset_check_evaluations()}


def meta(evaluation) -> dict:
    return {key: value.value for key, value in evaluation.metadata.items()}


def plant(warehouse, *statements: str) -> None:
    with duckdb.connect(str(warehouse)) as connection:
        for statement in statements:
            connection.execute(statement)


@pytest.fixture(scope="module")
def _clean_load(tmp_path_factory):
    """One clean load of all five resources through `crm_sync` for the module (each took ~2 s of
    CPU): its simulator, its warehouse file and its result."""
    root = tmp_path_factory.mktemp("clean_load")
    simulator = CrmSimulator(SimulatorConfig(api_key=API_KEY, counts=dict(SMALL_COUNTS))).start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            isolate_dlt(root, patch)
            patch.setenv("SOURCES__CRM__BASE_URL", simulator.url)
            patch.setenv("SOURCES__CRM__API_KEY", API_KEY)
            patch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(root / "warehouse.duckdb"))
            result = run_job("crm_sync", DagsterInstance.ephemeral())
        assert result.success, failure_message(result)
        yield simulator, root / "warehouse.duckdb", result
    finally:
        simulator.stop()


@pytest.fixture
def loaded(_clean_load, crm_env, warehouse):
    """That clean load as the test's own: a copy of the warehouse (tests plant rows in it), the
    simulator back at its seed (tests change it), dlt's state read back from the warehouse (the
    test's dlt folder is empty), and an instance the test keeps."""
    simulator, clean, result = _clean_load
    simulator.reset()
    for suffix in ("", ".wal"):  # DuckDB's write-ahead log, if the load left one
        if clean.with_name(clean.name + suffix).exists():
            shutil.copy(clean.with_name(clean.name + suffix), warehouse.with_name(warehouse.name + suffix))
    crm_env(simulator)
    return simulator, DagsterInstance.ephemeral(), result


def test_crm_sync_runs_every_check_after_the_load_and_all_pass(loaded):
    _, _, result = loaded

    checks = evaluations(result)
    assert set(checks) == ALL_CHECKS
    assert all(evaluation.passed for evaluation in checks.values())
    for resource in RESOURCES:
        assert meta(checks[f"crm/{resource}:{ID_IS_UNIQUE}"])["duplicate_ids"] == 0
        assert meta(checks[f"crm/{resource}:{ID_IS_NOT_NULL}"])["null_id_rows"] == 0
        completeness = meta(checks[f"crm/{resource}:{ROW_COUNT_MATCHES_API}"])
        assert completeness == {
            "table_rows": SMALL_COUNTS[resource],
            "api_count": SMALL_COUNTS[resource],
            "difference": 0,
        }
    # the checks ran after the merge: every evaluation follows the last materialization
    kinds = [event.event_type_value for event in result.all_events]
    assert kinds.index("ASSET_CHECK_EVALUATION") > max(
        i for i, kind in enumerate(kinds) if kind == "ASSET_MATERIALIZATION"
    )


def test_crm_checks_runs_only_the_checks_and_passes_on_a_clean_load(loaded):
    simulator, instance, _ = loaded
    records_before = sum(simulator.stats()["records_served"].values())

    result = run_job("crm_checks", instance)

    assert result.success
    assert result.get_asset_materialization_events() == []
    checks = evaluations(result)
    assert set(checks) == ALL_CHECKS and all(e.passed for e in checks.values())
    # completeness asked only for counts (size=0), it read no records
    assert sum(simulator.stats()["records_served"].values()) == records_before


@pytest.mark.parametrize("resource", RESOURCES)
def test_a_planted_duplicate_id_fails_crm_checks(loaded, warehouse, resource):
    _, instance, _ = loaded
    (duplicated,) = query("SELECT MIN(id) FROM {table}", resource)[0]
    plant(warehouse, f"INSERT INTO crm.{resource} SELECT * FROM crm.{resource} WHERE id = '{duplicated}'")

    result = run_job("crm_checks", instance)

    assert not result.success
    assert f"crm/{resource}: {ID_IS_UNIQUE}" in failure_message(result)
    checks = evaluations(result)
    failed = checks[f"crm/{resource}:{ID_IS_UNIQUE}"]
    assert not failed.passed
    assert failed.severity == AssetCheckSeverity.ERROR and failed.blocking
    assert meta(failed) == {"duplicate_ids": 1, "extra_rows": 1, "duplicate_id_sample": [duplicated]}
    # only the planted table fails its key checks
    assert {key for key, e in checks.items() if not e.passed and e.severity == AssetCheckSeverity.ERROR} == {
        f"crm/{resource}:{ID_IS_UNIQUE}"
    }


def test_the_duplicate_sample_is_capped_at_ten_ids(loaded, warehouse):
    _, instance, _ = loaded
    plant(warehouse, "INSERT INTO crm.files SELECT * FROM crm.files WHERE id IN "
                     "(SELECT id FROM crm.files ORDER BY id LIMIT 25)")

    failed = evaluations(run_job("crm_checks", instance))[f"crm/files:{ID_IS_UNIQUE}"]

    assert meta(failed)["duplicate_ids"] == 25 and meta(failed)["extra_rows"] == 25
    assert len(meta(failed)["duplicate_id_sample"]) == 10


def test_a_planted_null_id_fails_id_is_not_null(loaded, warehouse):
    _, instance, _ = loaded
    # dlt creates `id` NOT NULL on DuckDB; other destinations may not enforce it
    plant(
        warehouse,
        "ALTER TABLE crm.contacts ALTER COLUMN id DROP NOT NULL",
        "INSERT INTO crm.contacts SELECT * REPLACE (NULL AS id) FROM crm.contacts "
        "WHERE id = (SELECT MIN(id) FROM crm.contacts)",
    )

    result = run_job("crm_checks", instance)

    assert not result.success
    assert f"crm/contacts: {ID_IS_NOT_NULL}" in failure_message(result)
    checks = evaluations(result)
    assert not checks[f"crm/contacts:{ID_IS_NOT_NULL}"].passed
    assert meta(checks[f"crm/contacts:{ID_IS_NOT_NULL}"])["null_id_rows"] == 1
    assert checks[f"crm/contacts:{ID_IS_UNIQUE}"].passed  # NULL is not a duplicate id


def test_completeness_warns_with_the_difference_and_the_next_sync_closes_it(loaded):
    simulator, instance, _ = loaded
    simulator.mutate("tasks", insert=3)

    result = run_job("crm_checks", instance)

    assert result.success  # a warning does not fail the run
    completeness = evaluations(result)[f"crm/tasks:{ROW_COUNT_MATCHES_API}"]
    assert not completeness.passed and completeness.severity == AssetCheckSeverity.WARN
    assert meta(completeness) == {
        "table_rows": SMALL_COUNTS["tasks"],
        "api_count": SMALL_COUNTS["tasks"] + 3,
        "difference": -3,
    }
    assert evaluations(result)[f"crm/jobs:{ROW_COUNT_MATCHES_API}"].passed

    resync = run_job("crm_sync", instance)

    assert resync.success
    assert meta(evaluations(resync)[f"crm/tasks:{ROW_COUNT_MATCHES_API}"])["difference"] == 0


def test_an_api_error_turns_completeness_into_a_warning_not_a_crash(loaded):
    simulator, instance, _ = loaded
    simulator.configure(forbidden=["files"])

    result = run_job("crm_checks", instance)

    assert result.success
    completeness = evaluations(result)[f"crm/files:{ROW_COUNT_MATCHES_API}"]
    assert not completeness.passed and completeness.severity == AssetCheckSeverity.WARN
    assert "403" in completeness.description and "/v1/files" in completeness.description
    assert simulator.config.api_key not in completeness.description


def test_checks_before_any_load_fail_saying_the_table_is_missing(start_simulator, crm_env, warehouse):
    crm_env(start_simulator())

    result = run_job("crm_checks", DagsterInstance.ephemeral())

    assert not result.success
    checks = evaluations(result)
    assert set(checks) == ALL_CHECKS and not any(e.passed for e in checks.values())
    assert "does not exist" in checks[f"crm/jobs:{ID_IS_UNIQUE}"].description
    with pytest.raises(DatabaseUndefinedRelation):
        query("SELECT COUNT(*) FROM {table}", "jobs")


def test_the_api_count_the_row_count_check_uses_is_exact_past_the_result_window(start_simulator):
    """An API that stops counting at its result window (as search backends do) reports 10,000 for
    12,345 jobs: `row_count_matches_api` would warn on every sync of a large resource, and the
    audit sensor would audit it every time. The check's count sums `date_created` ranges instead."""
    simulator = start_simulator({**SMALL_COUNTS, "jobs": 12_345}, count_capped=True)
    connection = {"base_url": simulator.url, "api_key": API_KEY}

    assert count_records("jobs", **connection) == 10_000
    assert count_every_record("jobs", **connection) == 12_345
    assert count_every_record("tasks", **connection) == SMALL_COUNTS["tasks"]  # one request below it
    assert simulator.stats()["count_requests"]["tasks"] == 1
