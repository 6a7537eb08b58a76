"""The parent's client of vlmux's fork server (worker/forkserver.py): one per process, started on first use, started
again if it died; it forks every worker. Never imports torch."""
from __future__ import annotations

import os
import site
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from vlmux.errors import WorkerStartError

PID_BYTES = 8  # as worker/forkserver.py sends them
START_REPORT_BYTES = 4  # likewise: the length of its start-up report
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder this vlmux is imported from
START_RETRY = 30.0  # seconds a fork server that failed to start is not started again (each start imports torch)
# The server never imports from the current folder, where a user's random.py or queue.py would shadow the standard
# library: -P where Python has it (the processes multiprocessing starts under it inherit the flag); 3.10 lacks it, so
# there sys.path loses that entry before anything is imported and the server moves to /, where the `python -c`
# processes multiprocessing starts (the preparing processes) look instead. Paths reach workers absolute.
SERVER_COMMAND = ["-P", "-m", "vlmux.worker"] if sys.version_info >= (3, 11) else [
    "-c", "import sys; del sys.path[0]; import os, runpy; os.chdir('/'); "
          "runpy.run_module('vlmux.worker', run_name='__main__')"]


class ForkServer:
    """The client of vlmux's fork server (worker/forkserver.py): started on first use, started again if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._started = False  # whether the running server reported its imports done
        self._import_span: tuple[float, float] | None = None  # the last start: from Popen to its report (monotonic)
        self._failed: tuple[float, str] | None = None  # when starting it last failed, and how

    def ensure_running(self) -> None:
        with self._lock:
            self._start_if_gone()

    def fork(self) -> tuple[Connection, int, int]:
        """A new worker: the connection to it, its pid, and the read end of the pipe that gets its wait status.
        Raises WorkerStartError, quoting the server's own error, when the server cannot start."""
        ours, theirs = socket.socketpair()
        try:
            with self._lock:
                if self._failed is not None and time.monotonic() - self._failed[0] < START_RETRY:
                    raise WorkerStartError(self._failed[1])  # the same cause, not paid for again
                for _ in range(2):  # a server that died since the last fork gets one replacement
                    self._start_if_gone()
                    error = self._await_start()
                    if error is not None:  # a second start would fail the same way
                        self._failed = (time.monotonic(), error)
                        raise WorkerStartError(error)
                    try:
                        socket.send_fds(self._control, [b"f"], [theirs.fileno()])
                        answer, fds, _, _ = socket.recv_fds(self._control, PID_BYTES, 1)
                    except OSError:
                        answer, fds = b"", []
                    if len(answer) == PID_BYTES and len(fds) == 1:
                        return Connection(ours.detach()), int.from_bytes(answer, "little"), fds[0]
                    for fd in fds:
                        os.close(fd)
                    code = self._stop()
                self._failed = (time.monotonic(), f"the vlmux fork server exited with code {code} before forking a "
                                "worker (see its error above)")
                raise WorkerStartError(self._failed[1])
        finally:
            theirs.close()
            ours.close()

    def _await_start(self) -> str | None:
        """With the lock held: wait for the server's start-up report (its imports take seconds). None once it has
        started; else why not, its traceback printed once, here."""
        if self._started:
            return None
        try:
            size = int.from_bytes(_receive(self._control, START_REPORT_BYTES), "little")
            traceback = _receive(self._control, size).decode(errors="replace")
        except (OSError, EOFError):
            return f"the vlmux fork server exited with code {self._stop()} as it started (see its error above)"
        if not traceback:
            self._started = True
            self._import_span = (self._started_at, time.monotonic())
            return None
        self._stop()
        print(f"vlmux: the fork server that starts the workers failed as it started:\n{traceback}", end="",
              file=sys.stderr, flush=True)
        return f"the vlmux fork server failed as it started: {traceback.strip().splitlines()[-1]} (traceback above)"

    def _start_if_gone(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._control is not None:
            self._control.close()
        self._control, theirs = socket.socketpair()
        self._started, self._started_at = False, time.monotonic()
        self._process = subprocess.Popen(
            [sys.executable, *SERVER_COMMAND, str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_server_env(),
        )
        theirs.close()

    def import_wait(self, start: float, end: float) -> float:
        """Seconds of [start, end] (time.monotonic()) during which the server was still importing, for a report that
        tells a load's wait for the server apart from the load itself."""
        span = self._import_span
        return 0.0 if span is None else max(0.0, min(end, span[1]) - max(start, span[0]))

    def stop(self) -> None:
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._stop()

    def _stop(self) -> int:
        self._process.kill()
        code = self._process.wait()
        self._control.close()
        self._control = None
        return code


FORK_SERVER = ForkServer()


def warm_fork_server() -> None:
    """Start the fork server (it imports torch and transformers once, in the background) if it is not running."""
    FORK_SERVER.ensure_running()


def stop_fork_server() -> None:
    """Stop the fork server; its workers run on. For a caller that started it early and then has nothing to run."""
    FORK_SERVER.stop()


def _server_env() -> dict[str, str]:
    """The parent's environment, with the folder this vlmux came from on PYTHONPATH where that is a checkout put on
    sys.path by hand (never a site folder, which PYTHONPATH would put ahead of the standard library). PYTHONPATH's
    empty entries go, since Python reads one as the current folder (`PYTHONPATH=$PYTHONPATH:/x` with none set
    before); relative ones are made absolute, as the parent read them."""
    site_folders = (*site.getsitepackages(), site.getusersitepackages())
    entries = [] if PACKAGE_ROOT in site_folders else [PACKAGE_ROOT]
    entries += [os.path.abspath(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(entries))} if entries else env


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the fork server closed its end")
        data += chunk
    return data
