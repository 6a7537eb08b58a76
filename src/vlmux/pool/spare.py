"""The pool's spare worker and when it gets warm: once a pool has switched models on a GPU, the spare holds a
context there and the recent models' kernels, so the next switch skips ~1.5 s; with nothing left on a GPU it goes
cold again."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace

from vlmux.config import PoolConfig
from vlmux.pool.placement import WorkerPlacement
from vlmux.pool.resident import Resident
from vlmux.pool.process import Spawner, WorkerProcess
from vlmux.protocol import Warm

RECENT_MODELS = 3  # models a warm spare gets ready for
WARM_AFTER_AT_MOST = 30.0  # seconds a spare waits for a busy new model before it warms up anyway


class WarmSpare:
    """Owns the pool's `Spawner`. The pool tells it what it is doing through three callables: the unloads under
    way (their futures), whether the pool is closed, and whether a model is on a GPU or loading."""

    def __init__(self, config: PoolConfig, releasing: Callable[[], list[Future]], closed: Callable[[], bool],
                 holds_gpu: Callable[[], bool]) -> None:
        self.config = config
        self.spawner = Spawner(keep_spare=config.spare_worker)
        self._releasing = releasing
        self._closed = closed
        self._holds_gpu = holds_gpu
        self._lock = threading.Lock()
        self._recent: list[Warm] = []  # what a warm spare gets ready for, most recently loaded first
        self._warming: threading.Thread | None = None

    def take(self, env: dict[str, str]) -> WorkerProcess:
        return self.spawner.take(env)

    def is_warm_for(self, gpu: int | None) -> bool:
        return gpu is not None and self.spawner.warm_for() == WorkerPlacement((gpu,)).env

    def after_load(self, loaded: Resident) -> None:
        """After a load on one GPU, have the spare ready there for the models loaded on it lately (the next
        switch is most likely to one of them), once this pool has switched models there at least once."""
        if not self.config.warm_spare or len(loaded.placement.gpus) != 1:
            return
        env = loaded.placement.env
        with self._lock:
            self._recent = [entry for entry in self._recent if entry.path != str(loaded.path)]
            self._recent.insert(0, Warm(replace(loaded.spec, device=loaded.placement.device), str(loaded.path), env,
                                        self.config.warm_spare_pins_weights))
            del self._recent[RECENT_MODELS:]
            requests = [entry for entry in self._recent if entry.env == env]
        if len(requests) < 2:  # only a pool that switches between models gains from a warm spare
            return

        def warm_when_quiet() -> None:
            # Not while a release is being verified (a context being created is booked to no process), and not
            # before the new model has answered and gone idle: two contexts time-share the GPU, so warming at
            # once would slow the very first answer the switch is waiting for.
            for future in self._releasing():
                future.exception()
            deadline = time.monotonic() + WARM_AFTER_AT_MOST
            while time.monotonic() < deadline and loaded.state == "ready" and not self._closed():
                if loaded.batches and not loaded.busy and not loaded.pending:
                    break
                time.sleep(0.01)
            if not self._closed():
                self.spawner.warm(requests)

        self._warming = threading.Thread(target=warm_when_quiet, name="vlmux-warm-when-quiet", daemon=True)
        self._warming.start()

    def cool_when_idle(self) -> None:
        """Once no model is on a GPU and none is loading for `warm_spare_linger` seconds, the spare drops its
        context: a pool with nothing loaded holds no device memory."""
        if not self.config.warm_spare:
            return

        def cool() -> None:
            if not self._holds_gpu():
                self.spawner.warm(None)

        timer = threading.Timer(self.config.warm_spare_linger, cool)
        timer.daemon = True
        timer.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the spare finished getting ready; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        warming = self._warming
        if warming is not None:
            warming.join(timeout)
            if warming.is_alive():
                return False
        return self.spawner.wait_ready(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.spawner.close()
