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


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_make_dev_stopped_by_sigterm_to_its_group_leaves_nothing_running(tmp_path):
    """`make dev` started from a script with SIGINT ignored (as `make dev &` is), in a session of
    its own, then SIGTERM to its whole process group, as a service manager stops it, and again a
    second later (make forwards the signal to its child too: a second one arrives anyway)."""
    stop = signal.SIGTERM
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
            time.sleep(0.25)
        # the UI would show no community pop-up (Dagster's `nux` setting in the instance it prepared)
        answer = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": "{ shouldShowNux }"}, timeout=30)
        assert answer.json()["data"]["shouldShowNux"] is False
        running = _processes_with(marker)
        commands = "\n".join(running.values())
        # make, dev.py, the simulator, dg dev, its webserver and daemon (and their code servers)
        assert len(running) >= 6 and "crm_assets.simulator" in commands and "dagster_webserver" in commands, commands

        os.killpg(leader.pid, stop)
        time.sleep(1)
        try:
            os.killpg(leader.pid, stop)
        except ProcessLookupError:
            pass
        leader.wait(timeout=90)
        deadline = time.monotonic() + 30
        while (_processes_with(marker) or _answers(port)) and time.monotonic() < deadline:
            time.sleep(0.1)

        assert _processes_with(marker) == {}
        assert not _answers(port)
        said = (tmp_path / "make-dev.log").read_text(errors="replace")
        for noise in ("SupersessionWarning", "will not be used", "virtual environment does not match"):
            assert noise not in said, said[-3000:]
    finally:
        for pid in _processes_with(marker):  # only what this test started carries its marker
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


def test_make_demo_says_what_it_did_in_a_few_lines_and_no_warning(tmp_path):
    """`make demo` as a newcomer runs it (output captured, so no terminal colours): the table of row
    counts and where the database is, at most 15 lines, none of them a warning."""
    warehouse = tmp_path / "demo.duckdb"
    completed = subprocess.run(
        ["make", "--no-print-directory", "demo", f"DEMO_ARGS=--home {tmp_path / 'home'} --warehouse {warehouse}"],
        cwd=REPO, env=_user_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    lines = output.splitlines()
    assert len(lines) <= 15, output
    assert not [line for line in lines if "warn" in line.lower()], output
    assert "Materialized all 5 assets" in output and str(warehouse) in output
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        (jobs,) = connection.execute("SELECT COUNT(*) FROM crm.jobs").fetchone()
    assert f"crm.jobs {jobs} rows" in " ".join(output.split())


def test_the_suite_keeps_out_of_the_home_directory(tmp_path):
    """conftest.py gives the session a throwaway HOME: what Dagster's telemetry (dg's too) writes
    to ~/.dagster/ lands there, not in the user's home."""
    import pwd

    assert Path.home() == Path(os.environ["CRM_TEST_HOME"]) != Path(pwd.getpwuid(os.getuid()).pw_dir)
    completed = subprocess.run([str(Path(sys.executable).parent / "dg"), "list", "defs", "--json"], cwd=REPO,
                               env=_user_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert list((Path.home() / ".dagster" / "logs").glob("*.log"))  # dg's telemetry on: here, in HOME


def test_scripts_dg_works_from_another_directory_in_the_instance_and_warehouse_it_names(start_simulator, tmp_path):
    """The README's way to run dg outside the repository: `scripts/dg`. The project is found, no
    warning about the venv, the run lands in DAGSTER_HOME's instance (make dev's .dagster_home/ when
    unset) and in the configured warehouse, and nothing is written where it was called from."""
    from dagster import DagsterInstance

    simulator = start_simulator(page_cap=90)
    elsewhere, home, warehouse = tmp_path / "elsewhere", tmp_path / "dagster_home", tmp_path / "w.duckdb"
    elsewhere.mkdir()
    env = _user_env(tmp_path)
    env.update(DAGSTER_HOME=str(home), SOURCES__CRM__BASE_URL=simulator.url,
               SOURCES__CRM__API_KEY=simulator.config.api_key, DESTINATION__DUCKDB__CREDENTIALS=str(warehouse))
    dg = str(REPO / "scripts" / "dg")

    launched = subprocess.run([dg, "launch", "--assets", "crm/jobs"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "virtual environment" not in launched.stderr
    assert_exact(warehouse, simulator, resources=["jobs"])
    with DagsterInstance.from_config(str(home)) as instance:
        assert [record.dagster_run.is_success for record in instance.get_run_records()] == [True]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_process_started_by_start_process_stops_when_its_starter_is_killed(tmp_path):
    """What `make dev` started cannot outlive it even when it is killed with SIGKILL and runs no
    cleanup: the kernel sends SIGTERM to what it started (and `dg dev` stops its own children)."""
    ready = tmp_path / "child.pid"
    starter = subprocess.Popen([sys.executable, "-c", f"""
import signal, subprocess, sys, time
from crm_assets.simulator.process import start_process
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `make dev &` from a script inherits it
child = start_process([sys.executable, "-c", "import time; time.sleep(600)"])
open({str(ready)!r}, "w").write(str(child.pid))
time.sleep(600)
"""], start_new_session=True)
    deadline = time.monotonic() + 60
    while not (ready.exists() and ready.read_text()):
        assert time.monotonic() < deadline and starter.poll() is None
        time.sleep(0.05)
    child = int(ready.read_text())
    # the starter ignores SIGINT; the child starts with the default all the same
    ignored = next(line for line in Path(f"/proc/{child}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    assert not int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1)), ignored
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait(timeout=30)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the child outlived the process that started it"
        time.sleep(0.1)
