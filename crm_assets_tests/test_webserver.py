"""End to end through the real Dagster UI: dagster-webserver and dagster-daemon as subprocesses.

The module starts both on loopback against the repository's workspace.yaml, with a temporary
DAGSTER_HOME (holding a copy of the repository's dagster.yaml), the simulator and a temporary
DuckDB file. The tests talk to the webserver like its own front end does (GraphQL over HTTP):
the code location, a crm_sync launched through the run queue and drained by the daemon, the
check results. Then headless Chromium (Debian's, driven over the DevTools protocol; no browser
download) opens the asset graph and an asset's checks page and reads what a user sees.

`CRM_UPDATE_SCREENSHOTS=1` also writes the asset graph to docs/screenshots/asset-graph.png
(the README's picture); otherwise the screenshots stay in the test's temporary folder.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import duckdb
import pytest
import requests
from websockets.sync.client import connect as websocket_connect

from crm_assets.checks import ID_IS_NOT_NULL, ID_IS_UNIQUE, ROW_COUNT_MATCHES_API
from crm_assets.simulator import CrmSimulator, SimulatorConfig

from .conftest import API_KEY, RESOURCES, SMALL_COUNTS

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = REPO / "docs" / "screenshots" / "asset-graph.png"
LOCATION = "crm_assets"
REPOSITORY = "__repository__"
CHECK_NAMES = {ID_IS_UNIQUE, ID_IS_NOT_NULL, ROW_COUNT_MATCHES_API}
RUN_TIMEOUT_SECONDS = 180
WIDTH, HEIGHT = 1400, 900


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a process we started and everything it started (its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class DagsterUi:
    def __init__(self, url: str, warehouse: Path, simulator: CrmSimulator, logs: Path) -> None:
        self.url = url
        self.warehouse = warehouse
        self.simulator = simulator
        self.logs = logs

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        response = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterUi]:
    root = tmp_path_factory.mktemp("dagster_ui")
    home = root / "dagster_home"
    home.mkdir()
    if (REPO / "dagster.yaml").exists():
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    warehouse = root / "warehouse.duckdb"
    simulator = CrmSimulator(
        SimulatorConfig(api_key=API_KEY, counts=dict(SMALL_COUNTS), page_cap=90)
    ).start()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOURCES__", "DESTINATION__", "DAGSTER_"))
        and k not in ("API_KEY", "CRM_DESTINATION")
    }
    env.update(
        DAGSTER_HOME=str(home),
        DAGSTER_DISABLE_TELEMETRY="true",
        RUNTIME__DLTHUB_TELEMETRY="false",
        SOURCES__CRM__BASE_URL=simulator.url,
        SOURCES__CRM__API_KEY=API_KEY,
        DESTINATION__DUCKDB__CREDENTIALS=str(warehouse),
        DLT_DATA_DIR=str(root / "dlt"),
    )
    port = _free_port()
    workspace = str(REPO / "workspace.yaml")
    commands = {
        "webserver": [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", workspace],
        "daemon": [str(BIN / "dagster-daemon"), "run", "-w", workspace],
    }
    processes: list[subprocess.Popen] = []
    try:
        # The instance's SQLite storage is created before either process starts: on a new
        # DAGSTER_HOME the webserver and the daemon would otherwise race through the same
        # migration, and the loser exits ("table alembic_version already exists").
        subprocess.run([str(BIN / "dagster"), "instance", "migrate"], cwd=root, env=env, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, command in commands.items():
            with open(root / f"{name}.log", "wb") as log:
                processes.append(subprocess.Popen(
                    command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                ))
        ui = DagsterUi(f"http://127.0.0.1:{port}", warehouse, simulator, root)
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{ui.url}/server_info", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                pytest.fail(f"dagster-webserver did not come up\n{ui.log_tail()}", pytrace=False)
            time.sleep(0.5)
        yield ui
    finally:
        for process in reversed(processes):
            _stop(process)
        simulator.stop()


_RUN_STATUS = """
query ($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } ... on PythonError { message } }
}"""


@pytest.fixture(scope="module")
def synced(dagster_ui: DagsterUi) -> str:
    """crm_sync launched over GraphQL (the Launchpad's mutation), queued, run by the daemon."""
    launched = dagster_ui.graphql(
        """
        mutation ($params: ExecutionParams!) {
          launchRun(executionParams: $params) {
            __typename
            ... on LaunchRunSuccess { run { runId status } }
            ... on PythonError { message }
            ... on RunConfigValidationInvalid { errors { message } }
          }
        }""",
        params={
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": REPOSITORY,
                "jobName": "crm_sync",
            },
            "runConfigData": {},
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    status = launched["run"]["status"]
    while status not in ("SUCCESS", "FAILURE", "CANCELED"):
        if time.monotonic() > deadline:
            pytest.fail(f"crm_sync still {status} after {RUN_TIMEOUT_SECONDS}s\n{dagster_ui.log_tail()}")
        time.sleep(1)
        status = dagster_ui.graphql(_RUN_STATUS, runId=run_id)["runOrError"]["status"]
    if status != "SUCCESS":
        events = dagster_ui.graphql(
            """query ($runId: ID!) { logsForRun(runId: $runId) { ... on EventConnection {
                 events { __typename ... on MessageEvent { message } } } } }""",
            runId=run_id,
        )["logsForRun"]["events"]
        messages = "\n".join(e.get("message") or "" for e in events)
        pytest.fail(f"crm_sync ended {status}:\n{messages[-5000:]}\n{dagster_ui.log_tail()}")
    return run_id


def test_the_code_location_loads_with_the_assets_checks_jobs_schedule_and_sensors(dagster_ui):
    entries = dagster_ui.graphql(
        """
        {
          workspaceOrError {
            __typename
            ... on Workspace { locationEntries { name loadStatus locationOrLoadError {
              __typename
              ... on PythonError { message }
              ... on RepositoryLocation { repositories {
                name
                jobs { name }
                schedules { name cronSchedule scheduleState { status } }
                sensors { name sensorState { status } }
                assetNodes {
                  assetKey { path }
                  groupName
                  assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
                }
              } }
            } } }
          }
        }"""
    )["workspaceOrError"]["locationEntries"]

    assert [entry["name"] for entry in entries] == [LOCATION]
    location = entries[0]["locationOrLoadError"]
    assert location["__typename"] == "RepositoryLocation", location
    (repository,) = location["repositories"]
    nodes = {"/".join(node["assetKey"]["path"]): node for node in repository["assetNodes"]}
    assert set(nodes) == {f"crm/{name}" for name in RESOURCES}
    for node in nodes.values():
        assert node["groupName"] == "crm"
        checks = {c["name"]: c["blocking"] for c in node["assetChecksOrError"]["checks"]}
        assert checks == {ID_IS_UNIQUE: True, ID_IS_NOT_NULL: True, ROW_COUNT_MATCHES_API: False}
    assert {"crm_sync", "crm_checks"} <= {job["name"] for job in repository["jobs"]}
    schedules = {s["name"]: s for s in repository["schedules"]}
    assert schedules["crm_sync_schedule"]["scheduleState"]["status"] == "RUNNING"
    sensors = {s["name"]: s["sensorState"]["status"] for s in repository["sensors"]}
    assert sensors == {"crm_change_sensor": "RUNNING", "crm_sync_failure_sensor": "RUNNING"}


def test_crm_sync_launched_over_graphql_fills_the_warehouse_and_passes_its_checks(
    dagster_ui, synced
):
    with duckdb.connect(str(dagster_ui.warehouse), read_only=True) as connection:
        for name in RESOURCES:
            ids = connection.execute(f"SELECT id FROM crm.{name}").fetchall()
            assert len(ids) == len(set(ids)) == SMALL_COUNTS[name], name
            expected = {record["id"] for record in dagster_ui.simulator.records(name)}
            assert {row[0] for row in ids} == expected, name

    nodes = dagster_ui.graphql(
        """
        query ($keys: [AssetKeyInput!]) {
          assetNodes(assetKeys: $keys) {
            assetKey { path }
            assetMaterializations(limit: 1) { runId }
            assetChecksOrError { ... on AssetChecks { checks {
              name
              executionForLatestMaterialization { runId status evaluation { success } }
            } } }
          }
        }""",
        keys=[{"path": ["crm", name]} for name in RESOURCES],
    )["assetNodes"]
    assert len(nodes) == len(RESOURCES)
    for node in nodes:
        assert node["assetMaterializations"][0]["runId"] == synced
        executions = {
            check["name"]: check["executionForLatestMaterialization"]
            for check in node["assetChecksOrError"]["checks"]
        }
        assert set(executions) == CHECK_NAMES
        for name, execution in executions.items():
            assert execution["runId"] == synced, (node["assetKey"], name)
            assert execution["status"] == "SUCCEEDED", (node["assetKey"], name, execution)
            assert execution["evaluation"]["success"] is True


# --- a real browser ----------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0",
    f"--window-size={WIDTH},{HEIGHT}",
]

# The first visit shows a "Join the Dagster community" dialog; a user clicks Skip.
_SKIP_DIALOG = """(() => {
  const skip = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Skip');
  if (skip) { skip.click(); return true; }
  return false;
})()"""

# Where the graph's nodes are, and the part of the graph pane not covered by its toolbar.
_GRAPH_GEOMETRY = """JSON.stringify((() => {
  const nodes = [...document.querySelectorAll('foreignObject')].map(e => e.getBoundingClientRect());
  let pane = document.querySelector('foreignObject');
  while (pane && getComputedStyle(pane).overflow !== 'hidden') pane = pane.parentElement;
  const area = pane.getBoundingClientRect();
  const toolbar = [...document.querySelectorAll('button')]
    .filter(b => b.innerText.includes('Materialize all')).map(b => b.getBoundingClientRect().bottom);
  return {count: nodes.length,
          top: Math.min(...nodes.map(r => r.top)), bottom: Math.max(...nodes.map(r => r.bottom)),
          areaTop: Math.max(area.top, ...toolbar) + 8, areaBottom: Math.min(area.bottom, innerHeight),
          x: (area.left + area.right) / 2};
})())"""


class Chromium:
    """Debian's chromium, headless, driven over the DevTools protocol (one page)."""

    def __init__(self, folder: Path) -> None:
        profile = folder / "profile"
        profile.mkdir(parents=True)
        self._log = open(folder / "chromium.log", "wb")
        self.process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        active_port = profile / "DevToolsActivePort"  # chromium writes its port and path here
        deadline = time.monotonic() + 30
        while len(active_port.read_text().splitlines() if active_port.exists() else []) < 2:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"chromium did not start: {(folder / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.1)
        port, path = active_port.read_text().splitlines()[:2]
        self._ws = websocket_connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=15)
        self._ids = itertools.count(1)
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.page("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                  deviceScaleFactor=1, mobile=False)

    def _call(self, method: str, session: Optional[str] = None, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        while True:  # skip the events chromium sends meanwhile
            reply = json.loads(self._ws.recv(timeout=60))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self._call(method, session=self._session, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str, *expected: str, timeout: float = 60) -> str:
        """Navigate and wait until the rendered page shows every expected text."""
        self.page("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(item in text for item in expected):
                return text
            if time.monotonic() > deadline:
                missing = [item for item in expected if item not in text]
                raise AssertionError(f"{url} never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def dismiss_dialogs(self) -> None:
        for _ in range(6):  # the dialog may open a moment after the page
            if self.evaluate(_SKIP_DIALOG):
                time.sleep(0.5)
                return
            time.sleep(0.25)

    def wheel(self, x: float, y: float, delta_y: float, zoom: bool = False) -> None:
        self.page("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0,
                  deltaY=delta_y, modifiers=2 if zoom else 0)  # ctrl + wheel zooms the graph
        time.sleep(0.4)

    def fit_graph(self) -> dict[str, Any]:
        """Zoom out until every node fits the graph pane, then center them, as a user would."""
        for _ in range(10):
            box = json.loads(self.evaluate(_GRAPH_GEOMETRY))
            middle = (box["areaTop"] + box["areaBottom"]) / 2
            if box["bottom"] - box["top"] <= box["areaBottom"] - box["areaTop"] - 24:
                break
            self.wheel(box["x"], middle, 40, zoom=True)
        self.wheel(box["x"], middle, (box["top"] + box["bottom"]) / 2 - middle)
        time.sleep(0.6)
        return json.loads(self.evaluate(_GRAPH_GEOMETRY))

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(png)
        return png

    def close(self) -> None:
        try:
            if hasattr(self, "_ws"):
                self._ws.close()
        finally:
            _stop(self.process)
            self._log.close()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    browser = Chromium(tmp_path / "chromium")
    yield browser
    browser.close()


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def test_a_browser_shows_the_asset_graph_and_a_passed_check(dagster_ui, synced, chromium, tmp_path):
    graph_url = f"{dagster_ui.url}/locations/{LOCATION}/asset-groups/crm"
    text = chromium.open(graph_url, *RESOURCES, "Materialized", "3 / 3 Passed")
    chromium.dismiss_dialogs()

    # every asset's node says it is materialized and its three checks passed
    text = chromium.text()
    assert "Join the Dagster community" not in text
    for name in RESOURCES:
        assert name in text.split("\n"), name
    assert text.count("3 / 3 Passed") == len(RESOURCES), text[:3000]
    assert text.count("Materialized") >= len(RESOURCES)

    box = chromium.fit_graph()
    assert box["count"] == len(RESOURCES)
    assert box["areaTop"] - 2 <= box["top"] and box["bottom"] <= box["areaBottom"] + 2, box
    png = chromium.screenshot(tmp_path / "asset-graph.png")
    assert _png_size(png) == (WIDTH, HEIGHT)
    assert len(png) > 30_000  # a rendered page, not a blank one
    if os.environ.get("CRM_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)

    checks_url = f"{dagster_ui.url}/assets/crm/jobs?view=checks"
    text = chromium.open(checks_url, *sorted(CHECK_NAMES), "Latest execution", "Passed")
    chromium.screenshot(tmp_path / "jobs-checks.png")
    assert "Checks (3)" in text
    assert text.count("Succeeded") >= len(CHECK_NAMES), text[:3000]
    assert "This is a blocking asset check" in text
    assert "Evaluation result\nPassed" in text or "Passed" in text.split("\n")
