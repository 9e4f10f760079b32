"""Many CRM accounts in one deployment (docs/accounts.md): accounts from dlt's providers, one
partition per account, each landing in its own dataset with its own pipeline, checks per account,
the union views, and the run lock per account."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DagsterInstance,
    Definitions,
    materialize,
)

from crm_assets.assets import build_crm_sync_assets
from crm_assets.audit import crm_audit_checks
from crm_assets.checks import ID_IS_UNIQUE
from crm_assets.jobs import build_crm_checks
from crm_assets.partitions import account_partitions
from crm_assets.resources import RESOURCES as DAGSTER_RESOURCES
from crm_assets.simulator import CrmSimulator, SimulatorConfig
from crm_assets.sources.crm.accounts import account_api_key, configured_accounts
from crm_assets.sources.crm.errors import CrmConfigurationError
from crm_assets.sources.crm_pipeline import crm_pipeline
from crm_assets.sources.run_lock import CrmRunLockTimeout, exclusive_run
from crm_assets.sources.union_views import refresh_union_views

from .conftest import all_event_text, failure_message
from .warehouses import STATE_SQL, DuckDbWarehouse, api_state

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NAMES = ("acme", "beta", "gamma")
# distinctive keys, so that finding one anywhere is a leak and nothing else
KEYS = {name: f"sekrit-{name}-5b8e2d" for name in NAMES}
COUNTS = {"jobs": 40, "contacts": 30, "tasks": 20, "activities": 15, "files": 10}
CORE = ("jobs", "contacts", "tasks", "activities", "files")


@pytest.fixture(scope="module")
def simulator():
    """One process serving three accounts; gamma alone has an `invoices` resource."""
    overrides = {name: {"api_key": KEYS[name]} for name in NAMES}
    overrides["gamma"]["counts"] = {**COUNTS, "invoices": 12}
    sim = CrmSimulator(SimulatorConfig(accounts=list(NAMES), counts=COUNTS, account_overrides=overrides))
    sim.start()
    yield sim
    sim.stop()


def _accounts_settings(sim: CrmSimulator) -> dict[str, dict]:
    settings = {name: {"base_url": sim.account_url(name), "api_key": KEYS[name]} for name in NAMES}
    settings["gamma"]["resources"] = {"invoices": {"path": "/v1/invoices"}}
    return settings


@pytest.fixture
def accounts(simulator, monkeypatch):
    """The three accounts, configured through the environment (the definitions the code location
    builds at import time read them once; these tests build their own from the same settings)."""
    monkeypatch.setenv("SOURCES__CRM__ACCOUNTS", json.dumps(_accounts_settings(simulator)))
    return configured_accounts()


def _state(run_query, dataset: str, table: str) -> dict[str, tuple]:
    """id -> (name, date_updated in epoch seconds, is_active) of an account's table, no id twice."""
    rows = run_query(STATE_SQL.format(key="id", table=table).replace("FROM crm.", f"FROM {dataset}."))
    assert len(rows) == len({row[0] for row in rows}), f"{dataset}.{table}: duplicate ids"
    return {row[0]: tuple(row[1:]) for row in rows}


def _api(sim: CrmSimulator, name: str, resource: str) -> dict[str, tuple]:
    return api_state(sim.account(name), resource)  # type: ignore[arg-type]


def _schemas(run_query) -> set[str]:
    return {row[0] for row in run_query("SELECT DISTINCT table_schema FROM information_schema.tables")
            if str(row[0]).startswith("crm")}


# --- configuration ---------------------------------------------------------------------------


def test_accounts_merge_secrets_and_config_and_the_key_stays_out_of_the_account(tmp_path):
    """dlt reads a working directory's .dlt once per process: a process of its own reads this one."""
    (tmp_path / ".dlt").mkdir()
    (tmp_path / ".dlt" / "secrets.toml").write_text(
        '[sources.crm.accounts.north]\napi_key = "k-north"\n'
        '[sources.crm.accounts.south]\nbase_url = "https://south.example.com/"\napi_key = "k-south"\n'
    )
    (tmp_path / ".dlt" / "config.toml").write_text(
        '[sources.crm.accounts.north]\nbase_url = "https://north.example.com"\npage_sizes = {tasks = 100}\n'
    )
    read = (
        "import json\n"
        "from crm_assets.sources.crm.accounts import account_api_key, configured_accounts\n"
        "print(json.dumps([[a.name, a.base_url, a.dataset_name, a.pipeline_name, repr(a), str(vars(a)),\n"
        "    {e.name: e.page_size for e in a.endpoints}['tasks'], account_api_key(a),\n"
        "    {e.name: e.result_window for e in a.endpoints}['jobs']]\n"
        "    for a in configured_accounts()]))"
    )
    env = {**os.environ, "SOURCES__CRM__ACCOUNTS__SOUTH__API_KEY": "k-south-from-env",
           "SOURCES__CRM__RESULT_WINDOW": "8000", "SOURCES__CRM__ACCOUNTS__SOUTH__RESULT_WINDOW": "5000",
           "SOURCES__CRM__ACCOUNTS": '{"south": {"base_url": "https://env.example.com"}}'}
    completed = subprocess.run([sys.executable, "-c", read], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr[-3000:]
    north, south = json.loads(completed.stdout)

    assert north[:4] == ["north", "https://north.example.com", "crm_north", "crm_warehouse_north"]
    assert north[6] == 100  # page_sizes from config.toml, the key from secrets.toml
    # the environment wins over the files, as its JSON or a variable per setting
    assert south[1] == "https://env.example.com"
    assert (north[7], south[7]) == ("k-north", "k-south-from-env")
    assert "k-north" not in north[4] + north[5]  # the key is read when needed, never kept
    # an account's own result window, or the one under [sources.crm]
    assert (north[8], south[8]) == (8000, 5000)


@pytest.mark.parametrize("settings, named", [
    ({"acme": {"base_url": "https://a.example.com"}}, ("'acme'", "'api_key'")),
    ({"acme": {"api_key": "k"}}, ("'acme'", "'base_url'")),
    ({"acme": {"base_url": "ftp://a.example.com", "api_key": "k"}}, ("'acme'", "'base_url'", "http(s)")),
    ({"acme": {"base_url": "https://a.example.com", "api_key": "k", "apikey": "k"}}, ("'acme'", "'apikey'")),
    ({"acme": {"base_url": "https://a.example.com", "api_key": "k", "page_sizes": {"tasks": 1}}},
     ("'acme'", "page_size")),
    ({"acme": {"base_url": "https://a.example.com", "api_key": "k", "result_window": 2}},
     ("'acme'", "result_window")),
    ({"Acme": {"base_url": "https://a.example.com", "api_key": "k"}}, ("'Acme'", "lower-case")),
    ({"all": {"base_url": "https://a.example.com", "api_key": "k"}}, ("'all'", "not 'all'")),
])
def test_a_bad_account_entry_names_the_account_and_the_setting(settings, named, monkeypatch):
    monkeypatch.setenv("SOURCES__CRM__ACCOUNTS", json.dumps(settings))
    with pytest.raises(CrmConfigurationError) as failed:
        configured_accounts()
    for part in named:
        assert part in str(failed.value)


def test_without_accounts_nothing_is_partitioned():
    assert configured_accounts() == ()
    assert build_crm_sync_assets(()).partitions_def is None
    assert account_partitions(()) is None


# --- the command line, with accounts in the working directory's .dlt/secrets.toml -------------


def _working_directory(tmp_path: Path, secrets: str) -> tuple[Path, dict[str, str]]:
    work = tmp_path / "work"
    (work / ".dlt").mkdir(parents=True)
    (work / ".dlt" / "secrets.toml").write_text(secrets)
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "DESTINATION__"))},
        "DESTINATION__DUCKDB__CREDENTIALS": str(tmp_path / "warehouse.duckdb"),
        "DAGSTER_HOME": str(home),
        # dg runs the definitions in the project's root (--target-path): dlt's own setting points it
        # at this directory's .dlt instead of the repository's
        "DLT_PROJECT_DIR": str(work),
    }
    return work, env


def _secrets_toml(settings: dict[str, dict]) -> str:
    lines = []
    for name, values in settings.items():
        lines.append(f"[sources.crm.accounts.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if not isinstance(value, dict)]
    lines.append('[sources.crm.accounts.gamma.resources.invoices]\npath = "/v1/invoices"')
    return "\n".join(lines) + "\n"


def test_dg_lists_partitioned_assets_and_one_partition_lands_only_that_account(simulator, tmp_path):
    work, env = _working_directory(tmp_path, _secrets_toml(_accounts_settings(simulator)))

    listed = subprocess.run([str(BIN / "dg"), "list", "defs", "--json", "--target-path", str(REPO)],
                            cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert listed.returncode == 0, listed.stderr[-3000:]
    defs = json.loads(listed.stdout[listed.stdout.index("{"):])
    assets = {a["asset_key"]: a["description"] for a in defs["assets"]}
    assert set(assets) == {f"crm/{name}" for name in (*CORE, "invoices")}  # every account's resources
    assert all("Partitioned by CRM account" in d and "(3 configured)" in d for d in assets.values())
    assert {c["name"] for c in defs["asset_checks"]} >= {"id_is_unique", "id_is_not_null", "row_count_matches_api"}

    materialized = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "crm_assets.definitions", "--select", "*",
         "--partition", "beta"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    output = materialized.stdout + materialized.stderr
    assert materialized.returncode == 0, output[-3000:]

    warehouse = DuckDbWarehouse(tmp_path / "warehouse.duckdb")
    assert _schemas(warehouse.query) == {"crm_beta", "crm_all"}  # only beta, and the union views
    for resource in CORE:
        assert _state(warehouse.query, "crm_beta", resource) == _api(simulator, "beta", resource), resource
    # the key is in no log line, tag or metadata of the run, nor in what the command printed
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    (run,) = instance.get_runs()
    assert run.tags["dagster/partition"] == "beta"
    events = "\n".join(repr(entry) for entry in instance.all_logs(run.run_id))
    assert "crm_beta.jobs" in events  # dagster/table_name
    for key in KEYS.values():
        assert key not in events and key not in output and key not in repr(run.tags)
    instance.dispose()


def test_a_bad_account_entry_fails_dg_check_defs_naming_it(tmp_path):
    work, env = _working_directory(
        tmp_path,
        '[sources.crm.accounts.acme]\nbase_url = "https://acme.example.com"\napi_key = "k"\n'
        '[sources.crm.accounts.beta]\nbase_url = "not a url"\napi_key = "k"\n',
    )
    checked = subprocess.run([str(BIN / "dg"), "check", "defs", "--target-path", str(REPO)],
                             cwd=work, env=env, capture_output=True, text=True, timeout=180)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0
    assert "account 'beta': setting 'base_url'" in output, output[-3000:]


# --- in process: datasets, cursors, views, checks per account ----------------------------------


def _sync(assets, name: str, instance=None, checks: bool = False):
    selection = AssetSelection.all() if checks else AssetSelection.all().without_checks()
    return materialize([assets], resources=DAGSTER_RESOURCES, partition_key=name, instance=instance,
                       selection=selection)


def _materialized(result) -> dict:
    """resource -> its materialization's metadata, for each asset the run materialized."""
    return {
        event.step_materialization_data.materialization.asset_key.path[-1]:
            event.step_materialization_data.materialization.metadata
        for event in result.get_asset_materialization_events()
    }


def test_each_account_lands_exactly_in_its_own_dataset_with_its_own_cursor(
    simulator, accounts, any_warehouse, warehouse, monkeypatch
):
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))
    assets = build_crm_sync_assets(accounts)
    run_query = any_warehouse.query

    first = _sync(assets, "acme")
    _sync(assets, "beta")

    assert _schemas(run_query) >= {"crm_acme", "crm_beta", "crm_all"}
    assert "crm_gamma" not in _schemas(run_query)
    for name in ("acme", "beta"):
        for resource in CORE:
            assert _state(run_query, f"crm_{name}", resource) == _api(simulator, name, resource), (name, resource)
    # acme has no invoices: not materialized for it, and the run succeeded
    landed = _materialized(first)
    assert set(landed) == set(CORE)
    assert landed["jobs"]["dagster/table_name"].value == "crm_acme.jobs"
    # every account's rows in one view, with the account named
    by_account = dict(run_query("SELECT crm_account, COUNT(*) FROM crm_all.jobs GROUP BY crm_account"))
    assert by_account == {"acme": COUNTS["jobs"], "beta": COUNTS["jobs"]}

    # acme's edits are read from acme's own cursor; beta's next run reads nothing new
    simulator.account("acme").mutate("jobs", edit=3)
    again = _sync(assets, "acme")
    assert _state(run_query, "crm_acme", "jobs") == _api(simulator, "acme", "jobs")
    read = {name: metadata["crm/records_read"].value for name, metadata in _materialized(again).items()}
    assert 3 <= read["jobs"] < COUNTS["jobs"] and read["files"] < COUNTS["files"]
    assert _state(run_query, "crm_beta", "jobs") == _api(simulator, "beta", "jobs")
    assert not any(key in all_event_text(again) for key in KEYS.values())

    # a full refresh drops the account's table, which PostgreSQL refuses while a view reads it
    refresh = {"ops": {"crm_sync_assets": {"config": {"full_refresh": True}}}}
    materialize([assets], resources=DAGSTER_RESOURCES, partition_key="acme", run_config=refresh,
                selection=AssetSelection.assets(AssetKey(["crm", "jobs"])))
    assert _state(run_query, "crm_acme", "jobs") == _api(simulator, "acme", "jobs")
    by_account = dict(run_query("SELECT crm_account, COUNT(*) FROM crm_all.jobs GROUP BY crm_account"))
    assert by_account == {"acme": COUNTS["jobs"], "beta": COUNTS["jobs"]}


def test_a_failed_check_in_one_account_stays_failed_after_another_account_passes(
    simulator, accounts, warehouse, monkeypatch
):
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))
    assets = build_crm_sync_assets(accounts)
    partitions = account_partitions(accounts)
    # the job leaves the audit's checks out: they must be defined
    defs = Definitions(assets=[assets], asset_checks=[crm_audit_checks], jobs=[build_crm_checks(partitions)],
                       resources=DAGSTER_RESOURCES)
    instance = DagsterInstance.ephemeral()
    for name in ("acme", "beta"):
        _sync(assets, name, instance, checks=True)
    # a duplicate id in acme's table only
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute("INSERT INTO crm_acme.jobs SELECT * FROM crm_acme.jobs LIMIT 1")

    checks = defs.resolve_job_def("crm_checks")
    failed = checks.execute_in_process(partition_key="acme", instance=instance, raise_on_error=False)
    passed = checks.execute_in_process(partition_key="beta", instance=instance, raise_on_error=False)

    assert not failed.success and passed.success
    # the account's own value of the warehouse tag, however the run is launched (run queue limits)
    assert failed.dagster_run.tags["crm_assets/warehouse"] == "account:acme"
    assert not failed.get_asset_materialization_events()  # the checks job loads nothing
    key = AssetCheckKey(AssetKey(["crm", "jobs"]), ID_IS_UNIQUE)
    latest: dict[str, str] = {}
    for record in instance.event_log_storage.get_asset_check_execution_history(key, limit=20):
        latest.setdefault(record.partition, record.status.value)  # newest first
    assert latest == {"acme": "FAILED", "beta": "SUCCEEDED"}
    # an unpartitioned check would keep only the newest result: beta's pass
    assert instance.get_latest_asset_check_evaluation_record(key).partition == "beta"


def test_a_failed_run_names_its_account_and_not_its_key(simulator, accounts, warehouse, monkeypatch):
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))
    assets = build_crm_sync_assets(accounts)
    simulator.account("beta").configure(revoked=True)  # its key answers 401
    try:
        result = materialize([assets], resources=DAGSTER_RESOURCES, partition_key="beta", raise_on_error=False,
                             selection=AssetSelection.all().without_checks())
    finally:
        simulator.account("beta").configure(revoked=False)

    assert not result.success
    message = failure_message(result)
    assert re.search(r"Account beta: \w+: GET /beta/v1/\w+ failed: .*401", message), message
    assert "check api_key under [sources.crm.accounts.beta]" in message
    assert not any(key in all_event_text(result) for key in KEYS.values())


def test_the_union_view_aligns_columns_that_differ_between_accounts(any_warehouse, warehouse, monkeypatch):
    """A column one account lacks is NULL for its rows; one whose type differs is read as text."""
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(warehouse))
    pipeline = crm_pipeline(pipeline_name="crm_warehouse_a", dataset_name="crm_a")
    with pipeline.sql_client() as client:
        for statement in (
            "CREATE SCHEMA crm_a", "CREATE SCHEMA crm_b",
            "CREATE TABLE crm_a.jobs (id TEXT, amount BIGINT)",
            "CREATE TABLE crm_b.jobs (id TEXT, amount TEXT, colour TEXT)",
            "INSERT INTO crm_a.jobs VALUES ('a-1', 5)",
            "INSERT INTO crm_b.jobs VALUES ('b-1', 'five', 'red')",
        ):
            client.execute_sql(statement)

    made = refresh_union_views(pipeline, {"a": "crm_a", "b": "crm_b", "c": "crm_c"}, ["jobs", "tasks"])

    assert made == ["crm_all.jobs"]  # no account has tasks yet; c has no dataset yet
    rows = any_warehouse.query("SELECT crm_account, id, amount, colour FROM crm_all.jobs ORDER BY id")
    assert [tuple(row) for row in rows] == [("a", "a-1", "5", None), ("b", "b-1", "five", "red")]


# --- the run lock ----------------------------------------------------------------------------


def test_accounts_run_at_once_on_postgres_and_take_turns_on_one_duckdb_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CRM_DESTINATION", "postgres")
    with exclusive_run(pipeline_name="crm_warehouse_acme"):
        with exclusive_run(pipeline_name="crm_warehouse_beta", wait_seconds=0):
            pass  # another account's pipeline: not held
        with pytest.raises(CrmRunLockTimeout):
            with exclusive_run(pipeline_name="crm_warehouse_acme", wait_seconds=0.6):
                pass  # the same account waits

    monkeypatch.delenv("CRM_DESTINATION")
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(tmp_path / "shared.duckdb"))
    with exclusive_run(pipeline_name="crm_warehouse_acme"):
        with pytest.raises(CrmRunLockTimeout, match="same DuckDB file"):
            with exclusive_run(pipeline_name="crm_warehouse_beta", wait_seconds=0.6):
                pass  # one DuckDB file admits one writer: accounts sharing it take turns
