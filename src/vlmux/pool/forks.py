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

PID_BYTES = 8  # as worker/forkserver.py sends them
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder this vlmux is imported from
START_RETRY = 30.0  # seconds a fork server that failed to start is not started again (each start imports torch)


class ForkServer:
    """The client of vlmux's fork server (worker/forkserver.py): started on first use, started again if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._failed: tuple[float, str] | None = None  # when starting it last failed, and how

    def ensure_running(self) -> None:
        with self._lock:
            self._start_if_gone()

    def fork(self) -> tuple[Connection, int, int]:
        """A new worker: the connection to it, its pid, and the read end of the pipe that gets its wait status."""
        ours, theirs = socket.socketpair()
        try:
            with self._lock:
                if self._failed is not None and time.monotonic() - self._failed[0] < START_RETRY:
                    raise RuntimeError(f"{self._failed[1]}; not started again for {START_RETRY:g} s")
                for _ in range(2):  # a server that died since the last fork gets one replacement
                    self._start_if_gone()
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
                raise RuntimeError(self._failed[1])
        finally:
            theirs.close()
            ours.close()

    def _start_if_gone(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._control is not None:
            self._control.close()
        self._control, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "vlmux.worker", str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_server_env(),
        )
        theirs.close()

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
    sys.path by hand; never a site folder, which PYTHONPATH would put ahead of the standard library."""
    if PACKAGE_ROOT in (*site.getsitepackages(), site.getusersitepackages()):
        return dict(os.environ)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
