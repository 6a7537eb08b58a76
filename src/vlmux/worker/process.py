"""The parent's side of a worker: start it, send it requests, notice at once when it dies, stop it."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import wait

from vlmux.worker.main import serve
from vlmux.worker.protocol import Exit, Reply, Request

_PRELOAD = ["vlmux.worker.preload"]


class WorkerDied(RuntimeError):
    """The worker process ended while the parent was waiting for it."""


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def warm_fork_server() -> None:
    """Start the fork server (it imports torch and transformers once, ~10 s) if it is not running."""
    _context()
    from multiprocessing import forkserver

    forkserver.ensure_running()


class WorkerProcess:
    def __init__(self) -> None:
        context = _context()
        self._conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=serve, args=(child_conn, os.getpid()), name="vlmux-worker", daemon=True)
        self.process.start()
        child_conn.close()
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def private_bytes(self) -> int | None:
        """Host memory only this worker holds (what its exit gives back; pages shared with the fork server are
        not counted), from /proc; None where that cannot be read."""
        try:
            with open(f"/proc/{self.pid}/smaps_rollup") as f:
                return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
        except OSError:
            return None

    def call(self, request: Request) -> Reply:
        """Send one request and wait for its reply; raises WorkerDied if the worker ends first."""
        with self._lock:
            try:
                self._conn.send(request)
            except (BrokenPipeError, OSError):
                raise WorkerDied(self._death_reason()) from None
            ready = wait([self._conn, self.process.sentinel])
            if self._conn in ready:
                try:
                    return self._conn.recv()
                except (EOFError, OSError):
                    pass
            raise WorkerDied(self._death_reason())

    def stop(self, grace: float) -> None:
        """Ask the worker to exit; kill it if it has not within `grace` seconds; return once it is gone."""
        if self.process.is_alive():
            try:
                self._conn.send(Exit())
            except (BrokenPipeError, OSError):
                pass
            self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def _death_reason(self) -> str:
        self.process.join(1.0)
        code = self.process.exitcode
        if code is None:
            return f"worker {self.pid} stopped answering"
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the kernel's out-of-memory killer sends SIGKILL: check host RAM)" if name == "SIGKILL" else ""
            return f"worker {self.pid} was killed by {name}{hint}"
        return f"worker {self.pid} exited with code {code}"


class Spawner:
    """Keeps one spare worker forked and waiting, and forks the next one in the background."""

    def __init__(self, keep_spare: bool) -> None:
        self._keep_spare = keep_spare
        self._spare: WorkerProcess | None = None
        self._lock = threading.Lock()
        self._refill: threading.Thread | None = None
        if keep_spare:
            self._start_refill()

    def take(self) -> WorkerProcess:
        with self._lock:
            spare, self._spare = self._spare, None
        worker = spare if spare is not None and spare.alive else WorkerProcess()
        if self._keep_spare:
            self._start_refill()
        return worker

    def close(self) -> None:
        self._keep_spare = False
        if self._refill is not None:
            self._refill.join()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.kill()

    def _start_refill(self) -> None:
        def refill() -> None:
            with self._lock:
                if self._spare is not None or not self._keep_spare:
                    return
            worker = WorkerProcess()
            with self._lock:
                if self._spare is None and self._keep_spare:
                    self._spare, worker = worker, None
            if worker is not None:
                worker.kill()

        self._refill = threading.Thread(target=refill, name="vlmux-spare", daemon=True)
        self._refill.start()
