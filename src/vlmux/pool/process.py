"""The parent's side of a worker: start it, send it requests, notice at once when it dies, stop it."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait

from vlmux.worker.main import serve
from vlmux.errors import WorkerDied
from vlmux.protocol import Exit, Reply, Request, Warm

_PRELOAD = ["vlmux.worker.preload"]


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
        self.warm_env: dict[str, str] | None = None  # set once the worker created a context for these GPUs
        self.warmed: set[str] = set()  # model paths whose kernels it ran

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
    """Keeps one spare worker forked and waiting, and forks the next one in the background.

    On request (`warm`) the spare also gets ready for given models on a GPU: its CUDA context, pinned staging
    memory and the models' kernels (`backends.transformers.warm_up`), which takes ~1.5 s off a load's critical
    path at the price of the context's memory (~0.5 GiB) while it waits. `warm(None)` makes it cold again."""

    def __init__(self, keep_spare: bool) -> None:
        self._keep_spare = keep_spare
        self._spare: WorkerProcess | None = None
        self._lock = threading.Lock()
        self._refill: threading.Thread | None = None
        self._warming: threading.Thread | None = None
        self._warm_lock = threading.Lock()
        if keep_spare:
            self._start_refill()

    def take(self, env: dict[str, str] | None = None) -> WorkerProcess:
        """A worker for a load with this environment: the spare if it can serve it (cold, or warm for the same
        GPUs), else a fresh one."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and (not spare.alive or spare.warm_env not in (None, env)):
            spare.kill()
            spare = None
        worker = spare if spare is not None else WorkerProcess()
        if self._keep_spare:
            self._start_refill()
        return worker

    def warm(self, requests: list[Warm] | None) -> None:
        """Get the spare ready for these models (one GPU placement, the env of the first), in the background;
        None: drop a warm spare for a cold one, so that no vlmux process holds device memory."""
        if not self._keep_spare:
            return
        if not requests:
            with self._lock:
                spare = self._spare if self._spare is not None and self._spare.warm_env is not None else None
                if spare is not None:
                    self._spare = None
            if spare is not None:
                spare.kill()
                self._start_refill()
            return
        self._warming = threading.Thread(target=self._warm, args=(requests,), name="vlmux-warm", daemon=True)
        self._warming.start()

    def warm_for(self) -> dict[str, str] | None:
        """The environment (GPUs) the spare holds a context for, or None if it is cold or missing."""
        with self._lock:
            spare = self._spare
        return spare.warm_env if spare is not None and spare.alive and spare.warmed else None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Whether the spare is forked and done warming, waiting up to `timeout` seconds for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._refill, self._warming):
            if thread is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    return False
        return True

    def close(self) -> None:
        self._keep_spare = False
        for thread in (self._refill, self._warming):
            if thread is not None:
                thread.join()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.kill()

    def _warm(self, requests: list[Warm]) -> None:
        with self._warm_lock:
            self._warm_spare(requests)

    def _warm_spare(self, requests: list[Warm]) -> None:
        if self._refill is not None:
            self._refill.join()
        with self._lock:
            spare = self._spare
        if spare is None or not spare.alive:
            return
        if spare.warm_env not in (None, requests[0].env):  # warm for other GPUs: start over with a cold one
            self.warm(None)
            return self._warm_spare(requests)
        spare.warm_env = requests[0].env  # before the context exists: take() must not place it elsewhere meanwhile
        for request in requests:
            if request.path in spare.warmed:
                continue
            try:
                # a worker that loaded since skips it
                spare.call(Warm(request.spec, request.path, requests[0].env, request.pin_weights))
            except WorkerDied:
                return
            spare.warmed.add(request.path)

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
