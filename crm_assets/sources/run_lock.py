"""One run of a pipeline at a time on this machine, and a DuckDB file no one else holds.

Two runs of the same dlt pipeline at once share its working folder (dagster-dlt even deletes it
at the start of every run) and, on DuckDB, a file that admits a single writer. The second run
therefore waits for the first, saying so in the log, instead of corrupting either. Across
machines, Dagster's `crm_warehouse` pool and run tags do the same job.

What is locked: the pipeline (its working folder), and on DuckDB also the file (every pipeline
writing it, so accounts sharing one file take turns: DuckDB admits one writer). On PostgreSQL each
account's own pipeline (crm/accounts.py) has its own lock, and different accounts sync at once.

A DuckDB file can also be held by a process that is no run at all: an analyst's notebook or the
DuckDB CLI with the file open. DuckDB then refuses every other connection, and dlt reports it as a
credentials problem. So a run waits for the file too, naming the process that holds it every so
often, up to `CRM_WAREHOUSE_WAIT_SECONDS`, then fails saying what to do.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Optional

from dlt.common.pipeline import get_dlt_pipelines_dir

from .crm.errors import CrmConfigurationError, CrmError
from .crm_pipeline import PIPELINE_NAME
from .destination import duckdb_path, selected_destination

if TYPE_CHECKING:
    from duckdb import DuckDBPyConnection

logger = logging.getLogger("crm_assets.sources.run_lock")

DEFAULT_WAIT_SECONDS = 3600.0
WAREHOUSE_WAIT_ENV = "CRM_WAREHOUSE_WAIT_SECONDS"
DEFAULT_WAREHOUSE_WAIT_SECONDS = 300.0
WAREHOUSE_WAIT_LOG_EVERY = 15.0  # seconds between two lines naming the process still holding it
# DuckDB's own words: 'Conflicting lock is held in /usr/bin/python3 (PID 1234)'
_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.+?) \(PID (?P<pid>\d+)\)")


class CrmRunLockTimeout(CrmError):
    """Another run kept the pipeline for longer than this run was willing to wait."""


class CrmWarehouseBusy(CrmRunLockTimeout):
    """Another process kept the DuckDB file open for longer than this run was willing to wait."""


def lock_path(pipelines_dir: Optional[str] = None, pipeline_name: str = PIPELINE_NAME) -> str:
    """The lock file of the pipeline `pipeline_name` on this machine."""
    return os.path.join(pipelines_dir or get_dlt_pipelines_dir(), f"{pipeline_name}.lock")


def duckdb_lock_path(pipelines_dir: Optional[str] = None) -> Optional[str]:
    """The lock file of the DuckDB file a sync writes now, shared by every pipeline writing it
    (accounts sharing one file); None when the warehouse is no DuckDB file."""
    try:
        database = duckdb_path() if selected_destination() == "duckdb" else None
    except CrmError:
        return None  # an unknown destination: the run fails on it with its own message
    if database is None:
        return None
    digest = hashlib.sha1(database.encode("utf-8")).hexdigest()[:12]
    return os.path.join(pipelines_dir or get_dlt_pipelines_dir(), f"duckdb_{digest}.lock")


@contextmanager
def _held(path: str, what: str, wait_seconds: float) -> Iterator[None]:
    """Hold the lock file `path` for this block, waiting (and saying so) while another run does."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as handle:
        started = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    logger.warning(
                        "Another run of %s is in progress on this machine; waiting for it to finish "
                        "(lock %s)", what, path,
                    )
                    announced = True
                if time.monotonic() - started > wait_seconds:
                    raise CrmRunLockTimeout(
                        f"Another run of {what} held {path} for more than {wait_seconds:.0f}s; not "
                        "starting a second writer"
                    ) from None
                time.sleep(0.5)
        if announced:
            logger.warning("The other run finished after %.1fs; starting", time.monotonic() - started)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def exclusive_run(
    pipelines_dir: Optional[str] = None,
    wait_seconds: float = DEFAULT_WAIT_SECONDS,
    pipeline_name: str = PIPELINE_NAME,
) -> Iterator[Optional[DuckDBPyConnection]]:
    """Hold the pipeline `pipeline_name`, and on DuckDB its file, for this block (always in that
    order, so two runs never wait on each other's second lock). Create the pipeline object inside
    the block: even `dlt.pipeline()` reads a working folder that a running sync may be deleting.

    Yields the DuckDB file's connection, open for the block and closed after it (None when the
    warehouse is no DuckDB file): the block's pipeline takes it (`crm_pipeline(connection=...)`),
    so that its steps share one connection. Each step would otherwise open and close the file,
    and each open and close costs CPU that grows with the file's tables (figures in
    benchmarks/README.md)."""
    with _held(lock_path(pipelines_dir, pipeline_name), f"pipeline {pipeline_name}", wait_seconds):
        database_lock = duckdb_lock_path(pipelines_dir)
        with ExitStack() as held:
            if database_lock is not None:
                held.enter_context(
                    _held(database_lock, "a pipeline writing the same DuckDB file", wait_seconds)
                )
            connection = open_duckdb_file()
            if connection is not None:
                held.callback(connection.close)
            yield connection


def warehouse_wait_seconds() -> float:
    raw = os.environ.get(WAREHOUSE_WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WAREHOUSE_WAIT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise CrmConfigurationError(f"{WAREHOUSE_WAIT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return seconds


def open_duckdb_file(wait_seconds: Optional[float] = None) -> Optional[DuckDBPyConnection]:
    """The sync's DuckDB file, opened for writing (created when it does not exist yet), once no
    other process holds it: wait while one does. None when the warehouse is no DuckDB file, or
    the file's folder does not exist (dlt then says what is wrong)."""
    try:
        path = duckdb_path() if selected_destination() == "duckdb" else None
    except CrmError:
        return None  # an unknown destination: the run fails on it with its own message
    if path is None or not os.path.isdir(os.path.dirname(path)):
        return None
    import duckdb  # only for a DuckDB warehouse, and only at run time

    limit = warehouse_wait_seconds() if wait_seconds is None else wait_seconds
    started = time.monotonic()
    next_line = started
    held = False
    while True:
        try:
            connection = duckdb.connect(path)
        except duckdb.IOException as exc:
            holder = _HOLDER.search(str(exc))
            if holder is None:
                raise  # not a lock: DuckDB's own error says what is wrong with the file
            held = True
            who = f"{holder['program']} (PID {holder['pid']})"
            waited = time.monotonic() - started
            if waited >= limit:
                raise CrmWarehouseBusy(
                    f"The DuckDB file {path} has been held by {who} for {waited:.0f}s, past "
                    f"{WAREHOUSE_WAIT_ENV}={limit:.0f}: a process keeps it open (a notebook, the DuckDB "
                    "CLI, a BI tool), and DuckDB admits no other connection meanwhile. Close it there, "
                    "then run the sync again; a reader that stays open between syncs should open the "
                    "file read-only (duckdb.connect(path, read_only=True)) and close it before the "
                    "next sync."
                ) from None
            if time.monotonic() >= next_line:
                logger.warning(
                    "The DuckDB file %s is held by %s; waiting for it to be closed (%.0fs so far, up "
                    "to %.0fs: %s)", path, who, waited, limit, WAREHOUSE_WAIT_ENV,
                )
                next_line = time.monotonic() + WAREHOUSE_WAIT_LOG_EVERY
            time.sleep(0.5)
            continue
        if held:
            logger.warning("The DuckDB file %s was closed after %.1fs; starting", path, time.monotonic() - started)
        return connection
