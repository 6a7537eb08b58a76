"""The test run's end, watched: a suite whose tests all passed can still keep CI waiting in Python's exit, on a
thread joined at shutdown (a thread pool's worker) or an atexit handler (a pool closed at exit). Processes a test
started do not hold CI's output open: pytest points their stdout and stderr at its capture files."""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from vlmux.testing.processes import descendants

HUNG_AT_EXIT = 1  # the exit status of a run whose tests passed but whose Python did not exit: a failed run


def watch_interpreter_exit(status: int, seconds: float) -> None:
    """If Python has not exited `seconds` from now, print every thread's stack and the processes still under this
    one, then exit with `status` (the session's), or with HUNG_AT_EXIT where every test passed: a leaked thread or
    pool fails the run."""
    def watch() -> None:
        time.sleep(seconds)
        out = sys.__stderr__
        print(f"\ntests: Python has not exited {seconds:g} s after the session; its threads:", file=out, flush=True)
        faulthandler.dump_traceback(file=out, all_threads=True)
        for pid in descendants(os.getpid()):
            print("still running:", pid, _command(pid), file=out, flush=True)
        os._exit(status or HUNG_AT_EXIT)

    threading.Thread(target=watch, name="tests-exit-watch", daemon=True).start()
    # A hang that holds the GIL stops the thread above too; faulthandler's own thread needs no GIL (its exit is 1).
    faulthandler.dump_traceback_later(seconds + 60, exit=True, file=sys.__stderr__)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
