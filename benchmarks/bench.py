"""`make bench`: how close a full sync comes to the speed of the API itself.

Starts the CRM API simulator as a subprocess, then runs each variant below against the same data,
each in its own subprocess, measuring wall time, peak memory of the whole process tree and CPU:

  a    the HTTP floor: every page of every resource, one after the other, with one plain
       `requests.Session`, by the contract's rules (sort on date_created, from/size=1000, advance
       by records received, a new `date_created >= last` window before from+size passes 10,000);
       JSON parsed with orjson (or the stdlib: --floor-json stdlib); records only counted.
  ap   (optional, not in the default set) the same floor with the five resources read
       concurrently, one session per resource -- the project's source reads its resources in
       parallel too (`parallelized: True`).
  b    the seed integration spec's config (benchmarks/seed_config.py) with plain dlt
       `rest_api_source` into a fresh DuckDB with dlt's default loader (insert_values).
  c2   the project's `crm` source with plain dlt: `crm_pipeline()` + `run_options()`, run inside
       `sync_tuning()` as a Dagster run is.
  c    the project through Dagster: `dagster asset materialize -m crm_assets.definitions
       --select '*'` with a temporary DAGSTER_HOME (holding a copy of the repository's
       dagster.yaml, if there is one, as `make dev` does; --no-dagster-yaml for none).
  au   (optional) the audit (crm_assets/sources/audit.py, as job crm_audit runs it, without
       Dagster): a full sync (c') prepares its warehouse, unmeasured; then --audit-changes edits
       and hard deletes per resource at the API; then the measured audit lists every resource,
       compares, repairs and marks. Run it next to c' with --fields-param (the API honours
       `fields=`, so the listing carries keys and dates only): `--only c2,au --fields-param`.

For each: wall time of the process (start to exit, imports included), the sync time measured
inside it where there is one, records (distinct ids) and rows (every row of every table of the
dataset (child tables, were there any, included), dlt's own `_dlt_*` tables excluded; for a, rows = records),
records/s and rows/s on the wall time, peak RSS of the process tree (VmRSS of the process and all
its descendants summed, polled every ~50 ms), VmHWM of the main process (polled likewise), CPU
seconds of the tree (rusage) and of the simulator (/proc), the API requests it made (the
simulator's own count, `size=0` counts included), and completeness: distinct ids landed / the
API's count, per resource.

    python benchmarks/bench.py                                  # 109,000 records, latency 0
    python benchmarks/bench.py --latency-ms 50 --json out.json
    python benchmarks/bench.py --records 1000000 --only c2,c
    python benchmarks/bench.py --counts jobs=20000,tasks=30000 --page-cap 250 --repeat 3
    python benchmarks/bench.py --only c2 --profile c2           # + where the CPU goes (py-spy)
    python benchmarks/bench.py --only c2,au --fields-param      # a full sync next to an audit
    python benchmarks/bench.py --latency-scenario               # slices against latency

--latency-scenario (reads that hide latency): activities 200,000 records and the four
others 2,000 each, at each of --latencies (default 0,50,100,200 ms; set live on one simulator).
Per latency: (a) the sequential HTTP floor, (c') the project's sync read sequentially
(SOURCES__CRM__MAX_IN_FLIGHT=1: no slices, one request at a time per resource) and (c') as
configured (slices, 8 in flight). Each reports the sync's seconds (inside the process: the run
without imports or Dagster), records/s, API requests and the simulator's peak requests in flight;
and the floors: the sequential reader, and the ideal pages / in-flight limit x round trip (the
unsliced read's requests, the round trip as the floor measured it). At the first latency, one
more sliced sync runs through a 429 storm (--storm-seconds, default 10: every request answers
429 with Retry-After: 1 for that long): it must slow down, not fail, within the in-flight limit.

Everything temporary lives in one tempfile.mkdtemp() directory, removed at the end; the
simulator and a running variant are stopped on errors and Ctrl-C too. Only the standard library
is needed in this process (duckdb for the row counts, which the project installs anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from process_tree import tree_pids  # noqa: E402

API_KEY = "bench-key"
RESULT_WINDOW = 10_000
PAGE_SIZE = 1000  # the contract's documented maximum
POLL_SECONDS = 0.05

# (name, path, records key) -- api-contract.md's endpoint table.
RESOURCES: tuple[tuple[str, str, str], ...] = (
    ("jobs", "/v1/jobs", "results"),
    ("contacts", "/v1/contacts", "results"),
    ("tasks", "/v1/tasks", "results"),
    ("activities", "/v1/activities", "activity"),
    ("files", "/v1/files", "files"),
)
RESOURCE_NAMES = [name for name, _, _ in RESOURCES]
# The default spread (109,000 records); --records N keeps these proportions.
DEFAULT_COUNTS = {"jobs": 20_000, "contacts": 25_000, "tasks": 30_000, "activities": 24_000, "files": 10_000}

VARIANTS = ("a", "ap", "b", "c2", "c", "au")
DEFAULT_VARIANTS = ("a", "b", "c2", "c")
TITLES = {
    "a": "(a) HTTP floor, 1 session",
    "ap": "(a') HTTP floor, 5 concurrent",
    "b": "(b) seed config, plain dlt",
    "c2": "(c') project source, plain dlt",
    "c": "(c) project via Dagster",
    "au": "(au) audit after a sync, plain dlt",
}
DATASETS = {"b": "crm_seed", "c2": "crm", "c": "crm", "au": "crm"}
PROJECT_PIPELINE = "crm_warehouse"  # crm_assets.sources.crm_pipeline.PIPELINE_NAME
SEED_PIPELINE = "crm_seed_spec"

# Connection settings the variants get from us; anything like them in our environment is dropped.
_DROPPED_ENV_PREFIXES = ("SOURCES__", "DESTINATION__", "DLT_", "DAGSTER_HOME", "API_KEY", "CRM_DESTINATION")


# ============================================================================ workers
# Each runs in its own process (`bench.py --worker NAME ...`) and writes a JSON result file.


class _FloorReader:
    """Reads one resource completely by the contract's rules; counts, never keeps, records."""

    def __init__(self, session: Any, base_url: str, path: str, key: str, loads: Callable[[bytes], Any]):
        self.session, self.url, self.key, self.loads = session, base_url + path, key, loads
        self.records = self.duplicates = self.pages = self.windows = self.bytes = 0

    def run(self) -> "_FloorReader":
        headers = {"Authorization": f"Bearer {API_KEY}"}
        window_start: Optional[int] = None
        offset = 0
        self.windows = 1
        # ids of the records read with date_created == the newest date_created seen (the tail);
        # at a window switch they are the only records the next window reads again
        tail_dc: Optional[int] = None
        tail_ids: set[str] = set()
        boundary_ids: set[str] = set()  # the previous window's tail, while the new one re-reads it
        while True:
            params: dict[str, Any] = {
                "sort_field": "date_created", "sort_direction": "asc",
                "from": offset, "size": min(PAGE_SIZE, RESULT_WINDOW - offset),
            }
            if window_start is not None:
                params["filter"] = json.dumps(
                    {"must": [{"range": {"date_created": {"gte": window_start}}}]}, separators=(",", ":"))
            response = self.session.get(self.url, params=params, headers=headers, timeout=120)
            response.raise_for_status()
            content = response.content
            self.bytes += len(content)
            body = self.loads(content)
            page = body[self.key]
            count = body["count"]
            self.pages += 1
            if not page:
                if offset < count:
                    raise RuntimeError(f"{self.url}: empty page at from={offset} with count={count}")
                return self
            self.records += len(page)
            if boundary_ids:  # the first records of a new window may repeat the previous tail
                for record in page:
                    if record["date_created"] != window_start:
                        boundary_ids = set()
                        break
                    if record["id"] in boundary_ids:
                        self.duplicates += 1
            # keep the tail: records at the end of this page sharing the last date_created
            last_dc = page[-1]["date_created"]
            if page[0]["date_created"] == last_dc and last_dc == tail_dc:
                tail_ids.update(record["id"] for record in page)
            else:
                tail_dc, tail_ids = last_dc, set()
                for record in reversed(page):
                    if record["date_created"] != last_dc:
                        break
                    tail_ids.add(record["id"])
            offset += len(page)
            if offset >= count:
                return self
            if offset >= RESULT_WINDOW:
                if window_start is not None and last_dc <= window_start:
                    raise RuntimeError(f"{self.url}: over {RESULT_WINDOW} records share date_created={last_dc}")
                window_start, offset, boundary_ids = last_dc, 0, set(tail_ids)
                self.windows += 1

    @property
    def distinct(self) -> int:
        return self.records - self.duplicates


def _json_loads(parser: str) -> tuple[str, Callable[[bytes], Any]]:
    if parser == "orjson":
        try:
            import orjson

            return f"orjson {orjson.__version__}", orjson.loads
        except ImportError:
            pass
    return "stdlib json", json.loads


def worker_floor(args: argparse.Namespace, concurrent: bool) -> dict[str, Any]:
    import requests

    parser, loads = _json_loads(args.floor_json)
    started = time.perf_counter()
    readers: dict[str, _FloorReader] = {}
    if concurrent:
        from concurrent.futures import ThreadPoolExecutor

        def read(resource: tuple[str, str, str]) -> _FloorReader:
            with requests.Session() as session:
                return _FloorReader(session, args.url, resource[1], resource[2], loads).run()

        with ThreadPoolExecutor(max_workers=len(RESOURCES)) as pool:
            for (name, _, _), reader in zip(RESOURCES, pool.map(read, RESOURCES)):
                readers[name] = reader
    else:
        with requests.Session() as session:
            for name, path, key in RESOURCES:
                readers[name] = _FloorReader(session, args.url, path, key, loads).run()
    elapsed = time.perf_counter() - started
    return {
        "sync_seconds": elapsed,
        "records_read": sum(r.records for r in readers.values()),
        "distinct_ids": {name: r.distinct for name, r in readers.items()},
        "pages": sum(r.pages for r in readers.values()),
        "windows": {name: r.windows for name, r in readers.items()},
        "http_mb": sum(r.bytes for r in readers.values()) / 1e6,
        "json_parser": parser,
    }


def _trace_windows(trace: Any) -> dict[str, list[float]]:
    """Each dlt step's [start, end] as epoch seconds, to tell which step memory peaked in."""
    return {step.step: [step.started_at.timestamp(), step.finished_at.timestamp()]
            for step in getattr(trace, "steps", None) or [] if step.started_at and step.finished_at}


def _trace_phases(trace: Any) -> dict[str, float]:
    phases: dict[str, float] = {}
    for step in getattr(trace, "steps", None) or []:
        if step.started_at and step.finished_at:
            phases[step.step] = phases.get(step.step, 0.0) + (step.finished_at - step.started_at).total_seconds()
    return phases


def _load_formats(load_info: Any) -> list[str]:
    formats: set[str] = set()
    for package in getattr(load_info, "load_packages", None) or []:
        for jobs in package.jobs.values():
            for job in jobs:
                if not job.job_file_info.table_name.startswith("_dlt"):
                    formats.add(job.job_file_info.file_format)
    return sorted(formats)


def worker_seed(args: argparse.Namespace) -> dict[str, Any]:
    import dlt
    from dlt.sources.rest_api import rest_api_source

    import seed_config

    rejection = seed_config.verbatim_rejection(args.url)  # token from dlt.secrets, as in the spec
    config = seed_config.runnable_seed_config(args.url)
    pipeline = dlt.pipeline(pipeline_name=SEED_PIPELINE, destination="duckdb", dataset_name=DATASETS["b"])
    started = time.perf_counter()
    info = pipeline.run(rest_api_source(config))  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    return {
        "sync_seconds": elapsed,
        "phases": _trace_phases(pipeline.last_trace),
        "phase_windows": _trace_windows(pipeline.last_trace),
        "load_formats": _load_formats(info),
        "verbatim_rejection": rejection,
        "fixes": seed_config.FIXES,
    }


def worker_project(args: argparse.Namespace) -> dict[str, Any]:
    from crm_assets.sources.crm import crm
    from crm_assets.sources.crm_pipeline import crm_pipeline
    from crm_assets.sources.destination import run_options

    from crm_assets.sources.tuning import sync_tuning

    pipeline = crm_pipeline()
    options = run_options(pipeline)
    started, cpu = time.perf_counter(), time.process_time()
    with sync_tuning():
        info = pipeline.run(crm(), **options)
    elapsed = time.perf_counter() - started
    return {
        "sync_seconds": elapsed,
        "sync_cpu_seconds": time.process_time() - cpu,  # user + sys of every thread, during the sync
        "phases": _trace_phases(pipeline.last_trace),
        "phase_windows": _trace_windows(pipeline.last_trace),
        "load_formats": _load_formats(info),
        "run_options": options,
    }


def worker_audit(args: argparse.Namespace) -> dict[str, Any]:
    """The audit of every resource, on the warehouse a sync (c') left in this directory."""
    from crm_assets.sources.audit import audit
    from crm_assets.sources.crm.audit import audit_settings
    from crm_assets.sources.crm_pipeline import crm_pipeline
    from crm_assets.sources.run_lock import exclusive_run
    from crm_assets.sources.tuning import sync_tuning

    started = time.perf_counter()
    with exclusive_run() as connection, sync_tuning():
        settings = audit_settings()
        results = audit(crm_pipeline(connection=connection), settings, [endpoint.name for endpoint in settings.endpoints])
    elapsed = time.perf_counter() - started
    return {
        "sync_seconds": elapsed,
        "audit": {name: {**result.metadata(), "passed": result.passed, "problem": result.problem}
                  for name, result in results.items()},
    }


def worker_inspect(args: argparse.Namespace) -> dict[str, Any]:
    """After (c): the dlt trace the Dagster run left behind, and the run's own start/end."""
    result: dict[str, Any] = {}
    try:
        import dlt

        pipeline = dlt.attach(PROJECT_PIPELINE)
        trace = pipeline.last_trace
        result["phases"] = _trace_phases(trace)
        result["phase_windows"] = _trace_windows(trace)
        load_step = next((s for s in reversed(trace.steps) if s.step == "load"), None) if trace else None
        if load_step is not None and load_step.step_info is not None:
            result["load_formats"] = _load_formats(load_step.step_info)
    except Exception as exc:  # informative only
        result["dlt_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from dagster import DagsterInstance

        with DagsterInstance.get() as instance:
            runs = instance.get_runs(limit=1)
            if runs:
                stats = instance.get_run_stats(runs[0].run_id)
                if stats.start_time and stats.end_time:
                    result["run_seconds"] = stats.end_time - stats.start_time
                steps = instance.get_run_step_stats(runs[0].run_id)
                result["step_seconds"] = {
                    s.step_key: s.end_time - s.start_time for s in steps if s.start_time and s.end_time}
                if stats.start_time:  # when each step started and ended, seconds after RUN_START
                    result["step_timeline"] = {
                        s.step_key: [round(s.start_time - stats.start_time, 2), round(s.end_time - stats.start_time, 2)]
                        for s in steps if s.start_time and s.end_time}
    except Exception as exc:
        result["dagster_error"] = f"{type(exc).__name__}: {exc}"
    return result


def run_worker(args: argparse.Namespace) -> int:
    workers: dict[str, Callable[[], dict[str, Any]]] = {
        "a": lambda: worker_floor(args, concurrent=False),
        "ap": lambda: worker_floor(args, concurrent=True),
        "b": lambda: worker_seed(args),
        "c2": lambda: worker_project(args),
        "au": lambda: worker_audit(args),
        "inspect": lambda: worker_inspect(args),
    }
    result = workers[args.worker]()
    Path(args.out).write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


# ============================================================================ measuring


def _read_status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0.0


class Runner:
    """Starts the child processes, remembers them, and stops them (by their own ids) on exit."""

    def __init__(self, tmp: Path, max_rss_mb: float, timeout: float) -> None:
        self.tmp, self.max_rss_mb, self.timeout = tmp, max_rss_mb, timeout
        self.current: Optional[subprocess.Popen] = None
        self.simulator: Optional[subprocess.Popen] = None

    def measure(self, cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict[str, Any]:
        """Run `cmd` to completion; wall time, peak tree RSS, main VmHWM, tree CPU."""
        peak_tree_kb = main_hwm_kb = samples = 0
        timeline: list[tuple[float, int]] = []
        killed = None
        with open(log, "wb") as out:
            started = time.monotonic()
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self.current = proc
            try:
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    tree_kb = sum(_read_status_kb(p, b"VmRSS:") for p in tree_pids(proc.pid))
                    peak_tree_kb = max(peak_tree_kb, tree_kb)
                    timeline.append((time.time(), tree_kb))
                    main_hwm_kb = max(main_hwm_kb, _read_status_kb(proc.pid, b"VmHWM:"))
                    samples += 1
                    if killed is None and tree_kb / 1024 > self.max_rss_mb:
                        killed = f"killed: process tree RSS {tree_kb / 1024:.0f} MB > --max-rss-mb {self.max_rss_mb:.0f}"
                        self._signal_group(proc, signal.SIGKILL)
                    elif killed is None and time.monotonic() - started > self.timeout:
                        killed = f"killed: still running after --timeout {self.timeout:.0f} s"
                        self._signal_group(proc, signal.SIGKILL)
                    time.sleep(POLL_SECONDS)
            except BaseException:
                self._kill_group(proc)
                raise
            wall = time.monotonic() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.current = None
        return {
            "returncode": proc.returncode,
            "wall_seconds": wall,
            "peak_tree_rss_mb": peak_tree_kb / 1024,
            # VmHWM of the main process, last read <= 50 ms before it exited. (Its rusage
            # ru_maxrss is no good here: Linux folds in the RSS of this process at fork time.)
            "main_vmhwm_mb": main_hwm_kb / 1024,
            # rusage of a reaped child includes the children it reaped itself
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "rss_samples": samples,
            "rss_timeline": timeline,
            "killed": killed,
        }

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the session we started it in: it and everything it started
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        """Stop a child we started in its own session, with everything it started."""
        from crm_assets.simulator.process import stop_group

        stop_group(proc, ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)))

    def start_simulator(self, counts: dict[str, int], latency_ms: float, page_cap: Optional[int],
                        fields_param: bool = False) -> str:
        from crm_assets.simulator.process import start_simulator  # here: the workers import this file

        args = ["--latency-ms", str(latency_ms),
                "--records", ",".join(f"{name}={counts[name]}" for name in RESOURCE_NAMES)]
        if page_cap:
            args += ["--page-cap", str(page_cap)]
        if fields_param:
            args += ["--fields-param"]
        log = self.tmp / "simulator.log"
        with open(log, "wb") as output:  # the child keeps its own copy of the fd
            try:
                self.simulator, url = start_simulator(self.tmp / "simulator.url", *args, api_key=API_KEY,
                                                      cwd=ROOT, output=output)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')[-2000:]}") from None
        return url

    def stop_all(self) -> None:
        if self.current is not None and self.current.returncode is None:
            self._kill_group(self.current)
            self.current = None
        if self.simulator is not None:
            self._kill_group(self.simulator)
        self.simulator = None


# ============================================================================ the benchmark


def _loadavg() -> str:
    """1-minute load average: other work on the machine skews every number here."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def revision() -> str:
    """The commit measured, and whether the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "crm_assets"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return (head + (" + uncommitted changes in crm_assets/" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _admin(url: str, path: str, body: Optional[dict[str, Any]] = None) -> Any:
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(f"{url}{path}", data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def api_requests(url: str) -> int:
    """Every /v1 request the simulator has answered so far."""
    return sum(_admin(url, "/_admin/stats")["requests"].values())


def api_counts(url: str) -> dict[str, int]:
    counts = {}
    for name, path, _ in RESOURCES:
        request = urllib.request.Request(f"{url}{path}?size=0", headers={"Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            counts[name] = int(json.loads(response.read())["count"])
    return counts


def database_counts(database: Path, dataset: str) -> dict[str, Any]:
    """Rows in every table of the dataset (dlt's _dlt_* excluded), distinct ids per resource."""
    import duckdb

    with duckdb.connect(str(database), read_only=True) as connection:
        tables = [name for (name,) in connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ? ORDER BY 1",
            [dataset]).fetchall() if not name.startswith("_dlt")]
        rows = {t: connection.execute(f'SELECT COUNT(*) FROM "{dataset}"."{t}"').fetchone()[0] for t in tables}
        distinct = {name: (connection.execute(f'SELECT COUNT(DISTINCT id) FROM "{dataset}"."{name}"').fetchone()[0]
                           if name in rows else 0) for name in RESOURCE_NAMES}
    return {"table_rows": rows, "rows": sum(rows.values()), "distinct_ids": distinct}


def variant_env(workdir: Path, url: str, dagster_yaml: Optional[Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV_PREFIXES)}
    dagster_home = workdir / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    if dagster_yaml is not None:  # the instance settings `make dev` uses (pools, run retries)
        shutil.copy(dagster_yaml, dagster_home / "dagster.yaml")
    env.update({
        "SOURCES__CRM__BASE_URL": url,
        "SOURCES__CRM__API_KEY": API_KEY,
        "API_KEY": API_KEY,  # the seed spec reads dlt.secrets["api_key"]
        "DLT_DATA_DIR": str(workdir / "dlt"),
        "DAGSTER_HOME": str(dagster_home),
        "RUNTIME__DLTHUB_TELEMETRY": "false",
        "DAGSTER_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def variant_command(variant: str, args: argparse.Namespace, url: str, out: Path) -> list[str]:
    if variant == "c":
        dagster = Path(sys.executable).parent / "dagster"
        prefix = [str(dagster)] if dagster.exists() else [sys.executable, "-m", "dagster"]
        return prefix + ["asset", "materialize", "-m", "crm_assets.definitions", "--select", "*"]
    return [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--url", url,
            "--out", str(out), "--floor-json", args.floor_json]


def run_variant(variant: str, label: str, runner: Runner, args: argparse.Namespace, url: str,
                counts: dict[str, int], wrap: Optional[Callable[[list[str], Path], list[str]]] = None
                ) -> dict[str, Any]:
    workdir = runner.tmp / label
    workdir.mkdir(parents=True)
    env = variant_env(workdir, url, None if args.no_dagster_yaml or not (ROOT / "dagster.yaml").exists()
                      else ROOT / "dagster.yaml")
    database = workdir / f"{variant}_warehouse.duckdb"  # not crm.duckdb: catalog and schema would clash
    env["DESTINATION__DUCKDB__CREDENTIALS"] = str(database)
    env.update(args.env)
    out, log = workdir / "result.json", workdir / "output.log"
    if variant == "au":  # its warehouse: a full sync, not measured, then changes at the API
        prepared = subprocess.run(variant_command("c2", args, url, workdir / "sync.json"), env=env, cwd=workdir,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=args.timeout)
        if prepared.returncode != 0:
            raise RuntimeError(f"the audit's preparing sync failed (exit code {prepared.returncode})")
        for name in RESOURCE_NAMES if args.audit_changes else ():
            _admin(url, "/_admin/mutate", {"resource": name, "edit": args.audit_changes,
                                           "delete": args.audit_changes})
    cmd = variant_command(variant, args, url, out)
    if wrap is not None:
        cmd = wrap(cmd, workdir)
    simulator_cpu = _cpu_seconds(runner.simulator.pid) if runner.simulator else 0.0
    requests_before = api_requests(url)
    result = runner.measure(cmd, env, workdir, log)
    result["requests"] = api_requests(url) - requests_before
    timeline = result.pop("rss_timeline")
    result["api_cpu_seconds"] = (_cpu_seconds(runner.simulator.pid) if runner.simulator else 0.0) - simulator_cpu
    result["variant"] = variant
    if result["returncode"] != 0 or result["killed"]:
        tail = log.read_text(errors="replace")[-3000:]
        result["error"] = result["killed"] or f"exit code {result['returncode']}"
        result["log_tail"] = tail
        print(f"  !! {TITLES[variant]} failed ({result['error']}); last output:\n{tail}", file=sys.stderr)
        return result
    if out.exists():
        result.update(json.loads(out.read_text(encoding="utf-8")))
    if variant == "c":
        inspect = workdir / "inspect.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "inspect", "--out", str(inspect)],
                       env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
                       check=False)
        if inspect.exists():
            result.update(json.loads(inspect.read_text(encoding="utf-8")))
        result["sync_seconds"] = result.get("run_seconds")
    windows = result.pop("phase_windows", None) or {}
    result["peak_rss_mb_by_step"] = {
        step: max((kb for t, kb in timeline if start <= t <= end), default=0) / 1024
        for step, (start, end) in windows.items() if step != "run"}
    if variant in DATASETS:
        result.update(database_counts(database, DATASETS[variant]))
    else:
        result["rows"] = sum(result["distinct_ids"].values())  # for (a), rows = records
    result["records"] = sum(result["distinct_ids"].values())
    result["completeness"] = {name: (result["distinct_ids"].get(name, 0) / counts[name] if counts[name] else 1.0)
                              for name in RESOURCE_NAMES}
    result["completeness_total"] = result["records"] / max(1, sum(counts.values()))
    result["records_per_s"] = result["records"] / result["wall_seconds"]
    result["rows_per_s"] = result["rows"] / result["wall_seconds"]
    if not args.keep_temp:
        shutil.rmtree(workdir / "dlt", ignore_errors=True)
        for leftover in workdir.glob("*.duckdb*"):
            leftover.unlink()
    return result


_SCALARS = ("wall_seconds", "sync_seconds", "records", "rows", "records_per_s", "rows_per_s", "peak_tree_rss_mb",
            "main_vmhwm_mb", "cpu_seconds", "sync_cpu_seconds", "api_cpu_seconds", "completeness_total", "run_seconds", "http_mb",
            "records_read", "pages", "requests")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the scalars over the repeats; everything else from the run of median wall time."""
    ok = [r for r in runs if not r.get("error")]
    if not ok:
        return {**runs[-1], "runs": len(runs), "failed_runs": len(runs)}
    ok.sort(key=lambda r: r["wall_seconds"])
    summary = dict(ok[len(ok) // 2])
    for key in _SCALARS:
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if values:  # counts stay whole numbers
            ints = all(isinstance(v, int) for v in values)
            summary[key] = statistics.median_low(values) if ints else statistics.median(values)
    phase_names = {p for r in ok for p in (r.get("phases") or {})}
    summary["phases"] = {p: statistics.median([(r.get("phases") or {}).get(p, 0.0) for r in ok]) for p in phase_names}
    summary["runs"] = len(runs)
    summary["failed_runs"] = len(runs) - len(ok)
    failed = [r for r in runs if r.get("error")]
    if failed:
        summary["failure"] = {"error": failed[0]["error"], "log_tail": failed[0].get("log_tail", "")}
    return summary


# ============================================================================ reporting


def _f(value: Any, fmt: str = "{:,.1f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "–"


def render(report: dict[str, Any]) -> str:
    p = report["parameters"]
    counts = report["api_counts"]
    lines = [
        f"## CRM sync benchmark: {sum(counts.values()):,} records "
        f"({', '.join(f'{k} {v:,}' for k, v in counts.items())}), latency {p['latency_ms']:g} ms"
        + (f", page cap {p['page_cap']}" if p["page_cap"] else "")
        + (", the API honours fields=" if p.get("fields_param") else "")
        + (f", median of {p['repeat']}" if p["repeat"] > 1 else "")
        + f" (crm_assets at {p['revision']}; {p['cpus']} CPUs, load average {p['loadavg_before']} before, "
          f"{p['loadavg_after']} after; Python {p['python']})"
        + (f"; extra environment: {', '.join(f'{k}={v}' for k, v in p['extra_env'].items())}" if p["extra_env"] else ""),
        "",
        "| variant | wall s | sync s | records (distinct ids) | rows (all tables) | records/s | rows/s "
        "| peak RSS tree MB | VmHWM main MB | CPU s | API CPU s | API requests | complete |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    variants = report["variants"]
    for v, s in variants.items():
        if s.get("failed_runs") == s.get("runs"):
            lines.append(f"| {TITLES[v]} | FAILED: {s.get('error')} | | | | | | {_f(s.get('peak_tree_rss_mb'), '{:,.0f}')} "
                         f"| {_f(s.get('main_vmhwm_mb'), '{:,.0f}')} | | | |")
            continue
        lines.append(
            f"| {TITLES[v]} | {_f(s['wall_seconds'], '{:,.2f}')} | {_f(s.get('sync_seconds'), '{:,.2f}')} "
            f"| {s['records']:,} | {s['rows']:,} | {_f(s['records_per_s'], '{:,.0f}')} | {_f(s['rows_per_s'], '{:,.0f}')} "
            f"| {_f(s['peak_tree_rss_mb'], '{:,.0f}')} | {_f(s['main_vmhwm_mb'], '{:,.0f}')} "
            f"| {_f(s['cpu_seconds'])} | {_f(s['api_cpu_seconds'])} | {_f(s.get('requests'), '{:,}')} "
            f"| {s['completeness_total']:.2%} |")
    lines += ["", "wall s: process start to exit (interpreter, imports, Dagster's CLI included); sync s: measured "
              "inside (a: the reads; b, c': pipeline.run; c: the Dagster run, RUN_START to RUN_SUCCESS). "
              "Rates use wall s. rows: every row of every table of the dataset (child tables incl.), dlt's _dlt_* "
              "tables excluded; for (a) rows = records (distinct ids read). Peak RSS tree: VmRSS of the process and all its "
              "descendants summed, polled every 50 ms. CPU s: user+sys of the process tree; API CPU s: the "
              "simulator's, during the variant (same 2 cores).", ""]

    ratios = report.get("ratios") or {}
    if ratios:
        lines += ["| ratio | value |", "|---|---:|"]
        lines += [f"| {name} | {value} |" for name, value in ratios.items()]
        lines.append("")

    lines += ["| completeness (distinct ids / API count) | API count | "
              + " | ".join(TITLES[v] for v in variants) + " |",
              "|---|---:|" + "---:|" * len(variants)]
    for name in RESOURCE_NAMES:
        cells = []
        for v, s in variants.items():
            ids = (s.get("distinct_ids") or {}).get(name)
            cells.append("–" if ids is None else f"{ids:,} ({ids / counts[name]:.1%})" if counts[name] else f"{ids:,}")
        lines.append(f"| {name} | {counts[name]:,} | " + " | ".join(cells) + " |")
    lines.append("")

    notes = []
    for v, s in variants.items():
        if s.get("failed_runs") == s.get("runs"):
            continue
        bits = []
        if s.get("phases"):
            bits.append("dlt steps: " + ", ".join(f"{k} {val:.2f}s" for k, val in s["phases"].items() if k != "run"))
        if s.get("peak_rss_mb_by_step"):
            bits.append("peak RSS tree during " + ", ".join(
                f"{k} {val:,.0f} MB" for k, val in s["peak_rss_mb_by_step"].items()))
        if s.get("load_formats"):
            bits.append("load files: " + ", ".join(s["load_formats"]))
        if s.get("json_parser"):
            bits.append(f"JSON: {s['json_parser']}, {s['pages']:,} pages, {s['http_mb']:,.1f} MB, "
                        f"{s['records_read']:,} records read (window boundaries re-read), "
                        f"windows {sum(s['windows'].values())}")
        if s.get("audit"):
            bits.append("audit: " + ", ".join(
                f"{name} {'passed' if a['passed'] else 'FAILED'} ({a['listed']:,} listed, {a['missing']} missing, "
                f"{a['stale']} stale, {a['deleted']} marked, {a['records_loaded']} loaded"
                f"{', whole records' if a['whole_records'] else ''})" for name, a in s["audit"].items()))
        if v == "c" and s.get("run_seconds") is not None:
            bits.append(f"Dagster run {s['run_seconds']:.2f}s of {s['wall_seconds']:.2f}s wall")
        if bits:
            notes.append(f"- {TITLES[v]}: " + "; ".join(bits))
    for v, s in variants.items():
        if s.get("failed_runs") and s.get("failed_runs") != s.get("runs"):
            notes.append(f"- {TITLES[v]}: {s['failed_runs']} of {s['runs']} runs FAILED ({s['failure']['error']}); "
                         "the numbers are the medians of the others")
    seed = variants.get("b")
    if seed and seed.get("fixes"):
        notes.append(f"- (b) dlt on the verbatim seed config: {seed.get('verbatim_rejection')}")
        notes.append("- (b) fixes applied (benchmarks/seed_config.py): " + "; ".join(seed["fixes"]))
    if notes:
        lines += ["Notes:", *notes, ""]
    for title, table in (report.get("profiles") or {}).items():
        lines += [title, "", table, ""]
    return "\n".join(lines)


def compute_ratios(variants: dict[str, dict[str, Any]], latency_ms: float = 0) -> dict[str, str]:
    def ok(v: str) -> bool:
        return v in variants and variants[v].get("failed_runs") != variants[v].get("runs")

    ratios: dict[str, str] = {}
    for num, den in (("c", "a"), ("c2", "a"), ("c", "ap"), ("c2", "ap"), ("b", "c"), ("b", "c2"), ("c", "c2")):
        if ok(num) and ok(den):
            wall = variants[num]["wall_seconds"] / variants[den]["wall_seconds"]
            rate = variants[num]["records_per_s"] / variants[den]["records_per_s"]
            ratios[f"{TITLES[num]} / {TITLES[den]}"] = f"{wall:.2f}x the wall time, {rate:.2f}x the records/s"
    if ok("au") and ok("c2"):
        audit, sync = variants["au"], variants["c2"]
        spare = 2 * len(RESOURCE_NAMES)  # the constant: a repair read or two per resource
        ratios[f"target: audit requests <= the full sync's (c') + {spare}"] = (
            f"{audit['requests']:,} vs {sync['requests']:,}: "
            f"{'met' if audit['requests'] <= sync['requests'] + spare else 'NOT met'}")
        ratios["target: audit wall time <= the full sync's (c')"] = (
            f"{audit['wall_seconds']:.2f} s vs {sync['wall_seconds']:.2f} s: "
            f"{'met' if audit['wall_seconds'] <= sync['wall_seconds'] else 'NOT met'}")
        ratios["target: audit peak RSS < 500 MB"] = (
            f"{audit['peak_tree_rss_mb']:,.0f} MB (c': {sync['peak_tree_rss_mb']:,.0f} MB): "
            f"{'met' if audit['peak_tree_rss_mb'] < 500 else 'NOT met'}")
    if ok("c") and ok("c2"):
        fixed = variants["c"]["wall_seconds"] - variants["c2"]["wall_seconds"]
        ratios["Dagster's cost: wall (c) − wall (c')"] = f"{fixed:+.2f} s"
    # the targets one run can show, on an API without latency (the latency target compares two
    # runs: see the README)
    if not latency_ms and ok("c") and ok("b"):
        rate = variants["c"]["records_per_s"] / variants["b"]["records_per_s"]
        ratios["target: (c) at least 4x (b)'s records/s (b reads only part of the data)"] = (
            f"{rate:.2f}x: {'met' if rate >= 4 else 'NOT met'}")
    if not latency_ms and ok("c") and ok("a"):
        wall = variants["c"]["wall_seconds"] / variants["a"]["wall_seconds"]
        ratios["target: (c) within 3x (a)'s wall time"] = f"{wall:.2f}x: {'met' if wall <= 3 else 'NOT met'}"
    for v in variants:
        if ok(v):
            ratios[f"completeness {TITLES[v]}"] = f"{variants[v]['completeness_total']:.2%}"
    return ratios


# ============================================================================ profiling

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/crm_assets/", "/lib/python3"):
        i = path.find(marker)
        if i >= 0:
            return ("crm_assets/" if marker == "/crm_assets/" else "") + path[i + len(marker):]
    return path


def _frame_name(frame: str) -> str:
    if frame.startswith("process "):  # py-spy --subprocesses: the root frame names the process
        return "process"
    match = _FRAME.match(frame)
    return f"{_short(match['file'])}:{match['func']}" if match else frame


# wrappers that sit on (nearly) every stack and say nothing about where the time goes
_BORING = ("bench.py:", "threading.py:", "concurrent/futures/", "runpy.py:", "multiprocessing/",
           "<frozen importlib._bootstrap", "decorator.<locals>", "with_schemas_sync.<locals>", ":<module>")
_OURS = ("crm_assets/",)
_BUCKETS: dict[str, Callable[[str], bool]] = {
    # dlt runs parts of each step in thread pools, so the steps are told apart by module too
    "dlt extract (incl. HTTP, our session/paginator)": lambda n: n.startswith(("dlt/extract/", "dlt/sources/"))
    or n == "dlt/pipeline/pipeline.py:Pipeline.extract",
    "dlt normalize": lambda n: n.startswith("dlt/normalize/") or n == "dlt/pipeline/pipeline.py:Pipeline.normalize",
    "dlt load (incl. DuckDB)": lambda n: n.startswith(("dlt/load/", "dlt/destinations/"))
    or n == "dlt/pipeline/pipeline.py:Pipeline.load",
    "our code (crm_assets.*, at any depth)": lambda n: n.startswith(_OURS) and "simulator" not in n,
    "HTTP client (requests, urllib3, http.client)": lambda n: n.startswith(("requests/", "urllib3/", "http/client")),
    "JSON parsing (orjson / json)": lambda n: "orjson" in n or n.startswith("json/"),
    "imports (any module import)": lambda n: n.startswith("<frozen importlib._bootstrap>:_find_and_load"),
    "dagster (any dagster frame)": lambda n: n.startswith(("dagster/", "dagster_dlt/")),
}


def summarize_pyspy(raw: Path, top: int) -> str:
    """Shares of CPU samples per function and per part, from py-spy's collapsed stacks."""
    cumulative: dict[str, int] = defaultdict(int)
    own: dict[str, int] = defaultdict(int)
    buckets = dict.fromkeys(_BUCKETS, 0)
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        names = []
        while stack.startswith("process "):  # `process PID:"command line";...`, one per process level;
            end = stack.find('";')           # the command line may hold ';'
            names.append("process")
            stack = stack[end + 2:] if end >= 0 else ""
        names += [_frame_name(frame) for frame in stack.split(";") if frame]
        if not names:
            continue
        unique = set(names)
        for name in unique:
            cumulative[name] += count
        own[names[-1]] += count
        for title, test in _BUCKETS.items():
            if any(test(n) for n in unique):
                buckets[title] += count
    if not total:
        return "(no samples)"

    def table(keys: list[str]) -> list[str]:
        out = ["| cumulative % | own % | function |", "|---:|---:|---|"]
        out += [f"| {cumulative[k] / total:.1%} | {own[k] / total:.1%} | `{k}` |" for k in keys]
        return out

    overall = sorted((k for k in cumulative if k != "process" and not any(b in k for b in _BORING)),
                     key=lambda k: -cumulative[k])
    ours = sorted((k for k in cumulative if k.startswith(_OURS) and "simulator" not in k), key=lambda k: -cumulative[k])
    by_own = sorted((k for k in own if k != "process"), key=lambda k: -own[k])
    lines = [f"{total:,} CPU samples at 100 Hz (py-spy, idle threads excluded, all processes of the tree).", "",
             "| part (a sample counts in every part on its stack) | share of CPU samples |", "|---|---:|"]
    lines += [f"| {title} | {value / total:.1%} |" for title, value in buckets.items()]
    lines += ["", f"Top {top} cumulative (wrappers, imports and module bodies left out):", ""] + table(overall[:top])
    lines += ["", f"Top {top} cumulative, our code (crm_assets):", ""] + table(ours[:top])
    lines += ["", f"Top {top} by own time:", ""] + table(by_own[:top])
    return "\n".join(lines)


def summarize_cprofile(stats_file: Path, top: int) -> str:
    import io
    import pstats

    buffer = io.StringIO()
    stats = pstats.Stats(str(stats_file), stream=buffer)
    stats.sort_stats("cumulative").print_stats(top)
    buffer.write("\n-- our code --\n")
    stats.print_stats("crm_assets", top)
    return "cProfile sees the main thread only (parallelized extraction runs in worker threads).\n```\n" \
        + buffer.getvalue() + "```"


def find_py_spy(explicit: Optional[str]) -> Optional[str]:
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def run_profiles(variants: list[str], runner: Runner, args: argparse.Namespace, url: str,
                 counts: dict[str, int]) -> dict[str, str]:
    py_spy = find_py_spy(args.py_spy)
    profiles = {}
    for variant in variants:
        if py_spy:
            def wrap(cmd: list[str], workdir: Path) -> list[str]:
                return [py_spy, "record", "--rate", "100", "--format", "raw", "--nonblocking", "--subprocesses",
                        "--output", str(workdir / "profile.txt"), "--"] + cmd
        elif variant == "c":
            print(f"  (no py-spy: cannot profile {variant})", file=sys.stderr)
            continue
        else:
            def wrap(cmd: list[str], workdir: Path) -> list[str]:
                return [cmd[0], "-m", "cProfile", "-o", str(workdir / "profile.pstats")] + cmd[1:]
        label = f"profile-{variant}"
        print(f"profiling {TITLES[variant]} ({'py-spy' if py_spy else 'cProfile'}) ...", file=sys.stderr, flush=True)
        result = run_variant(variant, label, runner, args, url, counts, wrap=wrap)
        title = (f"### Profile of {TITLES[variant]} (under the profiler: wall {result['wall_seconds']:.1f} s, "
                 f"not comparable with the table)")
        if result.get("error"):
            profiles[title] = f"failed: {result['error']}"
        elif py_spy:
            profiles[title] = summarize_pyspy(runner.tmp / label / "profile.txt", args.profile_top)
        else:
            profiles[title] = summarize_cprofile(runner.tmp / label / "profile.pstats", args.profile_top)
    return profiles


# ============================================================================ CLI


def spread(total: int) -> dict[str, int]:
    base = sum(DEFAULT_COUNTS.values())
    counts = {name: total * DEFAULT_COUNTS[name] // base for name in RESOURCE_NAMES}
    counts[RESOURCE_NAMES[-1]] += total - sum(counts.values())
    return counts


def parse_counts(text: str) -> dict[str, int]:
    counts = dict(DEFAULT_COUNTS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in counts or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad --counts item {part!r}: expected name=N, name in {RESOURCE_NAMES}")
        counts[name.strip()] = int(value)
    return counts


def parse_env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def parse_variants(text: str) -> list[str]:
    wanted = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in wanted if v not in VARIANTS]
    if bad or not wanted:
        raise argparse.ArgumentTypeError(f"variants must be from {','.join(VARIANTS)}, got {text!r}")
    return [v for v in VARIANTS if v in wanted]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--records", type=int, help="total records, spread like the default 109,000 "
                      "(jobs 20000, contacts 25000, tasks 30000, activities 24000, files 10000)")
    size.add_argument("--counts", type=parse_counts, help="per resource, e.g. jobs=20000,tasks=30000 "
                      "(others keep their defaults)")
    p.add_argument("--latency-ms", type=float, default=0, help="simulator latency per request (default 0)")
    p.add_argument("--latency-scenario", action="store_true",
                   help="the latency scenario instead: activities 200,000 + four of 2,000 at --latencies, "
                        "the sequential floor, the sequential sync and the sliced sync (see above)")
    p.add_argument("--storm-seconds", type=float, default=10,
                   help="--latency-scenario: one more sliced sync (at the first latency) through a 429 storm "
                        "of this many seconds (0: none)")
    p.add_argument("--latencies", type=parse_latencies, default=[0.0, 50.0, 100.0, 200.0],
                   help="milliseconds for --latency-scenario (default 0,50,100,200)")
    p.add_argument("--page-cap", type=int, default=None, help="simulator returns at most N records a page")
    p.add_argument("--fields-param", action="store_true", help="the simulator honours fields=a,b,c (records "
                   "carry only those keys), as the real API family documents; the audit (au) then lists keys "
                   "and dates only")
    p.add_argument("--audit-changes", type=int, default=10, help="(au) edits and hard deletes per resource at "
                   "the API between the audit's preparing sync and the audit (default 10; they stay for the "
                   "variants after it)")
    p.add_argument("--only", type=parse_variants, default=list(DEFAULT_VARIANTS),
                   help=f"variants to run, from {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant; the table shows medians")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--floor-json", choices=("orjson", "stdlib"), default="orjson",
                   help="JSON parser of the HTTP floor (default orjson, as the project's session uses)")
    p.add_argument("--profile", type=parse_variants, default=[],
                   help="after the measured runs, run these variants once more under py-spy (or cProfile) "
                        "and print where the CPU goes")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--py-spy", default=None, help="path of py-spy (default: beside python, then PATH)")
    p.add_argument("--max-rss-mb", type=float, default=16_000, help="kill a variant whose tree exceeds this")
    p.add_argument("--timeout", type=float, default=7200, help="kill a variant running longer (seconds)")
    p.add_argument("--env", type=parse_env, action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the variants, for experiments (repeatable), e.g. "
                        "--env 'SOURCES__CRM__PAGE_SIZES={\"tasks\": 100}' --env NORMALIZE__WORKERS=2")
    p.add_argument("--no-dagster-yaml", action="store_true", help="(c) with an empty temporary DAGSTER_HOME "
                   "instead of one holding the repository's dagster.yaml (as `make dev` does)")
    p.add_argument("--keep-temp", action="store_true", help="keep the DuckDB files and logs (still under "
                   "the temp dir, which is printed and NOT removed)")
    # internal: one variant inside its own process
    p.add_argument("--worker", choices=("a", "ap", "b", "c2", "au", "inspect"), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


LATENCY_COUNTS = {"jobs": 2_000, "contacts": 2_000, "tasks": 2_000, "activities": 200_000, "files": 2_000}
LATENCY_IN_FLIGHT = 8  # the default SOURCES__CRM__MAX_IN_FLIGHT


def latency_scenario(args: argparse.Namespace, runner: "Runner") -> int:
    """--latency-scenario: see the module docstring. Prints a markdown table; 1 if a run failed."""
    import copy

    counts = dict(LATENCY_COUNTS)
    url = runner.start_simulator(counts, 0, args.page_cap)
    expected = api_counts(url)
    print(f"simulator at {url}: {sum(expected.values()):,} records; latencies {args.latencies}",
          file=sys.stderr, flush=True)
    sequential = copy.copy(args)
    sequential.env = {**args.env, "SOURCES__CRM__MAX_IN_FLIGHT": "1"}
    runs = (("a", "(a) HTTP floor, sequential", args), ("c2", "(c') sync, sequential (1 in flight)", sequential),
            ("c2", f"(c') sync, slices ({LATENCY_IN_FLIGHT} in flight)", args))
    rows, failed = [], False
    notes: list[tuple[float, dict[str, str]]] = []  # the floors and ratios, per latency
    load_before = _loadavg()
    for latency in args.latencies:
        _admin(url, "/_admin/config", {"latency_ms": latency})
        results = {}
        for number, (variant, title, variant_args) in enumerate(runs):
            print(f"[{latency:g} ms] {title} ...", file=sys.stderr, flush=True)
            _admin(url, "/_admin/stats/reset", {})
            result = run_variant(variant, f"latency-{latency:g}-{number}", runner, variant_args, url, expected)
            stats = _admin(url, "/_admin/stats")
            result["peak_in_flight"] = stats["peak_in_flight"]
            result["big_requests"] = stats["requests"]["activities"]
            results[number] = result
            if result.get("error"):
                failed = True
                continue
            print(f"    sync {result['sync_seconds']:.2f} s, {result['requests']:,} requests, peak in flight "
                  f"{result['peak_in_flight']}", file=sys.stderr, flush=True)
            rows.append((latency, title, result))
        if args.storm_seconds and latency == args.latencies[0]:
            # the storm starts as the variant's process does (its imports take ~2 s of it)
            title = f"(c') sync, slices, through a {args.storm_seconds:g} s 429 storm (Retry-After: 1)"
            print(f"[{latency:g} ms] {title} ...", file=sys.stderr, flush=True)
            _admin(url, "/_admin/stats/reset", {})
            _admin(url, "/_admin/config", {"retry_after": 1, "storm_seconds": args.storm_seconds})
            stormy = run_variant("c2", f"latency-{latency:g}-storm", runner, args, url, expected)
            stats = _admin(url, "/_admin/stats")
            stormy["peak_in_flight"] = stats["peak_in_flight"]
            stormy["answered_429"] = sum(s.get("429", 0) for s in stats["statuses"].values())
            if stormy.get("error"):
                failed = True
            else:
                rows.append((latency, f"{title}: {stormy['answered_429']:,} answered 429", stormy))
        floor, unsliced, sliced = results[0], results[1], results[2]
        if not any(r.get("error") for r in results.values()):
            round_trip = floor["sync_seconds"] / max(1, floor["pages"])
            ideal = unsliced["requests"] / LATENCY_IN_FLIGHT * round_trip
            notes.append((latency, {
                "note": f"ideal {unsliced['requests']:,} requests / {LATENCY_IN_FLIGHT} x {round_trip * 1000:.1f} ms = "
                        f"{ideal:.2f} s; slices/sequential reader {sliced['sync_seconds'] / floor['sync_seconds']:.2f}x, "
                        f"slices/sequential sync {sliced['sync_seconds'] / unsliced['sync_seconds']:.2f}x; requests "
                        f"slices/unsliced {sliced['requests'] / unsliced['requests']:.2f}x (activities "
                        f"{sliced['big_requests']:,} / {unsliced['big_requests']:,})"}))
    print(f"## Latency scenario: {sum(expected.values()):,} records "
          f"({', '.join(f'{k} {v:,}' for k, v in expected.items())}), revision {revision()}\n")
    # CPU s (the process tree's user + sys, imports included) and sync CPU s (the sync's own, in its
    # process) are the figures a busy machine moves least
    print(f"Load average before: {load_before}; after: {_loadavg()}\n")
    print("| latency ms | variant | sync s | wall s | sync CPU s | CPU s | records/s (sync) | API requests | "
          "peak in flight | peak RSS MB | complete |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for latency, title, r in rows:
        sync_cpu = f"{r['sync_cpu_seconds']:.2f}" if "sync_cpu_seconds" in r else ""
        print(f"| {latency:g} | {title} | {r['sync_seconds']:.2f} | {r['wall_seconds']:.2f} | {sync_cpu} | "
              f"{r['cpu_seconds']:.1f} | "
              f"{r['records'] / r['sync_seconds']:,.0f} | {r['requests']:,} | {r['peak_in_flight']} | "
              f"{r['peak_tree_rss_mb']:,.0f} | {r['completeness_total']:.0%} |")
    print("\nFloors (sync s of the sequential reader above, and the ideal) and ratios of sync s:\n")
    for latency, note in notes:
        print(f"- {latency:g} ms: {note['note']}")
    return 1 if failed else 0


def parse_latencies(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds like 0,50,200, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected milliseconds >= 0 like 0,50,200, got {text!r}")
    return values


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.env = dict(args.env)
    if args.worker:
        return run_worker(args)
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    counts = spread(args.records) if args.records is not None else (args.counts or dict(DEFAULT_COUNTS))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    tmp = Path(tempfile.mkdtemp(prefix="crm-bench-"))
    runner = Runner(tmp, args.max_rss_mb, args.timeout)
    status = 0
    try:
        if args.latency_scenario:
            return latency_scenario(args, runner)
        load_before = _loadavg()
        url = runner.start_simulator(counts, args.latency_ms, args.page_cap, args.fields_param)
        expected = api_counts(url)
        print(f"simulator at {url}: {sum(expected.values()):,} records, latency {args.latency_ms:g} ms; "
              f"variants {','.join(args.only)} x {args.repeat}", file=sys.stderr, flush=True)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.only}
        for repeat in range(args.repeat):
            for variant in args.only:
                print(f"[{repeat + 1}/{args.repeat}] {TITLES[variant]} ...", file=sys.stderr, flush=True)
                result = run_variant(variant, f"{variant}-{repeat}", runner, args, url, expected)
                runs[variant].append(result)
                if not result.get("error"):
                    print(f"    {result['wall_seconds']:.2f} s, {result['records']:,} records, {result['rows']:,} rows, "
                          f"peak RSS {result['peak_tree_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        variants = {v: summarize(r) for v, r in runs.items()}
        report: dict[str, Any] = {
            "parameters": {"revision": revision(), "loadavg_before": load_before, "loadavg_after": _loadavg(),
                           "counts": counts, "extra_env": args.env, "latency_ms": args.latency_ms, "page_cap": args.page_cap,
                           "fields_param": args.fields_param,
                           "repeat": args.repeat, "variants": args.only, "floor_json": args.floor_json,
                           "python": sys.version.split()[0], "cpus": os.cpu_count()},
            "api_counts": expected,
            "variants": variants,
            "ratios": compute_ratios(variants, args.latency_ms),
        }
        if args.profile:
            report["profiles"] = run_profiles(args.profile, runner, args, url, expected)
        for v, r in runs.items():
            report["variants"][v]["all_runs"] = [
                {k: x.get(k) for k in _SCALARS + ("error",) if k in x} for x in r]
        print(render(report), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        if any(s.get("failed_runs") for s in variants.values()):
            status = 1
    except KeyboardInterrupt:
        print("interrupted: stopping the simulator and the running variant", file=sys.stderr)
        status = 130
    finally:
        runner.stop_all()
        if args.keep_temp:
            print(f"temporary files kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
