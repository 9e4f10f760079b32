"""Shared fixtures: a real simulator on a free loopback port and a throwaway DuckDB warehouse."""

from __future__ import annotations

import functools
import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from crm_assets.simulator import CrmSimulator, SimulatorConfig

API_KEY = "test-key-3f9a1c"
# Small datasets keep the suite fast; tests that need the 10,000-record window ask for more.
SMALL_COUNTS = {"jobs": 240, "contacts": 310, "tasks": 180, "activities": 205, "files": 95}
TEST_GC_THRESHOLDS = (10_000, 20, 100)


def pytest_configure(config: pytest.Config) -> None:
    """Nothing the suite runs writes under the user's home directory: a throwaway HOME for the
    session (and every process it starts). Dagster writes telemetry events and ids to ~/.dagster/
    whenever an instance (or dg) has telemetry on, and DAGSTER_DISABLE_TELEMETRY only stops the
    upload; Chromium writes its profile and crash reports under ~/.config and ~/.cache. git keeps
    the user's own settings. pytest-xdist's workers inherit the controller's."""
    if os.environ.get("CRM_TEST_HOME"):
        return
    real = Path.home()
    home = tempfile.mkdtemp(prefix="crm-test-home-")
    if (real / ".gitconfig").exists():
        os.environ.setdefault("GIT_CONFIG_GLOBAL", str(real / ".gitconfig"))
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "DG_CLI_CONFIG"):
        os.environ.pop(name, None)
    os.environ["HOME"] = os.environ["CRM_TEST_HOME"] = home
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))


# Under pytest-xdist `make test` hands out whole modules (--dist loadscope): a module's tests run on
# one worker, so its module-scoped fixtures (a webserver and daemon, a large simulator) are set up
# once. (--dist loadgroup with xdist_group marks no longer groups anything under pytest 9.2, whose
# node ids xdist 3.8 cannot suffix: pytest-xdist issue #1386.) A worker takes the next module in
# collection order when it is nearly done (--no-loadscope-reorder keeps this order): the longest
# modules come first, as measured (benchmarks/README.md), so that none of them starts last and
# keeps one worker busy while the other has nothing left. Modules not named keep their order.
LONGEST_MODULES_FIRST = (
    "test_reliability.py", "test_scripts.py", "test_incremental.py", "test_celery.py", "test_adversary.py",
    "test_isolation.py", "test_audit.py", "test_arrow_pages.py", "test_sync.py", "test_definitions.py",
    "test_webserver.py", "test_real_api_shape.py", "test_dishonest_api.py", "test_accounts.py",
    "test_readme_commands.py", "test_orchestration.py", "test_json_lists.py", "test_busy_warehouse.py",
    "test_import_effects.py", "test_account_orchestration.py", "test_checks.py",
)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The suite's processes keep Dagster, dlt and the project loaded: Python's default thresholds
    (700, 10, 10) collect garbage often, walking all of them; the tests around the syncs collect
    about a fifth as often (CPU in the collector: benchmarks/README.md). Not a sync's own
    thresholds (sources/tuning.py): test_pipeline.py must see a sync set them and put them back."""
    gc.set_threshold(*TEST_GC_THRESHOLDS)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker: the order stays as collected
        return
    rank = {name: index for index, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order stays


def isolate_dlt(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own dlt state folder under `folder` (also the working directory), and no stray
    configuration from the machine: what every test gets, and a module-scoped fixture's setup."""
    for name in ("SOURCES__CRM__BASE_URL", "SOURCES__CRM__API_KEY", "API_KEY",
                 "DESTINATION__DUCKDB__CREDENTIALS", "SOURCES__CRM__PAGE_SIZES", "CRM_DESTINATION",
                 "DESTINATION__POSTGRES__CREDENTIALS", "CRM_ALERT_WEBHOOK_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DLT_DATA_DIR", str(folder / "dlt"))
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.setenv("DAGSTER_DISABLE_TELEMETRY", "true")
    # the retry policy's shape is the spec's (3 retries, exponential); tests need not wait seconds
    monkeypatch.setenv("SOURCES__CRM__BACKOFF_FACTOR", "0.01")
    monkeypatch.chdir(folder)


@pytest.fixture(autouse=True)
def _isolated_dlt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_dlt(tmp_path, monkeypatch)


@pytest.fixture
def start_simulator() -> Iterator[Callable[..., CrmSimulator]]:
    started: list[CrmSimulator] = []

    def start(counts: Optional[dict[str, int]] = None, **config: Any) -> CrmSimulator:
        simulator = CrmSimulator(
            SimulatorConfig(
                api_key=config.pop("api_key", API_KEY), counts=dict(counts or SMALL_COUNTS), **config
            )
        ).start()
        started.append(simulator)
        return simulator

    yield start
    for simulator in started:
        simulator.stop()


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    return tmp_path / "warehouse.duckdb"


@pytest.fixture
def crm_env(monkeypatch: pytest.MonkeyPatch, warehouse: Path) -> Callable[[CrmSimulator], None]:
    """Point the project at a simulator and the test's warehouse, through dlt's env variables."""

    def point_at(simulator: CrmSimulator, api_key: str = API_KEY) -> None:
        monkeypatch.setenv("SOURCES__CRM__BASE_URL", simulator.url)
        monkeypatch.setenv("SOURCES__CRM__API_KEY", api_key)
        monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))

    return point_at


@functools.lru_cache(maxsize=None)
def _process_instance():
    from dagster import DagsterInstance

    return DagsterInstance.ephemeral()


def run_sync(selection=None, raise_on_error: bool = True, run_config=None, checks: bool = False):
    """Materialize the crm assets in-process through Dagster, as a user's run would. The table
    checks, evaluated in the same step, run only with `checks` (test_checks.py tests them).

    The runs of one test process share an ephemeral instance, as a user's runs share theirs:
    creating one per run cost each sync about 70 ms of CPU (benchmarks/README.md)."""
    from dagster import AssetSelection, materialize

    from crm_assets.assets import crm_sync_assets
    from crm_assets.resources import RESOURCES as DAGSTER_RESOURCES

    chosen = AssetSelection.all() if selection is None else AssetSelection.assets(*selection)
    return materialize(
        [crm_sync_assets],
        resources=DAGSTER_RESOURCES,
        selection=chosen if checks else chosen.without_checks(),
        raise_on_error=raise_on_error,
        run_config=run_config,
        instance=_process_instance(),
    )


def failure_message(result) -> str:
    """The step failure's message (and its cause chain) of a failed in-process run."""
    messages = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error is not None:
                messages.append(error.message)
                error = error.cause
    return "\n".join(messages)


def all_event_text(result) -> str:
    """Everything a failed or successful run told the user: messages, errors and metadata."""
    parts = []
    for event in result.all_events:
        parts.append(str(event.message or ""))
        if event.is_step_failure:
            parts.append(str(event.step_failure_data.error))
        if event.is_step_materialization:
            parts.append(repr(event.step_materialization_data.materialization.metadata))
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            parts.append(f"{evaluation.description} {evaluation.metadata!r}")
    return "\n".join(parts)


# The warehouses and reading them back live beside this file; importing them here makes the
# fixtures available to every test module, and the helpers to `from .conftest import ...`.
from .warehouses import (  # noqa: E402, F401
    RESOURCES,
    STATE_SQL,
    any_warehouse,
    api_state,
    assert_exact,
    assert_lists_as_in_api,
    pg_warehouse,
    postgres_server,
    query,
    table_ids,
    table_state,
)
