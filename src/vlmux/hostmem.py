"""Host memory as the kernel reports it (torch-free: the parent, the worker and the run report all read it)."""
from __future__ import annotations

import os


def host_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_host_bytes() -> int:
    """MemAvailable: what the host can still give without swapping (page cache it may drop included)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def private_bytes(pid: int) -> int | None:
    """Host memory only process `pid` holds: its private pages (what its exit gives back; pages shared with the fork
    server are not counted), from /proc; None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except (OSError, ValueError):
        return None
