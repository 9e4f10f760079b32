"""The README's commands, run as written: every ```bash block of "Trying it by hand" and of
"Connecting to the real API", with `bash`, from the repository root, the venv's bin on PATH.

What the test changes, and why (nothing else is touched):

- The simulator runs on a free loopback port the test picks, never the README's 8765, so a
  simulator a person (or `make demo`) runs on this machine is neither hit nor in the way: in
  "Trying it by hand" every `8765` is replaced by that port. The block's first line starts the
  simulator in the foreground, as in a terminal of its own: the test starts that line in the
  background, waits until it serves, runs the rest of the block, then stops it.
- "Connecting to the real API" has two placeholders: `https://...` (the account's API root)
  becomes the URL of a simulator the test starts in the real family's shape (`--key-field jnid
  --real-family N`, newest first unless asked), and the `...` of the API key becomes that
  simulator's key.
- The commands must not write into the repository: the environment points the DuckDB file
  (DESTINATION__DUCKDB__CREDENTIALS), dlt's data folder (DLT_DATA_DIR) and DAGSTER_HOME at the
  test's temporary folder. No SOURCES__* or API_KEY setting of the machine reaches them.

Then the data must have landed: every table holds as many rows as the simulator has records.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent
FIVE = ("jobs", "contacts", "tasks", "activities", "files")
REAL_FAMILY = ("invoices", "estimates", "payments", "workorders", "products")


def bash_blocks(section: str) -> list[str]:
    """The ```bash blocks of the README section whose `## ` title starts with `section`."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no section {section!r}"
    blocks = re.findall(r"^```bash\n(.*?)^```", match.group(1), re.S | re.M)
    assert blocks, f"README section {section!r} has no bash block"
    return blocks


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SOURCES__", "DESTINATION__")) and k not in ("API_KEY", "VIRTUAL_ENV")}
    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DESTINATION__DUCKDB__CREDENTIALS=str(tmp_path / "warehouse.duckdb"),
        DLT_DATA_DIR=str(tmp_path / "dlt"),
        DAGSTER_HOME=str(tmp_path / "dagster_home"),
        RUNTIME__DLTHUB_TELEMETRY="false",
        DAGSTER_DISABLE_TELEMETRY="true",
    )
    return env


def _start(command: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            requests.get(f"{url}/v1/jobs", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"the simulator did not serve at {url}: {log.read_text(errors='replace')[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    completed = subprocess.run(["bash", "-e", "-c", script], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def _row_counts(warehouse: Path, tables) -> dict[str, int]:
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return {t: connection.execute(f"SELECT COUNT(*) FROM crm.{t}").fetchone()[0] for t in tables}


# What the commands would write in the working directory if the environment did not point
# elsewhere: the DuckDB file, Dagster's and dlt's folders.
_WOULD_WRITE = ("crm_warehouse.duckdb", "crm_warehouse.duckdb.wal", ".dagster_home", ".dlt", "tmp", "logs",
                "history", "storage", "schedules")


def _what_could_be_written() -> dict[str, float]:
    """The modification time of each path the commands could write in the repository."""
    return {name: (REPO / name).stat().st_mtime for name in _WOULD_WRITE if (REPO / name).exists()}


def _repository_unchanged_since(before: dict[str, float]) -> None:
    assert _what_could_be_written() == before


def test_trying_it_by_hand_runs_as_written(tmp_path):
    from crm_assets.simulator.data import DEFAULT_COUNTS

    (block,) = bash_blocks("Trying it by hand")
    port = str(_free_port())
    lines = block.replace("8765", port).splitlines()
    assert lines[0].startswith(".venv/bin/crm-simulator "), lines[0]
    env = _environment(tmp_path)
    before = _what_could_be_written()

    simulator = _start(lines[0], env, tmp_path / "simulator.log")
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_serving(url, simulator, tmp_path / "simulator.log")
        done = _run("\n".join(lines[1:]), env)
        jobs = requests.get(f"{url}/v1/jobs", params={"size": 0},
                            headers={"Authorization": "Bearer demo-key"}, timeout=10).json()["count"]
    finally:
        _stop(simulator)

    assert '"inserted"' in done.stdout  # the mutate answered
    assert jobs == DEFAULT_COUNTS["jobs"] + 2
    assert _row_counts(tmp_path / "warehouse.duckdb", FIVE) == {r: DEFAULT_COUNTS[r] for r in FIVE}
    _repository_unchanged_since(before)


REAL_FAMILY_RECORDS = 150


@pytest.fixture
def real_family_simulator(start_simulator):
    counts = {"jobs": 240, "contacts": 310, "tasks": 180, "activities": 205, "files": 95}
    counts.update({r: REAL_FAMILY_RECORDS for r in REAL_FAMILY})
    from crm_assets.simulator.data import REAL_FAMILY_PATHS

    return start_simulator(counts, key_field="jnid", paths=dict(REAL_FAMILY_PATHS),
                           default_sort_field="date_updated", default_sort_direction="desc")


def test_connecting_to_the_real_api_runs_as_written_against_the_real_familys_shape(
    real_family_simulator, tmp_path
):
    simulator = real_family_simulator
    (block,) = bash_blocks("Connecting to the real API")
    assert block.count("https://...") == 1 and block.count("_API_KEY=...") == 1
    script = block.replace("https://...", simulator.url).replace(
        "_API_KEY=...", f"_API_KEY={simulator.config.api_key}")
    env = _environment(tmp_path)
    before = _what_could_be_written()

    _run(script, env)

    landed = _row_counts(tmp_path / "warehouse.duckdb", FIVE + REAL_FAMILY)
    assert landed == {r: len(simulator.ids(r)) for r in FIVE + REAL_FAMILY}
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        types = dict(((t, c), k) for t, c, k in connection.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'crm' AND column_name LIKE 'date\\_%' ESCAPE '\\'").fetchall())
    assert types and all(kind.startswith("TIMESTAMP") for kind in types.values()), types
    _repository_unchanged_since(before)


@pytest.mark.parametrize("flag", [[], ["--real-family", "7"]], ids=["default", "real-family"])
def test_the_simulator_cli_serves_the_real_familys_resources_only_when_asked(tmp_path, flag):
    ready = tmp_path / "url"
    process = _start(" ".join([str(BIN / "crm-simulator"), "--port", "0", "--ready-file", str(ready), *flag]),
                     _environment(tmp_path), tmp_path / "simulator.log")
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "simulator.log").read_text()
            time.sleep(0.05)
        url = ready.read_text().strip()
        headers = {"Authorization": "Bearer demo-key"}
        statuses = {path: requests.get(f"{url}{path}", params={"size": 0}, headers=headers, timeout=10)
                    for path in ("/v1/jobs", "/v1/invoices", "/v2/invoices", "/v2/estimates", "/v1/payments",
                                 "/v1/workorders", "/v1/products")}
    finally:
        _stop(process)
    if flag:
        assert {p: r.status_code for p, r in statuses.items()} == {
            "/v1/jobs": 200, "/v1/invoices": 404, "/v2/invoices": 200, "/v2/estimates": 200,
            "/v1/payments": 200, "/v1/workorders": 200, "/v1/products": 200}
        assert {r.json()["count"] for p, r in statuses.items() if p != "/v1/jobs" and r.status_code == 200} == {7}
    else:  # the default five only, as always
        assert {p for p, r in statuses.items() if r.status_code == 200} == {"/v1/jobs"}
