"""Process checks for tests: has a worker really gone?"""
from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlmux.pool.forks import SERVER_COMMAND
from vlmux.pool.process import stat_fields


def process_gone(pid: int, within: float = 10.0) -> bool:
    """True once `pid` no longer runs: its /proc entry is gone, or only a zombie is left waiting for a reaper
    (a zombie holds no memory; whether it is reaped is up to whichever process inherited it)."""
    deadline = time.monotonic() + within
    while True:
        fields = stat_fields(Path(f"/proc/{pid}/stat"))
        if fields is None:
            return True
        if fields[0] in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def still_running(pids: Iterable[int], within: float) -> list[int]:
    """Wait for each process's end itself (a pidfd turns readable when it exits, child or not); the pids still
    running after `within` seconds, or [] as soon as every one has ended."""
    fds: dict[int, int] = {}
    try:
        for pid in set(pids):
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + within
        while fds:
            ready, _, _ = select.select(list(fds), [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (a worker's parent is the fork server, a child of the pool's process)."""
    return [child for child, fields in _stats() if int(fields[1]) == pid]


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
    return [member for member, fields in _stats() if int(fields[2]) == pgid and fields[0] not in ("Z", "X")]


def _stats() -> Iterator[tuple[int, list[str]]]:
    """Each process's pid and the fields of /proc/PID/stat after its name (state, parent, group, ...)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = stat_fields(stat)
        if fields is not None:
            yield int(stat.parent.name), fields


def fork_servers(parent_pid: int) -> list[int]:
    """The live vlmux fork servers started by `parent_pid` (their command line ends with it), wherever they went."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        pid = int(cmdline.parent.name)
        started = args[1:1 + len(SERVER_COMMAND)] == SERVER_COMMAND
        if started and args[-1] == str(parent_pid) and not process_gone(pid, within=0):
            found.append(pid)
    return found
