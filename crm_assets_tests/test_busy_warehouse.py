"""A DuckDB file another process holds open (an analyst's notebook): the sync waits for it, naming
that process, then loads exactly; past CRM_WAREHOUSE_WAIT_SECONDS it fails saying what to do."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from .conftest import failure_message, run_sync
from .warehouses import DuckDbWarehouse

HOLD = """
import sys, time, duckdb
connection = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
connection.close()
"""


def _hold(path, seconds: float) -> subprocess.Popen:
    """Another process with the DuckDB file open read-write for `seconds`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    return holder


@pytest.fixture
def loaded(start_simulator, crm_env, warehouse):
    simulator = start_simulator()
    crm_env(simulator)
    assert run_sync().success  # the file exists, with tables
    simulator.mutate("jobs", edit=5, insert=3)
    return simulator


def test_a_sync_waits_for_the_process_holding_the_file_then_lands_exactly(loaded, warehouse, monkeypatch, caplog):
    # a 40 s hold waits the same way (checked by hand); 6 s shows the wait and its repeated log
    # line in a fraction of the suite's time
    monkeypatch.setattr("crm_assets.sources.run_lock.WAREHOUSE_WAIT_LOG_EVERY", 2.0)
    holder = _hold(warehouse, 6)
    try:
        started = time.monotonic()
        result = run_sync()
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()

    assert result.success, failure_message(result)
    assert waited >= 4  # it did wait for the holder, not fail and retry
    text = caplog.text  # the run's log, as the source's loggers wrote it
    assert re.search(rf"The DuckDB file .* is held by \S+python\S* \(PID {holder.pid}\)", text)
    assert text.count("waiting for it to be closed") >= 2  # said again while it waits
    assert "was closed after" in text
    DuckDbWarehouse(warehouse).assert_exact(loaded)


def test_a_file_held_past_the_limit_fails_naming_the_process_and_what_to_do(loaded, warehouse, monkeypatch):
    monkeypatch.setenv("CRM_WAREHOUSE_WAIT_SECONDS", "2")
    holder = _hold(warehouse, 30)
    try:
        result = run_sync(raise_on_error=False)
    finally:
        holder.kill()
        holder.wait()

    assert not result.success
    message = failure_message(result)
    assert "has been held by" in message and f"(PID {holder.pid})" in message
    assert "CRM_WAREHOUSE_WAIT_SECONDS=2" in message and "read_only=True" in message
    assert "credentials" not in message


def test_a_bad_wait_setting_is_refused(loaded, monkeypatch):
    monkeypatch.setenv("CRM_WAREHOUSE_WAIT_SECONDS", "soon")
    result = run_sync(raise_on_error=False)
    assert not result.success
    assert "CRM_WAREHOUSE_WAIT_SECONDS must be a number of seconds" in failure_message(result)
