"""The simulator as a process of its own (`make demo`, `make dev`, the benchmark), and stopping a
process we started together with everything it started.

Each process is started in a session of its own (`start_new_session=True`), so its process group
holds it and its children: `dagster dev` starts a webserver, a daemon and code servers, and a
signal to the leader alone would leave them running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Optional, Union

# (signal, seconds to wait for the leader after it) in turn, until the leader has exited
STOP_STEPS: tuple[tuple[int, float], ...] = ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


def start_simulator(
    ready_file: Path,
    *args: str,
    api_key: str,
    cwd: Optional[Path] = None,
    output: Union[None, int, IO[bytes]] = None,
    timeout: float = 60.0,
) -> tuple[subprocess.Popen, str]:
    """`python -m crm_assets.simulator` on a free loopback port, in a session of its own; returns
    the process and its URL once it serves. `args` are more command-line options (`--page-cap`,
    `--records`, ...); `output` takes its stdout and stderr (the terminal by default)."""
    ready_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "crm_assets.simulator", "--port", "0", "--api-key", api_key,
               "--ready-file", str(ready_file), *args]
    process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output,
                               stderr=None if output is None else subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready_file.exists() or not ready_file.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            exited = process.returncode is not None
            stop_group(process)
            what = (f"exited with code {process.returncode}" if exited
                    else f"did not serve within {timeout:.0f}s")
            raise RuntimeError(f"the CRM simulator (python -m crm_assets.simulator {' '.join(args)}) {what}")
        time.sleep(0.05)
    return process, ready_file.read_text().strip()


def stop_group(process: subprocess.Popen, steps: tuple[tuple[int, float], ...] = STOP_STEPS) -> None:
    """Stop `process`, started with `start_new_session=True`, and everything it started: each
    signal of `steps` goes to its whole process group, then up to that many seconds pass for the
    leader to exit; children it left behind get a SIGTERM."""
    for sig, grace in steps:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # the group is gone (PermissionError: the id is another user's by now)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        break
