"""Processes of a benchmarked command, read from Linux's /proc (no extra dependency)."""

from __future__ import annotations

import os


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, resident bytes, command line) from /proc."""
    table = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss = int(f.read().split()[1]) * page
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (ppid, rss, cmd)
    return table


def descendants(table, root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), [root]
    while stack:
        pid = stack.pop()
        out.add(pid)
        stack.extend(children.get(pid, []))
    return out


def tree_rss_mib(root_pid: int) -> float:
    """Resident memory of a process and all its descendants."""
    table = process_table()
    return sum(table[pid][1] for pid in descendants(table, root_pid) if pid in table) / 2**20
