"""Importing the code location changes nothing in the process, and a sync puts back what it tunes.

Each check runs in a fresh interpreter: what this test process has already imported proves
nothing about an import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from .conftest import assert_exact, run_sync

SNAPSHOT = textwrap.dedent(
    """
    import gc, json, os, sys, tempfile
    import dlt
    import pyarrow as pa
    from dlt.common.configuration.container import Container
    from dlt.common.pipeline import PipelineContext

    def files(root):
        return sorted(os.path.relpath(os.path.join(folder, name), root)
                      for folder, _, names in os.walk(root) for name in names)

    def dlt_functions():  # every function and class bound in a loaded dlt module
        return {
            f"{name}.{attr}": id(value)
            for name, module in list(sys.modules.items()) if name == "dlt" or name.startswith("dlt.")
            for attr, value in list(vars(module).items()) if callable(value)
        }

    DLT_KEYS = ("data_writer.disable_compression",)
    SECRET_KEYS = ("destination.duckdb.credentials.global_config",)

    def snapshot():
        return {
            "gc_enabled": gc.isenabled(),
            "gc_threshold": list(gc.get_threshold()),
            "gc_frozen": gc.get_freeze_count(),
            "environ": dict(os.environ),
            "dlt_config": {k: repr(dlt.config.get(k)) for k in DLT_KEYS},
            "dlt_secrets": {k: repr(dlt.secrets.get(k)) for k in SECRET_KEYS},
            "dlt_functions": dlt_functions(),
            "arrow_pool": pa.default_memory_pool().backend_name,
            "active_dlt_pipeline": Container()[PipelineContext].is_active(),
            "dlt_data_dir": files(os.environ["DLT_DATA_DIR"]),
            "temporary_folders": sorted(n for n in os.listdir(tempfile.gettempdir()) if n.startswith("crm_")),
        }
    """
)


def _run(body: str) -> dict:
    code = SNAPSHOT + textwrap.dedent(body)
    # a temporary folder of its own: other processes' crm_* folders are not this import's doing
    with tempfile.TemporaryDirectory() as own_tmp:
        env = {**os.environ, "TMPDIR": own_tmp}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _differences(before: dict, after: dict) -> dict:
    differences = {k: (before[k], after[k]) for k in before if k != "dlt_functions" and before[k] != after[k]}
    # modules imported in between add names; a name bound to another object is a replaced function
    replaced = sorted(name for name, value in before["dlt_functions"].items()
                      if after["dlt_functions"].get(name, value) != value)
    if replaced:
        differences["dlt_functions"] = replaced
    return differences


def test_importing_the_code_location_leaves_gc_environment_dlt_config_and_dlt_functions_alone(tmp_path, monkeypatch):
    """... and dlt's active pipeline, and the disk: no folder, lock or temporary file left."""
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "fresh-dlt"))
    (tmp_path / "fresh-dlt").mkdir()
    result = _run(
        """
        before = snapshot()
        import crm_assets.definitions  # noqa: F401
        print(json.dumps({"before": before, "after": snapshot()}))
        """
    )
    assert _differences(result["before"], result["after"]) == {}


def test_a_sync_puts_back_everything_it_tunes(start_simulator, crm_env, warehouse, monkeypatch):
    simulator = start_simulator()
    crm_env(simulator)
    result = _run(
        """
        import crm_assets.definitions  # noqa: F401
        from crm_assets.sources.tuning import sync_tuning
        before = snapshot()
        with sync_tuning():
            during = snapshot()
        print(json.dumps({"before": before, "during": during, "after": snapshot()}))
        """
    )
    assert _differences(result["before"], result["after"]) == {}
    tuned = _differences(result["before"], result["during"])
    assert {"gc_threshold", "environ", "dlt_secrets", "arrow_pool"} <= set(tuned), tuned
    assert "dlt_functions" not in tuned  # a sync replaces none of dlt's functions either

    # and a real sync in this process: the tuning is undone whether or not it was applied
    import gc

    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert run_sync().success
    assert (gc.get_threshold(), gc.get_freeze_count()) == (threshold, frozen)
    assert_exact(warehouse, simulator)


def test_importing_the_code_location_keeps_another_active_dlt_pipeline_active(tmp_path):
    """Code locations can share a process: another one's active dlt pipeline stays active."""
    result = _run(
        f"""
        other = dlt.pipeline(pipeline_name="someone_elses", pipelines_dir={str(tmp_path / "other")!r})
        import crm_assets.definitions  # noqa: F401
        print(json.dumps({{"active": dlt.current.pipeline().pipeline_name}}))
        """
    )
    assert result == {"active": "someone_elses"}


def test_the_celery_app_brings_the_code_location_and_dagster_celerys_tasks_and_starts_no_thread():
    """`-A crm_assets.celery_app`: Celery forks its pool processes after importing it, so the pool
    starts with the code imported; a thread started here would not survive the fork."""
    result = _run(
        """
        import threading
        threads = threading.active_count()
        import crm_assets.celery_app as celery_app
        print(json.dumps({"code_imported": "crm_assets.definitions" in sys.modules,
                          "tasks": sorted(name for name in celery_app.app.tasks if not name.startswith("celery.")),
                          "new_threads": threading.active_count() - threads}))
        """
    )
    assert result == {"code_imported": True, "tasks": ["execute_job", "execute_plan", "resume_job"], "new_threads": 0}
