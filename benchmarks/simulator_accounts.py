"""The simulator serving many accounts from one process: its start time, its memory, and its CPU
per account read, with two readers at once (two syncs).

    .venv/bin/python benchmarks/simulator_accounts.py --accounts 100 --records 1000

Starts `python -m crm_assets.simulator --accounts N --records R` (R records of each of the five
resources per account), reports the time from the process's start to serving and its RSS (and the time to build and start
one in a running process, as a test does), then
reads every record of every account once, the accounts split between two reader threads, each
resource in pages of 1,000 sorted on date_updated under a date_updated range (as a sync asks), and
reports the simulator's CPU seconds for it and its peak RSS. The readers run in this process, on
the same cores, so the wall time is an upper bound of what the simulator needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crm_assets.simulator import RESOURCES, CrmSimulator, SimulatorConfig  # noqa: E402
from crm_assets.simulator.process import start_simulator, stop_group  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB: now, and the peak."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def _read_accounts(url: str, names: list[str], counted: list[int]) -> None:
    with requests.Session() as session:
        for name in names:
            session.headers["Authorization"] = f"Bearer key-{name}"
            for resource, (path, key) in RESOURCES.items():
                start = 0
                while True:
                    params = {"from": start, "size": 1000, "sort_field": "date_updated", "sort_direction": "asc",
                              "filter": json.dumps({"must": [{"range": {"date_updated": {"gte": 0}}}]})}
                    reply = session.get(f"{url}/{name}{path}", params=params, timeout=30)
                    reply.raise_for_status()
                    body = reply.json()
                    start += len(body[key])
                    counted.append(len(body[key]))
                    if not body[key] or start >= body["count"]:
                        break


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, default=100)
    p.add_argument("--records", type=int, default=1000, help="records of each resource per account")
    args = p.parse_args()

    names = [f"acct{i:0{max(2, len(str(args.accounts)))}d}" for i in range(1, args.accounts + 1)]
    began = time.perf_counter()  # in a test's process: build and start, imports done
    sim = CrmSimulator(SimulatorConfig(accounts=names, counts={r: args.records for r in RESOURCES})).start()
    in_process = time.perf_counter() - began
    sim.stop()  # not timed: shutdown waits for the server's next poll

    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        process, url = start_simulator(Path(tmp) / "ready", "--accounts", str(args.accounts),
                                       "--records", str(args.records), api_key="unused",
                                       output=open(os.devnull, "wb"))
        started = time.perf_counter() - began
        try:
            rss, _ = _rss_mb(process.pid)
            cpu_before = _cpu_seconds(process.pid)
            counted: list[int] = []
            readers = [threading.Thread(target=_read_accounts, args=(url, names[k::2], counted)) for k in (0, 1)]
            began = time.perf_counter()
            for t in readers:
                t.start()
            for t in readers:
                t.join()
            wall = time.perf_counter() - began
            cpu = _cpu_seconds(process.pid) - cpu_before
            rss_after, peak = _rss_mb(process.pid)
        finally:
            stop_group(process)
    total = sum(counted)
    expected = args.accounts * args.records * len(RESOURCES)
    print(f"{args.accounts} accounts x {args.records * len(RESOURCES)} records: serving {started:.2f} s after "
          f"the process started, RSS {rss:.0f} MB; built and started in a process {in_process * 1000:.0f} ms")
    print(f"read {total} records ({'all' if total == expected else f'expected {expected}'}) in {len(counted)} pages "
          f"with 2 readers: {wall:.1f} s wall, simulator CPU {cpu:.1f} s ({cpu / args.accounts * 1000:.0f} ms per "
          f"account), RSS {rss_after:.0f} MB after, peak {peak:.0f} MB; load average {os.getloadavg()[0]:.1f}")
    return 0 if total == expected else 1


if __name__ == "__main__":
    sys.exit(main())
