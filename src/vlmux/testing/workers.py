"""What tests that drive real workers on the CPU share: the placement that hides every GPU, a release check with
nothing to verify, and a wait for a condition that no event announces."""
from __future__ import annotations

import time
from collections.abc import Callable

from vlmux.pool.vram import Release, cpu_release

CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


class NoRelease:
    """A ReleaseCheck for the CPU: no device memory to verify, the host's share reported as the pool does."""

    def before_exit(self, pid: int) -> None:
        pass

    def after_exit(self, pid: int, alive: bool, host_bytes: int | None) -> Release:
        return cpu_release(pid, alive, host_bytes)


def wait_until(check: Callable[[], bool], within: float = 15.0) -> bool:
    """True once `check()` is; False if it still is not after `within` seconds. For state another process or
    thread changes without telling the test (a /proc entry, a server's counter)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()
