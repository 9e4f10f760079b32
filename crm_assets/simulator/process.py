"""The simulator as a process of its own (`make demo`, `make dev`, the benchmark), and stopping a
process we started together with everything it started.

Each process is started in a session of its own (`start_new_session=True`), so its process group
holds it and its children: `dagster dev` starts a webserver, a daemon and code servers, and a
signal to the leader alone would leave them running.

A process started by `start_process` also answers the signals we send, and does not outlive us:
- it starts with SIGINT, SIGTERM and SIGHUP at their defaults and none blocked, whatever we
  inherited (`make dev &` from a script runs with SIGINT ignored, and Python, like `dagster
  dev`, then ignores SIGTERM as well); in a session of its own only we signal it;
- on Linux the kernel sends it SIGTERM when the process that started it exits, however it exits
  (killed with SIGKILL too), so nothing is left behind even when our own cleanup never runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

# (signal, seconds to wait for the leader after it) in turn, until the leader has exited
STOP_STEPS: tuple[tuple[int, float], ...] = ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


_PR_SET_PDEATHSIG = 1
_RESET_IN_CHILD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _in_child(parent: int) -> Callable[[], None]:
    """What the child does between fork and exec (see the module's docstring)."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def prepare() -> None:
        for sig in _RESET_IN_CHILD:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # we exited before the line above took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return prepare


def start_process(command: Sequence[str], **popen: Any) -> subprocess.Popen:
    """`subprocess.Popen(command, **popen)` in a session of its own, with default signal handling,
    stopped by the kernel if we exit first (Linux). Stop it with `stop_group`."""
    return subprocess.Popen(list(command), start_new_session=True, preexec_fn=_in_child(os.getpid()),
                            **popen)


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
    process = start_process(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output,
                            stderr=None if output is None else subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not ready_file.exists() or not ready_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                exited = process.returncode is not None
                what = (f"exited with code {process.returncode}" if exited
                        else f"did not serve within {timeout:.0f}s")
                raise RuntimeError(f"the CRM simulator (python -m crm_assets.simulator {' '.join(args)}) {what}")
            time.sleep(0.05)
    except BaseException:  # a failed start, or a signal (SystemExit, KeyboardInterrupt) meanwhile
        stop_group(process)
        raise
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
