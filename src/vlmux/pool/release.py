"""Verified release: what a stopped worker's memory must come back to per GPU, and the wait until NVML shows it."""
from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from vlmux.pool import vram
from vlmux.pool.workers import GpuInventory


class UnattributedLock:
    """Per GPU, one change at a time to the memory NVML books to no process. A release check holds its GPUs from
    before the worker exits until its memory is back; a spare's warm-up (a context, pinned pages) and a load into a
    cold worker (a context) hold them too, so that what they add is never read as the exiting worker's residue."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    def acquire(self, gpus: Sequence[int]) -> None:
        with self._guard:
            locks = [self._locks.setdefault(gpu, threading.Lock()) for gpu in sorted(set(gpus))]
        for lock in locks:  # in index order: two holders of several GPUs cannot wait for each other
            lock.acquire()

    def release(self, gpus: Sequence[int]) -> None:
        for gpu in sorted(set(gpus), reverse=True):
            self._locks[gpu].release()

    @contextmanager
    def held(self, gpus: Sequence[int]) -> Iterator[None]:
        self.acquire(gpus)
        try:
            yield
        finally:
            self.release(gpus)


class VerifiedRelease:
    """The `ReleaseCheck` for a worker on `gpus` (none: a CPU worker, which reports the host memory it gave back).

    NVML books a few MiB per live CUDA context to no process. With no other context on a GPU, what must come back is
    the pool's baseline from before its first load: exact. With others alive (a warm spare, the next model, another
    tenant) it is the figure just before this worker exits, its own share included: nothing it held may stay
    behind, though a leak smaller than that share would go unseen until the GPU is quiet again."""

    def __init__(self, inventory: GpuInventory, gpus: Sequence[int], baselines: Mapping[int, int], timeout: float,
                 lock: UnattributedLock) -> None:
        self.inventory = inventory
        self.gpus = tuple(gpus)
        self.baselines = baselines
        self.timeout = timeout
        self._lock = lock
        self._held = False
        self._references: dict[int, int] = {}

    def before_exit(self, pid: int) -> None:
        self._lock.acquire(self.gpus)
        self._held = True
        for gpu in self.gpus:
            others = set(self.inventory.process_memory(gpu)) - {pid}
            self._references[gpu] = vram.unattributed(gpu, self.inventory) if others else self.baselines[gpu]

    def after_exit(self, pid: int, alive: bool, host_bytes: int | None) -> vram.Release:
        if not self.gpus:
            return vram.cpu_release(pid, alive, host_bytes)
        if not self._references:  # the worker was gone before anyone could look: the baseline is the reference
            self._references = {gpu: self.baselines[gpu] for gpu in self.gpus}
        try:
            return vram.combined([
                vram.wait_for_release(gpu, pid, self._references[gpu], self.timeout, inventory=self.inventory)
                for gpu in self.gpus
            ])
        finally:
            if self._held:
                self._held = False
                self._lock.release(self.gpus)
