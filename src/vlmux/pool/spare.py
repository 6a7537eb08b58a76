"""When the pool's spare worker gets warm: once a pool has switched models on a GPU, the spare holds a context
there and the recent models' kernels, so the next switch skips the context's start; with nothing left on a GPU it
goes cold again. The warming itself is the worker factory's (`Spawner.warm`)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from vlmux.config import ModelSpec, PoolConfig
from vlmux.hub import resolve_model
from vlmux.pool.placement import WorkerPlacement
from vlmux.pool.release import UnattributedLock
from vlmux.pool.runner import SERVING, Runner
from vlmux.pool.vram import Release
from vlmux.pool.workers import ReleaseCheck, WorkerFactory
from vlmux.protocol import Warm

RECENT_MODELS = 3  # models a warm spare gets ready for
WARM_AFTER_AT_MOST = 30.0  # seconds a spare waits for a busy new model before it warms up anyway


class PoolView(Protocol):
    """What the spare asks of the scheduler."""

    @property
    def closed(self) -> bool: ...

    def holds_gpu(self) -> bool: ...


class WarmSpare:
    def __init__(self, config: PoolConfig, workers: WorkerFactory, pool: PoolView, unattributed: UnattributedLock) -> None:
        self.config = config
        self.workers = workers
        self._pool = pool
        self._unattributed = unattributed
        self._lock = threading.Lock()
        self._recent: list[Warm] = []  # what a warm spare gets ready for, most recently loaded first
        self._warming: threading.Thread | None = None
        self._cooling: threading.Timer | None = None  # one at a time: a timer per release piled up threads
        specs = [m if isinstance(m, ModelSpec) else ModelSpec(m) for m in config.prewarm]
        self._prewarm = [(spec, resolve_model(spec.model, spec.revision)) for spec in specs]  # unknown ones fail here

    def is_warm_for(self, gpu: int | None) -> bool:
        return gpu is not None and self.workers.warm_for() == WorkerPlacement((gpu,)).env

    def after_load(self, loaded: Runner) -> None:
        """After a load on one GPU, have the spare ready there for the models loaded on it lately (the next
        switch is most likely to one of them) and those of `PoolConfig.prewarm`, once there are two of them."""
        if not self.config.warm_spare or len(loaded.placement.gpus) != 1:
            return
        env = loaded.placement.env
        with self._lock:
            self._recent = [entry for entry in self._recent if entry.path != str(loaded.path)]
            self._recent.insert(0, Warm(replace(loaded.spec, device=loaded.placement.device), str(loaded.path), env,
                                        self.config.warm_spare_pins_weights))
            del self._recent[RECENT_MODELS:]
            requests = [entry for entry in self._recent if entry.env == env]
            requests += [Warm(replace(spec, device=loaded.placement.device), str(path), env,
                              self.config.warm_spare_pins_weights)
                         for spec, path in self._prewarm if str(path) not in {r.path for r in requests}]
        if len(requests) < 2:  # only a pool that switches between models gains from a warm spare
            return

        def warm_when_quiet() -> None:
            # Not before the new model has answered and gone idle: two contexts time-share the GPU, so warming at
            # once would slow the very first answer the switch is waiting for. Not while a release is verified
            # either (a check pauses it): the spare's context and pinned pages are booked to no process, like a residue.
            loaded.answered.wait(WARM_AFTER_AT_MOST)
            if not self._pool.closed and loaded.state in SERVING:  # an unload (all) since keeps it cold
                with self._unattributed.held(loaded.placement.gpus, pausable=self.workers):
                    self.workers.warm(requests)
                    self.workers.wait_ready()

        self._warming = threading.Thread(target=warm_when_quiet, name="vlmux-warm-when-quiet", daemon=True)
        self._warming.start()

    def after_release(self) -> None:
        """Once no model is on a GPU and none is loading for `warm_spare_linger` seconds, the spare drops its
        context: a pool with nothing loaded holds no device memory."""
        if not self.config.warm_spare:
            return

        def cool() -> None:
            if not self._pool.holds_gpu() and not self._pool.closed:
                self.workers.warm(None)

        if self._cooling is not None:
            self._cooling.cancel()  # the linger counts from the last release
        self._cooling = threading.Timer(self.config.warm_spare_linger, cool)
        self._cooling.daemon = True
        self._cooling.start()

    def drop(self, check_for: Callable[[tuple[int, ...]], ReleaseCheck]) -> Release | None:
        """Stop the spare, warm or cold, until the next load (`unload all`): its release verified by `check_for`."""
        if self._cooling is not None:
            self._cooling.cancel()
        return self.workers.drop_spare(check_for)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the spare finished getting ready; False on timeout."""
        warming = self._warming
        if warming is not None:
            warming.join(timeout)
            if warming.is_alive():
                return False
        return self.workers.wait_ready(timeout)

    def close(self) -> None:
        if self._cooling is not None:
            self._cooling.cancel()
        self.workers.close()
