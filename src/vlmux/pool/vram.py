"""NVML accounting: what the device holds, what each process holds, and waiting until a worker's memory is back.

NVML reads the driver's books without creating a CUDA context, so the parent may call all of this.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmux.pool.workers import GpuInventory

MIB = 1024 * 1024

_init_lock = threading.Lock()
_init_error: str | None = None
_initialised = False


def nvml_status() -> str | None:
    """None when NVML works; otherwise why not (no driver, no NVIDIA GPU)."""
    global _initialised, _init_error
    with _init_lock:
        if not _initialised and _init_error is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                if pynvml.nvmlDeviceGetCount() == 0:
                    _init_error = "NVML sees no NVIDIA GPU"
                else:
                    _initialised = True
            except Exception as e:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors
                _init_error = f"no NVIDIA GPU to account for ({type(e).__name__}: {e})"
        return _init_error


def available() -> bool:
    return nvml_status() is None


@dataclass(frozen=True)
class GpuMemory:
    index: int  # NVML index, PCI bus order
    name: str
    total: int
    used: int

    @property
    def free(self) -> int:
        return self.total - self.used


def _handle(index: int):
    import pynvml

    if not available():
        raise RuntimeError(nvml_status())
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def gpus() -> list[GpuMemory]:
    if not available():
        return []
    import pynvml

    return [gpu_memory(i) for i in range(pynvml.nvmlDeviceGetCount())]


def gpu_memory(index: int) -> GpuMemory:
    import pynvml

    handle = _handle(index)
    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    name = pynvml.nvmlDeviceGetName(handle)
    return GpuMemory(index, name.decode() if isinstance(name, bytes) else name, info.total, info.used)


def process_memory(index: int) -> dict[int, int]:
    """Bytes held on the device by each process with a context there (pid -> bytes; 0 where NVML hides it)."""
    import pynvml

    handle = _handle(index)
    usage: dict[int, int] = {}
    for query in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            for process in query(handle):
                usage[process.pid] = usage.get(process.pid, 0) + (process.usedGpuMemory or 0)
        except pynvml.NVMLError:
            continue
    return usage


def physical_index(device: str) -> int | None:
    """The NVML index behind a torch-style device name as this process would see it, or None for the CPU."""
    if not device.startswith("cuda"):
        return None
    ordinal = int(device.partition(":")[2] or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return ordinal
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if ordinal >= len(entries):
        raise ValueError(f"{device} is not visible: CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[ordinal]
    if entry.isdigit():
        return int(entry)
    import pynvml

    return pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(entry))


@dataclass(frozen=True)
class Release:
    """What an unload gave back. `verified` is None where there was no GPU to check."""

    verified: bool | None
    process_gone: bool | None
    residue_mib: float | None  # memory left behind, in MiB
    seconds: float
    note: str = ""

    def __str__(self) -> str:
        if self.verified is None:
            return f"released ({self.note})"
        state = "verified" if self.verified else "NOT verified"
        residue = "unknown" if self.residue_mib is None else f"{self.residue_mib:.0f} MiB"
        text = f"release {state}: process gone={self.process_gone}, residue {residue}, {self.seconds:.2f} s"
        return f"{text} ({self.note})" if self.note else text


def cpu_release(pid: int, alive: bool, host_bytes: int | None) -> Release:
    """A CPU worker holds no device memory; say what its exit gave back to the host instead."""
    held = "" if host_bytes is None else f", its {host_bytes / MIB:.0f} MiB of host memory returned"
    state = "still running" if alive else f"exited{held}"
    return Release(None, not alive, None, 0.0, f"CPU worker {pid} {state}; no GPU memory to verify")


def unattributed(index: int, inventory: GpuInventory | None = None) -> int:
    """Device memory that NVML books to no running process: driver reservations, and anything a dead
    process failed to give back. Unlike the device total, other processes loading at the same time
    (the next model, another tenant) do not move it."""
    inventory = inventory or NVML
    return inventory.memory(index).used - sum(inventory.process_memory(index).values())


def wait_for_release(index: int, pid: int, baseline_unattributed: int, timeout: float, poll: float = 0.01,
                     inventory: GpuInventory | None = None) -> Release:
    """Poll until `pid` has no NVML process entry on GPU `index` and the memory booked to no process is back
    to its baseline; report the two separately. NVML has no event for either, so this polls."""
    inventory = inventory or NVML
    start = time.perf_counter()
    deadline = start + timeout
    process_gone = False
    while True:
        if not process_gone:
            process_gone = pid not in inventory.process_memory(index)
        residue = max(0, unattributed(index, inventory) - baseline_unattributed) / MIB if process_gone else None
        now = time.perf_counter()
        if (process_gone and residue == 0) or now >= deadline:
            if not process_gone:
                note = f"pid {pid} still holds a context after {timeout:.1f} s"
            elif residue:
                note = f"{residue:.0f} MiB booked to no process after {timeout:.1f} s"
            else:
                note = ""
            return Release(process_gone and residue == 0, process_gone, residue, now - start, note)
        time.sleep(poll)


def combined(releases: list[Release]) -> Release:
    """One release for a worker on several GPUs, or for several replicas: verified only if every part is."""
    if len(releases) == 1:
        return releases[0]
    checked = [r for r in releases if r.verified is not None]
    if not checked:
        return Release(None, all(r.process_gone for r in releases), None, max((r.seconds for r in releases), default=0.0),
                       f"{len(releases)} workers; no GPU memory to verify")
    residues = [r.residue_mib for r in checked]
    residue = None if any(value is None for value in residues) else sum(residues)
    notes = "; ".join(r.note for r in checked if r.note)
    return Release(all(r.verified for r in checked), all(r.process_gone for r in checked), residue,
                   max(r.seconds for r in releases), f"{len(releases)} parts" + (f": {notes}" if notes else ""))


class NvmlInventory:
    """The GPU inventory of this host, as NVML's books show it (the pool's default `GpuInventory`)."""

    def status(self) -> str | None:
        return nvml_status()

    def gpus(self) -> list[GpuMemory]:
        return gpus()

    def memory(self, index: int) -> GpuMemory:
        return gpu_memory(index)

    def process_memory(self, index: int) -> dict[int, int]:
        return process_memory(index)

    def physical_index(self, device: str) -> int | None:
        return physical_index(device)


NVML = NvmlInventory()
