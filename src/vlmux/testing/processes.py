"""Process checks for tests: has a worker really gone?"""
from __future__ import annotations

import time
from pathlib import Path


def process_gone(pid: int, within: float = 10.0) -> bool:
    """True once `pid` no longer runs: its /proc entry is gone, or only a zombie is left waiting for a reaper
    (a zombie holds no memory; whether it is reaped is up to whichever process inherited it)."""
    deadline = time.monotonic() + within
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (a worker's parent is the fork server, a child of the pool's process)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    """`pid`'s children, their children, and so on."""
    found, frontier = [], [pid]
    while frontier:
        below = [child for parent in frontier for child in children(parent)]
        found.extend(below)
        frontier = below
    return found


def group_members(pgid: int) -> list[int]:
    """The live pids of process group `pgid` (a terminal's Ctrl-C reaches all of them); zombies left out."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found
