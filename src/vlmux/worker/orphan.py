"""Ending a process whose parent is gone, for processes that are not their parent's children (a worker forks from the
fork server, a preparing process from its own fork server)."""
from __future__ import annotations

import os
import threading
import time

PARENT_POLL_SECONDS = 0.5


def exit_when_orphaned(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, name="vlmux-orphan-watch", daemon=True).start()


def killed_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent ends (Linux PR_SET_PDEATHSIG): unlike the watch above
    it works on a stopped or hung process too."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
