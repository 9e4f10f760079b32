"""The code location as Dagster loads it, with no configuration and no API reachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dagster import AssetKey

from .conftest import RESOURCES, all_event_text, assert_exact, failure_message, run_sync, table_ids

REPO = Path(__file__).resolve().parent.parent
DAGSTER = str(Path(sys.executable).parent / "dagster")
EXPECTED_KEYS = {AssetKey(["crm", name]) for name in RESOURCES}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "DESTINATION__"))}
    env.pop("API_KEY", None)
    env.pop("DAGSTER_HOME", None)
    env.update(extra)
    return env


def test_five_assets_in_group_crm_with_no_phantom_upstream_assets():
    from crm_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    assert set(graph.get_all_asset_keys()) == EXPECTED_KEYS
    for key in EXPECTED_KEYS:
        node = graph.get(key)
        assert node.parent_keys == set()
        assert node.group_name == "crm"
        spec_description = defs.resolve_assets_def(key).specs_by_key[key].description
        assert spec_description and f"/v1/{key.path[-1]}" in spec_description


def test_the_sync_job_selects_the_crm_group():
    from crm_assets.definitions import defs

    job = defs.resolve_job_def("crm_sync")
    assert set(job.asset_layer.selected_asset_keys) == EXPECTED_KEYS


def test_dagster_definitions_validate_passes_with_no_environment(tmp_path):
    completed = subprocess.run(
        [DAGSTER, "definitions", "validate", "-m", "crm_assets.definitions"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


DG = str(Path(sys.executable).parent / "dg")


def test_dg_lists_and_checks_the_definitions_with_no_environment(tmp_path):
    env = _clean_env(DLT_DATA_DIR=str(tmp_path / "dlt"))
    listed = subprocess.run([DG, "list", "defs", "--json"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=180)
    assert listed.returncode == 0, listed.stderr[-3000:]
    defs = json.loads(listed.stdout[listed.stdout.index("{"):])
    assert {a["asset_key"] for a in defs["assets"]} == {key.to_user_string() for key in EXPECTED_KEYS}
    assert {c["name"] for c in defs["asset_checks"]} == {
        "id_is_unique", "id_is_not_null", "row_count_matches_api", "warehouse_matches_api"
    }
    assert {j["name"] for j in defs["jobs"]} >= {"crm_sync", "crm_checks", "crm_audit"}
    assert {s["name"] for s in defs["schedules"]} == {"crm_sync_schedule", "crm_audit_schedule"}
    assert {s["name"] for s in defs["sensors"]} == {"crm_change_sensor", "crm_sync_failure_sensor", "crm_audit_sensor"}

    checked = subprocess.run([DG, "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=180)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]


def test_dg_launch_materializes_every_asset_exactly(start_simulator, tmp_path):
    simulator = start_simulator(page_cap=90)
    warehouse = tmp_path / "dg_warehouse.duckdb"
    env = _clean_env(
        SOURCES__CRM__BASE_URL=simulator.url,
        SOURCES__CRM__API_KEY=simulator.config.api_key,
        DESTINATION__DUCKDB__CREDENTIALS=str(warehouse),
        DLT_DATA_DIR=str(tmp_path / "dlt"),
        DAGSTER_HOME=str(tmp_path / "dagster_home"),
    )
    (tmp_path / "dagster_home").mkdir()

    launched = subprocess.run([DG, "launch", "--assets", "*"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert_exact(warehouse, simulator)

    # the README's full refresh of one asset
    simulator.mutate("jobs", edit=3, insert=2)
    refresh = '{"ops": {"crm_sync_assets": {"config": {"full_refresh": true}}}}'
    refreshed = subprocess.run([DG, "launch", "--assets", "crm/jobs", "--config-json", refresh], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=300)
    assert refreshed.returncode == 0, refreshed.stdout[-3000:] + refreshed.stderr[-3000:]
    assert_exact(warehouse, simulator, resources=["jobs"])


def test_the_cli_materializes_everything_from_another_directory_and_each_keeps_its_own_warehouse(
    start_simulator, tmp_path, monkeypatch, capfd
):
    """The README's command with only the API settings, from a directory that is not the
    repository: with no DuckDB path configured, each directory's sync writes its own
    crm_warehouse.duckdb there, from its own state, although dlt's data folder (and so its
    pipelines) is shared by the machine. (One test, as the first directory's sync is the README's
    command: two tests ran that CLI process twice. The second directory's sync runs in this
    process, as a code location loaded from there runs it: the first one proves the CLI, and a CLI
    process costs 4-5 s of CPU.)"""
    simulator = start_simulator(page_cap=90)
    env = _clean_env(
        SOURCES__CRM__BASE_URL=simulator.url,
        SOURCES__CRM__API_KEY=simulator.config.api_key,
        DLT_DATA_DIR=str(tmp_path / "machine-dlt"),
    )
    first, second = tmp_path / "somewhere" / "else", tmp_path / "second"
    for directory in (first, second):
        directory.mkdir(parents=True)

    completed = subprocess.run(
        [DAGSTER, "asset", "materialize", "-m", "crm_assets.definitions", "--select", "*"],
        cwd=first, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert simulator.config.api_key not in completed.stdout + completed.stderr
    assert_exact(first / "crm_warehouse.duckdb", simulator)
    before = {r: set(simulator.ids(r)) for r in RESOURCES}
    inserted = simulator.mutate("jobs", insert=3)["inserted"]
    simulator.reset_stats()

    for name in ("DESTINATION__DUCKDB__CREDENTIALS", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("SOURCES__CRM__BASE_URL", "SOURCES__CRM__API_KEY", "DLT_DATA_DIR"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.chdir(second)
    capfd.readouterr()
    result = run_sync(raise_on_error=False)
    assert result.success, failure_message(result)
    said = capfd.readouterr()
    assert simulator.config.api_key not in said.out + said.err + all_event_text(result)

    assert_exact(second / "crm_warehouse.duckdb", simulator)  # a full load of its own
    assert simulator.stats()["records_served"]["jobs"] >= len(before["jobs"]) + 3
    first_jobs = table_ids(first / "crm_warehouse.duckdb", "jobs")
    assert set(first_jobs) == before["jobs"] and not set(inserted) & set(first_jobs)
