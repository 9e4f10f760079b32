"""One run of the pipeline at a time on this machine.

Two runs of the same dlt pipeline at once share its working folder (dagster-dlt even deletes it
at the start of every run) and, on DuckDB, a file that admits a single writer. The second run
therefore waits for the first, saying so in the log, instead of corrupting either. Across
machines, Dagster's `crm_warehouse` pool does the same job.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from typing import Optional

from dlt.common.pipeline import get_dlt_pipelines_dir

from .crm.errors import CrmError
from .crm_pipeline import PIPELINE_NAME

logger = logging.getLogger("crm_assets.sources.run_lock")

DEFAULT_WAIT_SECONDS = 3600.0


class CrmRunLockTimeout(CrmError):
    """Another run kept the pipeline for longer than this run was willing to wait."""


def lock_path(pipelines_dir: Optional[str] = None) -> str:
    return os.path.join(pipelines_dir or get_dlt_pipelines_dir(), f"{PIPELINE_NAME}.lock")


@contextmanager
def exclusive_run(
    pipelines_dir: Optional[str] = None, wait_seconds: float = DEFAULT_WAIT_SECONDS
) -> Iterator[None]:
    """Hold the pipeline for this block. Create the pipeline object inside the block: even
    `dlt.pipeline()` reads a working folder that a running sync may be deleting."""
    path = lock_path(pipelines_dir)
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
                        "Another run of pipeline %s is in progress on this machine; waiting for it "
                        "to finish (lock %s)", PIPELINE_NAME, path,
                    )
                    announced = True
                if time.monotonic() - started > wait_seconds:
                    raise CrmRunLockTimeout(
                        f"Another run of pipeline {PIPELINE_NAME} held {path} for more "
                        f"than {wait_seconds:.0f}s; not starting a second writer"
                    ) from None
                time.sleep(0.5)
        if announced:
            logger.warning("The other run finished after %.1fs; starting", time.monotonic() - started)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
