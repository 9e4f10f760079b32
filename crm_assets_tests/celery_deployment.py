"""A Dagster deployment whose runs execute on Celery workers, started from the repository's files
as docs/deploy.md describes it: deploy/celery/dagster.yaml in DAGSTER_HOME (PostgreSQL storage,
the queued run coordinator, dagster-celery's CeleryRunLauncher with Redis as broker), one code
server (`dagster api grpc`, what Dagster's Helm chart runs for user code), the webserver and the
daemon reading it through a workspace file, and N workers (`dagster-celery worker start`).

test_celery.py and benchmarks/accounts.py drive it the way a user would: through the
webserver's GraphQL API (the UI's "Test schedule" evaluates the schedule in the code server and
"Launch all" queues its run requests), the daemon dequeuing the runs and the launcher handing
them to the broker. Each worker writes Celery's log to its own file: which worker ran which run
is read there (the run's `dagster-celery/task_id` tag names its task).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import requests

from crm_assets.simulator.process import start_process, stop_group

REPO = Path(__file__).resolve().parent.parent
CELERY_INSTANCE_YAML = REPO / "deploy" / "celery" / "dagster.yaml"
CELERY_WORKER_YAML = REPO / "deploy" / "celery" / "worker.yaml"
BIN = Path(sys.executable).parent
LOCATION = "crm_assets"
REPOSITORY = "__repository__"  # the name Dagster gives a code location's `Definitions`
CELERY_TASK_TAG = "dagster-celery/task_id"  # set by the launcher on every run it hands over

_SCHEDULE_DRY_RUN = """
mutation ($selector: ScheduleSelector!, $timestamp: Float) {
  scheduleDryRun(selectorData: $selector, timestamp: $timestamp) {
    __typename
    ... on DryRunInstigationTick {
      evaluationResult {
        skipReason
        error { message }
        runRequests { runKey jobName runConfigYaml tags { key value } assetSelection { path } }
      }
    }
    ... on PythonError { message }
  }
}"""

_LAUNCH_RUNS = """
mutation ($params: [ExecutionParams!]!) {
  launchMultipleRuns(executionParamsList: $params) {
    __typename
    ... on LaunchMultipleRunsResult {
      launchMultipleRunsResult { __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message } }
    }
    ... on PythonError { message }
  }
}"""

_JOB_RUN_TAGS = """
query ($selector: PipelineSelector!) {
  pipelineOrError(params: $selector) { ... on Pipeline { runTags { key value } } }
}"""

_WORKSPACE = """
{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } } } }"""

_INSTIGATORS = """
query ($selector: RepositorySelector!) { repositoryOrError(repositorySelector: $selector) {
    ... on Repository { schedules { name scheduleState { id status } }
                        sensors { name sensorState { id status } } } } }"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Redis database 0 is left to people trying things by hand; a deployment here takes one of the
# others for its broker and results, so that two of them on the same Redis (a test and a benchmark,
# two test runs at once) never take each other's runs: a worker runs whatever its broker hands it.
_REDIS_DATABASES = range(1, 16)
_CLAIM_KEY = "crm-assets:claimed-by"


def _redis(services: Mapping[str, str], database: int):
    import redis

    return redis.Redis(host=services["CRM_TEST_REDIS_HOST"], port=int(services["CRM_TEST_REDIS_PORT"]),
                       password=services["CRM_TEST_REDIS_PASSWORD"], db=database)


def claim_redis_database(services: Mapping[str, str]) -> int:
    """A Redis database no other deployment here uses, emptied, claimed for two hours at most
    (`release_redis_database` gives it back sooner)."""
    for database in _REDIS_DATABASES:
        client = _redis(services, database)
        try:
            if client.set(_CLAIM_KEY, f"{socket.gethostname()}:{os.getpid()}", nx=True, ex=7200):
                for key in client.scan_iter():  # what a deployment that died left behind
                    if key != _CLAIM_KEY.encode():
                        client.delete(key)
                return database
        finally:
            client.close()
    raise RuntimeError(f"every Redis database {_REDIS_DATABASES.start}-{_REDIS_DATABASES.stop - 1} is claimed")


def release_redis_database(services: Mapping[str, str], database: int) -> None:
    client = _redis(services, database)
    try:
        client.flushdb()
    finally:
        client.close()


def instance_env(services: Mapping[str, str], dagster_db: str, redis_db: int) -> dict[str, str]:
    """The variables deploy/celery/dagster.yaml and worker.yaml read, for the services of
    scripts/services.sh: Dagster's tables in `dagster_db`, the broker and the results in Redis
    database `redis_db` (claim_redis_database)."""
    redis = (f"redis://:{services['CRM_TEST_REDIS_PASSWORD']}@{services['CRM_TEST_REDIS_HOST']}:"
             f"{services['CRM_TEST_REDIS_PORT']}/{redis_db}")
    return {
        "DAGSTER_PG_HOST": services["CRM_TEST_PG_HOST"],
        "DAGSTER_PG_PORT": services["CRM_TEST_PG_PORT"],
        "DAGSTER_PG_USERNAME": services["CRM_TEST_PG_USER"],
        "DAGSTER_PG_PASSWORD": services["CRM_TEST_PG_PASSWORD"],
        "DAGSTER_PG_DB": dagster_db,
        "DAGSTER_CELERY_BROKER_URL": redis,
        "DAGSTER_CELERY_BACKEND_URL": redis,
    }


class CeleryDeployment:
    """The processes of one deployment, started in `workdir` (the project's working directory:
    its `.dlt/` is the runs'). `env` is every process's environment (the instance's variables,
    the warehouse's); the caller creates Dagster's tables first (`DagsterInstance.from_config`
    on `home`), so that no two processes race to create them. `locations` maps each code
    location to its target (`-m module` or `-f file`): one code server each, and the same
    workers run them all."""

    def __init__(self, root: Path, workdir: Path, env: Mapping[str, str], *, workers: int = 2,
                 concurrency: int = 1,
                 locations: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        self.root = root
        self.workdir = workdir
        self.home = root / "dagster_home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(CELERY_INSTANCE_YAML.read_text())
        self.env = {**os.environ, **env, "DAGSTER_HOME": str(self.home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.worker_names = [f"w{number}" for number in range(1, workers + 1)]
        self.concurrency = concurrency
        self.locations = dict(locations or {LOCATION: ["-m", "crm_assets.definitions"]})
        self.processes: dict[str, subprocess.Popen] = {}
        self.url = ""

    # --- processes -----------------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "wb") as log:
            # a session of its own: stopping it stops its children (Celery's pool); and it does
            # not outlive this process (simulator/process.py)
            process = start_process(args, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def worker_log(self, name: str) -> Path:
        return self.root / f"{name}.celery.log"

    def start(self, timeout: float = 120) -> "CeleryDeployment":
        workspace = ["load_from:"]
        for location, target in self.locations.items():
            port = free_port()
            self._start(f"code_server_{location}", [
                str(BIN / "dagster"), "api", "grpc", "-h", "127.0.0.1", "-p", str(port), *target,
                "--location-name", location])
            workspace += ["  - grpc_server:", "      host: 127.0.0.1", f"      port: {port}",
                          f"      location_name: {location}"]
        web_port = free_port()
        workspace_file = self.root / "workspace.yaml"
        workspace_file.write_text("\n".join(workspace) + "\n")
        for name in self.worker_names:
            self._start(name, [str(BIN / "dagster-celery"), "worker", "start",
                               "-A", "crm_assets.celery_app", "-y", str(CELERY_WORKER_YAML), "-n", name,
                               "--", "--concurrency", str(self.concurrency),
                               "--logfile", str(self.worker_log(name))])
        self._start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1",
                                  "-p", str(web_port), "-w", str(workspace_file)])
        self._start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(workspace_file)])
        self.url = f"http://127.0.0.1:{web_port}/graphql"
        deadline = time.monotonic() + timeout
        for location in self.locations:
            self._wait_for_code_location(location, deadline)
        for name in self.worker_names:
            self._wait_for_worker(name, deadline)
        return self

    def _alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _wait_for_code_location(self, location: str, deadline: float) -> None:
        """Until the webserver serves the code location. The webserver may have asked the code
        server before it listened: then it shows a load error, and a reload (the UI's button)
        asks again."""
        while True:
            self._alive()
            try:
                entries = self.graphql(_WORKSPACE)["workspaceOrError"]["locationEntries"]
            except requests.RequestException:
                entries = []
            for entry in entries:
                if entry["name"] != location:
                    continue
                loaded = entry["locationOrLoadError"] or {}
                if entry["loadStatus"] == "LOADED" and loaded.get("__typename") == "RepositoryLocation":
                    return
                if entry["loadStatus"] == "LOADED":
                    self.graphql("mutation ($name: String!) { reloadRepositoryLocation("
                                 "repositoryLocationName: $name) { __typename } }", {"name": location})
            if time.monotonic() > deadline:
                raise TimeoutError(f"code location {location} did not load: {entries}\n"
                                   f"{self.log_tail('code_server_' + location)}")
            time.sleep(0.3)

    def _wait_for_worker(self, name: str, deadline: float) -> None:
        ready = re.compile(rf"\b{re.escape(name)}@\S+ ready\.")
        while not ready.search(self._read(self.worker_log(name))):
            self._alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {name} did not start:\n{self.log_tail(name)}")
            time.sleep(0.2)

    @staticmethod
    def _read(path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to every process's session at once (Celery's warm shutdown, the daemon's, the
        webserver's), then each is waited for and SIGKILLed if it does not exit."""
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for process in self.processes.values():
            stop_group(process)

    def __enter__(self) -> "CeleryDeployment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- the GraphQL API -----------------------------------------------------------------------

    def graphql(self, query: str, variables: Optional[dict] = None) -> dict:
        response = requests.post(self.url, json={"query": query, "variables": variables or {}}, timeout=120)
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def stop_automation(self, location: str = LOCATION) -> None:
        """Stop every schedule and sensor (the UI's toggles): the test triggers the tick itself,
        and nothing else may request runs meanwhile (an hour boundary, the change sensor)."""
        repository = self.graphql(_INSTIGATORS, {"selector": {
            "repositoryLocationName": location, "repositoryName": REPOSITORY}})["repositoryOrError"]
        for schedule in repository["schedules"]:
            if schedule["scheduleState"]["status"] == "RUNNING":
                self.graphql('mutation ($id: String) { stopRunningSchedule(id: $id) { __typename } }',
                             {"id": schedule["scheduleState"]["id"]})
        for sensor in repository["sensors"]:
            if sensor["sensorState"]["status"] == "RUNNING":
                self.graphql('mutation ($id: String) { stopSensor(id: $id) { __typename } }',
                             {"id": sensor["sensorState"]["id"]})

    def evaluate_schedule(self, schedule: str) -> list[dict]:
        """The schedule's run requests for a tick now, evaluated by the code server against the
        instance (the UI's "Test schedule")."""
        result = self.graphql(_SCHEDULE_DRY_RUN, {
            "selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY,
                         "scheduleName": schedule},
            "timestamp": time.time(),
        })["scheduleDryRun"]
        if result["__typename"] != "DryRunInstigationTick":
            raise RuntimeError(f"schedule dry run failed: {result}")
        evaluation = result["evaluationResult"]
        if evaluation["error"]:
            raise RuntimeError(f"the schedule failed: {evaluation['error']['message']}")
        return evaluation["runRequests"] or []

    def job_run_tags(self, job: str, location: str = LOCATION) -> dict[str, str]:
        """The tags the job puts on its runs (define_asset_job's run_tags)."""
        result = self.graphql(_JOB_RUN_TAGS, {"selector": {
            "repositoryLocationName": location, "repositoryName": REPOSITORY, "pipelineName": job}})
        return {tag["key"]: tag["value"] for tag in result["pipelineOrError"]["runTags"]}

    def launch(self, run_requests: Iterable[dict], job: str, location: str = LOCATION) -> list[str]:
        """Queue the run requests as the daemon queues a tick's: the job's run tags under each
        request's tags (its partition, the schedule's name), its config and asset selection.
        Returns the run ids."""
        job_tags = self.job_run_tags(job, location)
        params = []
        for request in run_requests:
            merged = {**job_tags, **{tag["key"]: tag["value"] for tag in request["tags"]}}
            tags = [{"key": key, "value": value} for key, value in merged.items()]
            selector: dict[str, Any] = {"repositoryLocationName": location, "repositoryName": REPOSITORY,
                                        "jobName": request.get("jobName") or job}
            if request.get("assetSelection"):
                selector["assetSelection"] = [{"path": key["path"]} for key in request["assetSelection"]]
            params.append({"selector": selector, "runConfigData": request["runConfigYaml"],
                           "executionMetadata": {"tags": tags}})
        result = self.graphql(_LAUNCH_RUNS, {"params": params})["launchMultipleRuns"]
        if result["__typename"] != "LaunchMultipleRunsResult":
            raise RuntimeError(f"launching the runs failed: {result}")
        launched = result["launchMultipleRunsResult"]
        failed = [item for item in launched if item["__typename"] != "LaunchRunSuccess"]
        if failed:
            raise RuntimeError(f"{len(failed)} run(s) were not launched: {failed[:3]}")
        return [item["run"]["runId"] for item in launched]

    # --- which worker ran what -----------------------------------------------------------------

    def worker_of_tasks(self) -> dict[str, str]:
        """Celery task id -> the worker that received it, from the workers' logs."""
        received = re.compile(r"Task execute_job\[([0-9a-f-]+)\] received")
        owners: dict[str, str] = {}
        for name in self.worker_names:
            for task_id in received.findall(self._read(self.worker_log(name))):
                owners[task_id] = name
        return owners


def wait_for_runs(instance, run_ids: Iterable[str], timeout: float) -> list:
    """The runs, once every one of them has finished (succeeded, failed or canceled)."""
    from dagster import RunsFilter

    wanted = list(run_ids)
    deadline = time.monotonic() + timeout
    while True:
        runs = instance.get_runs(filters=RunsFilter(run_ids=wanted))
        if len(runs) == len(wanted) and all(run.is_finished for run in runs):
            return runs
        if time.monotonic() > deadline:
            unfinished = {run.run_id: run.status.value for run in runs if not run.is_finished}
            raise TimeoutError(f"{len(unfinished)} run(s) still unfinished: {unfinished}")
        time.sleep(1)
