"""Processes of a benchmarked command: its process tree (the same walk `papm simulate` uses to stop
Ray on Ctrl-C) and each process's resident memory, from Linux's /proc."""

from __future__ import annotations

import os

from papm.simulations.simulate import descendants


def resident(pid: int) -> tuple[int, str] | None:
    """(resident bytes, command line) of one process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return rss, f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, ValueError, IndexError):
        return None


def tree(root_pid: int) -> dict[int, tuple[int, str]]:
    """pid -> (resident bytes, command line) of a process and all its descendants."""
    out = {}
    for pid in [root_pid, *descendants(root_pid)]:
        if (r := resident(pid)) is not None:
            out[pid] = r
    return out


def tree_rss_mib(root_pid: int) -> float:
    """Resident memory of a process and all its descendants."""
    return sum(rss for rss, _ in tree(root_pid).values()) / 2**20
