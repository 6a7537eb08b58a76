"""Fake GPUs for testing the scheduler on the CPU: an inventory whose memory the workers book as they load and give
back as they exit, and a worker factory whose workers are real (a tiny model in a real worker process, on the CPU)
but are placed, budgeted and released on the fake GPUs."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

from vlmux.pool import vram
from vlmux.pool.process import WorkerProcess
from vlmux.pool.spawner import Spawner
from vlmux.pool.workers import ReleaseCheck, SpareStatus, gpus_of
from vlmux.protocol import Load, Loaded, Reply, Request, Warm

GIB = 2**30
CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


class FakeGpus:
    """A `GpuInventory` of `count` GPUs of `total` bytes; `others` books memory to no process of ours."""

    def __init__(self, count: int = 1, total: int = 16 * GIB) -> None:
        self.total = total
        self._held: list[dict[int, int]] = [{} for _ in range(count)]
        self._lock = threading.Lock()

    def status(self) -> str | None:
        return None

    def gpus(self) -> list[vram.GpuMemory]:
        return [self.memory(index) for index in range(len(self._held))]

    def memory(self, index: int) -> vram.GpuMemory:
        with self._lock:
            return vram.GpuMemory(index, "fake", self.total, sum(self._held[index].values()))

    def process_memory(self, index: int) -> dict[int, int]:
        with self._lock:
            return dict(self._held[index])

    def physical_index(self, device: str) -> int | None:
        return int(device.partition(":")[2] or 0) if device.startswith("cuda") else None

    def hold(self, index: int, pid: int, size: int) -> None:
        with self._lock:
            self._held[index][pid] = size

    def drop(self, pid: int) -> None:
        with self._lock:
            for held in self._held:
                held.pop(pid, None)


@dataclass
class Event:
    what: str  # take | load_start | loaded | stop_start | stop_end
    name: str  # the model path
    pid: int
    at: float = field(default_factory=time.monotonic)


class Dropping:
    """A release check that drops what a worker booked on the fake GPUs once it is gone, then checks as told."""

    def __init__(self, gpus: FakeGpus, check: ReleaseCheck) -> None:
        self.gpus, self.check = gpus, check

    def before_exit(self, pid: int) -> None:
        self.check.before_exit(pid)

    def after_exit(self, pid: int, alive: bool, host_bytes: int | None) -> vram.Release:
        if not alive:
            self.gpus.drop(pid)
        return self.check.after_exit(pid, alive, host_bytes)


class FakeGpuWorker:
    """A real worker process that loads on the CPU what the scheduler placed on a fake GPU, and books the load's
    charge there until it exits. `stop_delay`: seconds its exit takes (a slow release); `load_delay`: seconds its
    load takes beyond the real one, counted in the load's reported seconds (a slow load)."""

    def __init__(self, inner: WorkerProcess, gpus: FakeGpus, gpu: int | None, factory: FakeGpuWorkers) -> None:
        self.inner, self.gpus, self.gpu, self.factory = inner, gpus, gpu, factory
        self.model = ""
        self.context_env = factory.warm_for()  # the fake's warm-up is a record: the spare counts as warm for it

    @property
    def pid(self) -> int:
        return self.inner.pid

    @property
    def sentinel(self) -> int | None:
        return self.inner.sentinel

    def call(self, request: Request, timeout: float | None = None, on_text=None) -> Reply:
        if isinstance(request, Load):
            self.model = request.path
            self.factory.loads.append(request)
            self.factory.record("load_start", self.model, self.pid)
            request = replace(request, spec=replace(request.spec, device="cpu", max_memory=()), env=CPU_ENV)
        reply = self.inner.call(request, timeout, on_text)
        if isinstance(reply, Loaded):
            delay = self.factory.load_delay.get(self.model, 0.0)
            time.sleep(delay)
            reply = replace(reply, seconds=reply.seconds + delay)
        if isinstance(reply, Loaded) and self.gpu is not None:
            self.gpus.hold(self.gpu, self.pid, self.factory.held_bytes)
            self.factory.record("loaded", self.model, self.pid)
        return reply

    def abort(self, ident: int) -> None:
        self.inner.abort(ident)

    def stop(self, grace: float, check: ReleaseCheck) -> vram.Release:
        self.factory.record("stop_start", self.model, self.pid)
        time.sleep(self.factory.stop_delay.get(self.model, 0.0))
        pid = self.pid
        release = self.inner.stop(grace, Dropping(self.gpus, check))
        self.factory.record("stop_end", self.model, pid)
        return release

    def exit_reason(self) -> str:
        return self.inner.exit_reason()


class FakeGpuWorkers:
    """The `WorkerFactory` for fake GPUs: real CPU workers from a `Spawner`; `warm` only records that the next
    worker counts as warm for that placement (no context exists to create) and books `spare_bytes` to the spare."""

    def __init__(self, gpus: FakeGpus, held_bytes: int = GIB, spare_bytes: int = 0) -> None:
        self.gpus = gpus
        self.held_bytes = held_bytes
        self.spare_bytes = spare_bytes
        self.stop_delay: dict[str, float] = {}  # model path -> seconds its workers take to stop
        self.load_delay: dict[str, float] = {}  # model path -> seconds its loads take beyond the real ones
        self.loads: list[Load] = []
        self.events: list[Event] = []
        self._spawner = Spawner(keep_spare=True)
        self._warm_env: dict[str, str] | None = None
        self._warmed: tuple[str, ...] = ()  # the checkpoints the spare was last warmed for
        self._lock = threading.Lock()

    def take(self, env: dict[str, str]) -> FakeGpuWorker:
        visible = env.get("CUDA_VISIBLE_DEVICES", "")
        worker = FakeGpuWorker(self._spawner.take(CPU_ENV), self.gpus, int(visible.split(",")[0]) if visible else None,
                               self)
        self.record("take", "", worker.pid)
        return worker

    def warm_for(self) -> dict[str, str] | None:
        return self._warm_env

    def warm(self, requests: list[Warm] | None) -> None:
        self._warm_env = requests[0].env if requests else None
        self._warmed = tuple(sorted(request.path for request in requests or ()))
        spare = self._spawner.spare_status() if self._spawner.wait_ready() else None
        if requests and spare is not None and self.spare_bytes:
            self.gpus.hold(gpus_of(self._warm_env)[0], spare.pid, self.spare_bytes)

    def drop_spare(self, check_for) -> vram.Release | None:
        self._warm_env = None
        held = self._held_by_spare()  # the real spare is a CPU worker: its fake GPUs are those it is booked on
        return self._spawner.drop_spare(lambda _gpus: Dropping(self.gpus, check_for(held)))

    def spare_status(self) -> SpareStatus | None:
        spare = self._spawner.spare_status()
        held = self._held_by_spare()
        return None if spare is None else replace(spare, gpus=held, models=self._warmed if held else ())

    def _held_by_spare(self) -> tuple[int, ...]:
        spare = self._spawner.spare_status()
        return () if spare is None else tuple(g.index for g in self.gpus.gpus()
                                              if spare.pid in self.gpus.process_memory(g.index))

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._spawner.wait_ready(timeout)

    def pause_warm(self) -> None:
        self._spawner.pause_warm()

    def resume_warm(self) -> None:
        self._spawner.resume_warm()

    def close(self) -> None:
        self._spawner.close()

    def record(self, what: str, name: str, pid: int) -> None:
        with self._lock:
            self.events.append(Event(what, name, pid))
