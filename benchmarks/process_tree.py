"""A process and its descendants, from /proc: what the benchmarks sum RSS and CPU over."""

from __future__ import annotations

import os
from typing import Optional


def children_by_parent() -> dict[int, list[int]]:
    """{parent pid: its children's pids} of every process now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        parent = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def tree_pids(root: int, children: Optional[dict[int, list[int]]] = None) -> list[int]:
    """`root` and every descendant (from `children`, read now when not given)."""
    children = children_by_parent() if children is None else children
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, ()))
    return pids
