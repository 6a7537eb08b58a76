"""Verified release: what a stopped worker's memory must come back to, and the wait until NVML shows it back."""
from __future__ import annotations

from vlmux.pool import vram
from vlmux.pool.resident import Resident
from vlmux.pool.inprocess import InProcessWorker


def release_references(resident: Resident, baselines: dict[int, int]) -> dict[int, int]:
    """Per GPU, what the memory booked to no process must come back to once the worker is gone.

    NVML books a few MiB per live CUDA context to no process (5-9 MiB each on the H200, bench/contexts.py).
    With no other context on the GPU that is the pool's baseline from before its first load: exact. With
    others alive (a warm spare, the next model, another tenant) it is the figure just before this worker
    exits, its own share included: nothing it held may stay behind, though a leak smaller than that share
    (~5 MiB) would go unseen until the GPU is quiet again."""
    references = {}
    for gpu in resident.placement.gpus:
        others = set(vram.process_memory(gpu)) - {resident.worker.pid}
        references[gpu] = vram.unattributed(gpu) if others else baselines[gpu]
    return references


def verify_release(resident: Resident, baselines: dict[int, int], timeout: float, host_bytes: int | None = None,
                   references: dict[int, int] | None = None) -> vram.Release:
    """Wait until the stopped worker's memory is back; `references` default to `release_references` now."""
    if isinstance(resident.worker, InProcessWorker):
        return resident.worker.release_report()
    if resident.gpu is None:
        return vram.cpu_release(resident.worker.pid, resident.worker.alive, host_bytes)
    references = references if references is not None else release_references(resident, baselines)
    return vram.combined([
        vram.wait_for_release(gpu, resident.worker.pid, references[gpu], timeout)
        for gpu in resident.placement.gpus
    ])
