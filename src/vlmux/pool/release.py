"""Verified release: what a stopped worker's memory must come back to per GPU, and the wait until NVML shows it."""
from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

from vlmux.pool import vram
from vlmux.pool.workers import GpuInventory


class Pausable(Protocol):
    """A holder of the lock whose changes can be frozen: a spare's warm-up (`WorkerFactory.pause_warm`)."""

    def pause_warm(self) -> None: ...

    def resume_warm(self) -> None: ...


class Turn:
    """One holding of the `UnattributedLock`: its GPUs, and the holders it paused to get them."""

    def __init__(self, gpus: Sequence[int]) -> None:
        self.gpus = tuple(sorted(set(gpus)))
        self.paused: list[Pausable] = []


class UnattributedLock:
    """Per GPU, one change at a time to the memory NVML books to no process. A release check holds its GPUs from
    before the worker exits until its memory is back; a load into a cold worker (a context) holds them too, and so
    does a spare's warm-up (a context, pinned pages), as a `Pausable`: a release check pauses it instead of waiting
    for it to end, so that an unload right after a model's first answer does not wait out the warm-up (seconds)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._holders: dict[int, Turn] = {}
        self._pausable: dict[int, Pausable] = {}  # GPU -> its holder, when that can be paused
        self._pausers: dict[int, Turn] = {}  # GPU -> the release check that paused its holder

    def acquire(self, gpus: Sequence[int], pausable: Pausable | None = None, preempt: bool = False) -> Turn:
        """All of `gpus` at once (no order to deadlock on). `preempt`: a holder that can be paused is paused."""
        turn = Turn(gpus)
        with self._changed:
            self._changed.wait_for(lambda: all(self._free(gpu, preempt) for gpu in turn.gpus))
            for gpu in turn.gpus:
                if gpu not in self._holders:
                    self._holders[gpu] = turn
                    if pausable is not None:
                        self._pausable[gpu] = pausable
                else:
                    self._pausers[gpu] = turn
                    if not any(self._pausable[gpu] is other for other in turn.paused):
                        turn.paused.append(self._pausable[gpu])
        for holder in turn.paused:
            holder.pause_warm()
        return turn

    def release(self, turn: Turn) -> None:
        with self._changed:
            for gpu in turn.gpus:
                if self._holders.get(gpu) is turn:
                    del self._holders[gpu]
                    self._pausable.pop(gpu, None)
                if self._pausers.get(gpu) is turn:
                    del self._pausers[gpu]
            for holder in turn.paused:  # before the next check can take the GPU and pause the holder again
                holder.resume_warm()
            self._changed.notify_all()

    @contextmanager
    def held(self, gpus: Sequence[int], pausable: Pausable | None = None, preempt: bool = False) -> Iterator[None]:
        turn = self.acquire(gpus, pausable, preempt)
        try:
            yield
        finally:
            self.release(turn)

    def _free(self, gpu: int, preempt: bool) -> bool:
        if gpu in self._pausers:
            return False
        return gpu not in self._holders or (preempt and gpu in self._pausable)


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
        self._turn: Turn | None = None
        self._references: dict[int, int] = {}

    def before_exit(self, pid: int) -> None:
        self._turn = self._lock.acquire(self.gpus, preempt=True)
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
            if self._turn is not None:
                turn, self._turn = self._turn, None
                self._lock.release(turn)
