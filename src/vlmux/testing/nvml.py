"""A fake `pynvml` for tests on the CPU: fake GPUs whose books the test writes (a driver reservation, each process's
context, memory a dead process left booked to no process), read through the real NVML code of vlmux.pool.vram
(`NvmlInventory`, `process_memory`, `wait_for_release`, `combined`) and of the pool's release check."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

MIB = 1024 * 1024
GIB = 1024 * MIB


class NVMLError(Exception):
    """pynvml's error base class."""


@dataclass
class Residue:
    """Memory booked to no process after a process exits; it clears after `reads` reads of the device's memory,
    or never (None)."""

    bytes: int
    reads: int | None


@dataclass
class FakeGpu:
    index: int
    total: int
    reserved: int  # the driver's own, booked to no process from the start
    contexts: dict[int, int] = field(default_factory=dict)  # pid -> bytes
    residues: list[Residue] = field(default_factory=list)

    @property
    def uuid(self) -> str:
        return f"GPU-fake-{self.index:04d}"

    def used(self) -> int:
        left = [r for r in self.residues if r.reads is None or r.reads > 0]
        for residue in left:
            if residue.reads is not None:
                residue.reads -= 1
        self.residues = left
        return self.reserved + sum(self.contexts.values()) + sum(r.bytes for r in left)


class FakeNvml(types.ModuleType):
    """The `pynvml` functions vlmux reads, over `gpus` fake devices; install with `install(monkeypatch, ...)`."""

    NVMLError = NVMLError

    def __init__(self, gpus: int = 1, total: int = 80 * GIB, reserved: int = 500 * MIB) -> None:
        super().__init__("pynvml")
        self.devices = [FakeGpu(index, total, reserved) for index in range(gpus)]

    # What the test does to the books.
    def hold(self, pid: int, gpu: int, nbytes: int) -> None:
        """Process `pid` holds a context of `nbytes` on `gpu`."""
        self.devices[gpu].contexts[pid] = nbytes

    def exit(self, pid: int, residue: int = 0, clears_after: int | None = 0) -> None:
        """`pid` exits: its contexts go; on each GPU it held, `residue` bytes stay booked to no process until
        `clears_after` reads of that GPU's memory (None: never)."""
        for gpu in self.devices:
            if gpu.contexts.pop(pid, None) is not None and residue:
                gpu.residues.append(Residue(residue, clears_after))

    # pynvml's interface.
    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.devices):
            raise NVMLError(f"Invalid Argument: no GPU {index}")
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeGpu:
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in self.devices:
            if gpu.uuid == uuid:
                return gpu
        raise NVMLError(f"Not Found: {uuid}")

    def nvmlDeviceGetIndex(self, handle: FakeGpu) -> int:
        return handle.index

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return "Fake GPU"

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeGpu) -> tuple[int, int]:
        return (9, 0)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> types.SimpleNamespace:
        used = handle.used()
        return types.SimpleNamespace(total=handle.total, used=used, free=handle.total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[types.SimpleNamespace]:
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=nbytes) for pid, nbytes in handle.contexts.items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeGpu) -> list[types.SimpleNamespace]:
        raise NVMLError("Not Supported")  # as on a data-centre GPU without graphics


def install(monkeypatch, gpus: int = 1, **books) -> FakeNvml:
    """`pynvml` replaced by a FakeNvml for one test (pytest's monkeypatch undoes it), and vram's memo of NVML's
    start-up forgotten so that the next read starts the fake."""
    from vlmux.pool import vram

    fake = FakeNvml(gpus, **books)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(vram, "_initialised", False)
    monkeypatch.setattr(vram, "_init_error", None)
    return fake
