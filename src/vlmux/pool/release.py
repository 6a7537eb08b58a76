"""Verified release: what a stopped worker's memory must come back to per GPU, and the wait until NVML shows it."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from vlmux.pool import vram
from vlmux.pool.workers import GpuInventory


class VerifiedRelease:
    """The `ReleaseCheck` for a worker on `gpus` (none: a CPU worker, which reports the host memory it gave back).

    NVML books a few MiB per live CUDA context to no process. With no other context on a GPU, what must come back is
    the pool's baseline from before its first load: exact. With others alive (a warm spare, the next model, another
    tenant) it is the figure just before this worker exits, its own share included: nothing it held may stay
    behind, though a leak smaller than that share would go unseen until the GPU is quiet again."""

    def __init__(self, inventory: GpuInventory, gpus: Sequence[int], baselines: Mapping[int, int], timeout: float) -> None:
        self.inventory = inventory
        self.gpus = tuple(gpus)
        self.baselines = baselines
        self.timeout = timeout
        self._references: dict[int, int] = {}

    def before_exit(self, pid: int) -> None:
        for gpu in self.gpus:
            others = set(self.inventory.process_memory(gpu)) - {pid}
            self._references[gpu] = vram.unattributed(gpu, self.inventory) if others else self.baselines[gpu]

    def after_exit(self, pid: int, alive: bool, host_bytes: int | None) -> vram.Release:
        if not self.gpus:
            return vram.cpu_release(pid, alive, host_bytes)
        if not self._references:  # the worker was gone before anyone could look: the baseline is the reference
            self._references = {gpu: self.baselines[gpu] for gpu in self.gpus}
        return vram.combined([
            vram.wait_for_release(gpu, pid, self._references[gpu], self.timeout, inventory=self.inventory)
            for gpu in self.gpus
        ])
