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
