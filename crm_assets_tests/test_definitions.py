"""The code location as Dagster loads it, with no configuration and no API reachable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dagster import AssetKey

from .conftest import RESOURCES, assert_exact

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


def test_the_cli_materializes_everything_from_another_directory(start_simulator, tmp_path):
    """The README's command with only the API settings: the warehouse is the default DuckDB file."""
    simulator = start_simulator(page_cap=90)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    env = _clean_env(
        SOURCES__CRM__BASE_URL=simulator.url,
        SOURCES__CRM__API_KEY=simulator.config.api_key,
        DLT_DATA_DIR=str(tmp_path / "cli-dlt"),
    )

    completed = subprocess.run(
        [DAGSTER, "asset", "materialize", "-m", "crm_assets.definitions", "--select", "*"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert_exact(elsewhere / "crm_warehouse.duckdb", simulator)
    assert simulator.config.api_key not in completed.stdout + completed.stderr
