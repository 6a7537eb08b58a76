"""The spare worker: one forked ahead of the next load, and warmed for given models on request. Never imports
torch."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from vlmux.errors import WorkerDied, WorkerStartError
from vlmux.pool.process import HANG_TIMEOUT, WorkerProcess
from vlmux.pool.vram import Release
from vlmux.pool.workers import ReleaseCheck, SpareStatus, gpus_of
from vlmux.protocol import Warm


class Spawner:
    """Keeps one spare worker forked and waiting, and forks the next one in the background.

    On request (`warm`) the spare also gets ready for given models on a GPU: its CUDA context, pinned staging
    memory and the models' kernels (`backends.transformers.warm_up`), which takes ~1.5 s off a load's critical
    path at the price of the context's memory while it waits (docs/BENCHMARKS.md). `warm(None)` makes it cold again."""

    def __init__(self, keep_spare: bool, hang_timeout: float = HANG_TIMEOUT) -> None:
        self._keep_spare = keep_spare
        self._hang_timeout = hang_timeout
        self._spare: WorkerProcess | None = None
        self._lock = threading.Lock()
        self._refill: threading.Thread | None = None
        self._warming: threading.Thread | None = None
        self._warm_lock = threading.Lock()
        self._warm_gate = threading.Event()  # cleared while a release check has the warm-up paused
        self._warm_gate.set()
        self._warming_worker: WorkerProcess | None = None  # the worker a Warm request may be running in
        self._paused: WorkerProcess | None = None
        self._dropped = False  # no spare until the next take: a pool that unloaded all keeps no worker
        self._passed_by = False  # a load did not wait for the warm-up's slice under way: it stops after that slice
        if keep_spare:
            self._start_refill()

    def take(self, env: dict[str, str] | None = None) -> WorkerProcess:
        """A worker for a load with this environment: the spare if it can serve it (cold, or warm for the same
        GPUs), else a fresh one."""
        with self._lock:
            spare, self._spare = self._spare, None
            self._dropped = False
            if spare is not None and spare is self._warming_worker:  # mid-slice: the load takes a fresh worker
                self._spare, spare, self._passed_by = spare, None, True
        if spare is not None and (not spare.alive or spare.warm_env not in (None, env)):
            spare.kill()
            spare = None
        worker = spare if spare is not None else WorkerProcess(self._hang_timeout)
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
        with self._lock:
            self._passed_by = False
        warming = threading.Thread(target=self._warm, args=(requests,), name="vlmux-warm", daemon=True)
        warming.start()
        self._warming = warming  # started before others can see it: they may join it

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

    def drop_spare(self, check_for: Callable[[tuple[int, ...]], ReleaseCheck]) -> Release | None:
        """Stop the spare (a warm-up under way ends with it) and fork none until the next `take`."""
        with self._lock:
            self._dropped = True
        if self._refill is not None:
            self._refill.join()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        return spare.stop(0.0, check_for(gpus_of(spare.warm_env)))

    def spare_status(self) -> SpareStatus | None:
        with self._lock:
            spare, warming = self._spare, self._warming_worker is not None
        if spare is None or not spare.alive:
            return None
        return SpareStatus(spare.pid, gpus_of(spare.warm_env), warming, tuple(sorted(spare.warmed)))

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
        try:
            for request in requests:
                if request.path in spare.warmed:
                    continue
                with self._lock:  # before the gate: a pause that clears the gate after this finds the worker
                    if self._spare is not spare or self._passed_by:  # a load took it or wants the GPU: yield
                        return
                    self._warming_worker = spare
                self._warm_gate.wait()
                try:
                    # a worker that loaded since skips it
                    spare.call(Warm(request.spec, request.path, requests[0].env, request.pin_weights))
                except WorkerDied:
                    return
                spare.warmed.add(request.path)
        finally:
            with self._lock:
                self._warming_worker = None

    def pause_warm(self) -> None:
        """Freeze the spare's warm-up where it is (its process stopped) until `resume_warm`: a release check reads
        the GPU's books meanwhile."""
        self._warm_gate.clear()
        with self._lock:
            worker = self._warming_worker
        if worker is not None:
            worker.pause()
            self._paused = worker

    def resume_warm(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.resume()
        self._warm_gate.set()

    def _start_refill(self) -> None:
        def refill() -> None:
            with self._lock:
                if self._spare is not None or not self._keep_spare or self._dropped:
                    return
            try:
                worker = WorkerProcess(self._hang_timeout)
            except WorkerStartError:  # the load that takes no spare starts its own worker and reports why it can't
                return
            with self._lock:
                if self._spare is None and self._keep_spare and not self._dropped:
                    self._spare, worker = worker, None
            if worker is not None:
                worker.kill()

        thread = threading.Thread(target=refill, name="vlmux-spare", daemon=True)
        thread.start()
        self._refill = thread  # started before others can see it: they may join it
