"""What a newcomer runs, run as they run it: `make dev` stopped by a signal, `make demo`'s output,
and `scripts/dg` from another directory. Each works in temporary folders (its own DAGSTER_HOME and
warehouse) and on free ports, never in the repository's .dagster_home/ or crm_warehouse.duckdb."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import pytest
import requests

from .conftest import assert_exact

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of someone at a terminal: none of the tests' settings, their own DuckDB
    file and dlt folder under tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SOURCES__", "DESTINATION__", "DAGSTER_", "PYTEST_"))
           and k not in ("API_KEY", "CRM_DESTINATION", "VIRTUAL_ENV")}
    env.update(DLT_DATA_DIR=str(tmp_path / "dlt"), **extra)
    return env


def _processes_with(marker: str) -> dict[int, str]:
    """Every process whose environment holds the marker (what a process tree we started, and
    anything it started, inherits), pid -> command line."""
    found = {}
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_make_dev_stopped_by_sigterm_to_its_group_leaves_nothing_running(tmp_path):
    """`make dev` started from a script with SIGINT ignored (as `make dev &` is), in a session of
    its own, then SIGTERM to its whole process group, as a service manager stops it, and again a
    second later (make forwards the signal to its child too: a second one arrives anyway)."""
    port, marker = _free_port(), f"CRM_DEV_TEST_{uuid.uuid4().hex}"
    env = _user_env(tmp_path, **{marker: "1", "DESTINATION__DUCKDB__CREDENTIALS": str(tmp_path / "w.duckdb")})
    command = f'trap "" INT; exec make --no-print-directory dev DEV_ARGS="--port {port} --home {tmp_path / "home"}"'
    log = (tmp_path / "make-dev.log").open("wb")
    leader = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # = setsid
    try:
        deadline = time.monotonic() + 240
        while True:
            assert leader.poll() is None, (tmp_path / "make-dev.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the UI never answered:\n" + (tmp_path / "make-dev.log").read_text()[-3000:]
            time.sleep(1)
        running = _processes_with(marker)
        commands = "\n".join(running.values())
        # make, dev.py, the simulator, dg dev, its webserver and daemon (and their code servers)
        assert len(running) >= 6 and "crm_assets.simulator" in commands and "dagster_webserver" in commands, commands

        os.killpg(leader.pid, signal.SIGTERM)
        time.sleep(1)
        try:
            os.killpg(leader.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        leader.wait(timeout=90)
        deadline = time.monotonic() + 15
        while (_processes_with(marker) or _answers(port)) and time.monotonic() < deadline:
            time.sleep(0.5)

        assert _processes_with(marker) == {}
        assert not _answers(port)
    finally:
        for pid in _processes_with(marker):  # only what this test started carries its marker
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
