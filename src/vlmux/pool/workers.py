"""The seams the scheduler is built on, declared: a `Worker` (one process, or the caller's own), the factory that
hands them out (with its spare), and the GPU inventory. The pool takes the factory and the inventory as parts, so
eviction and budgets are tested on the CPU with fake GPUs and real tiny workers (vlmux.testing.fakes)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vlmux.pool.vram import GpuMemory, Release
from vlmux.protocol import ChatText, Reply, Request, Warm


class ReleaseCheck(Protocol):
    """How a stopping worker's memory is verified: read what must come back before it exits, wait for it after.
    A worker's `stop` calls `after_exit` after every `before_exit`, also when stopping failed."""

    def before_exit(self, pid: int) -> None: ...

    def after_exit(self, pid: int, alive: bool, host_bytes: int | None) -> Release: ...


class Worker(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def sentinel(self) -> int | None:
        """A file descriptor that becomes readable once the worker has exited; None: it cannot exit by itself."""
        ...

    @property
    def context_env(self) -> dict[str, str] | None:
        """The environment (GPUs) this worker already holds a CUDA context for (a warm spare's), or None."""
        ...

    def call(self, request: Request, timeout: float | None = None,
             on_text: Callable[[ChatText], None] | None = None) -> Reply:
        """Send one request and wait for its reply; a streamed chat's pieces go to `on_text` meanwhile. Raises
        WorkerDied if the worker ends, stops answering (no heartbeat within its hang timeout) or takes longer than
        `timeout`; a worker that hung is killed first."""
        ...

    def abort(self, ident: int) -> None:
        """Tell the worker the chat `ident` lost its caller: it stops spending on it within one step (at any time,
        also while a call runs; nothing if the worker is gone or answered it already)."""
        ...

    def stop(self, grace: float, check: ReleaseCheck) -> Release:
        """Ask the worker to exit, kill it after `grace` seconds, and report what its exit gave back."""
        ...

    def exit_reason(self) -> str:
        """Why the worker ended (the signal, the exit code), for errors."""
        ...


@dataclass(frozen=True)
class SpareStatus:
    """The spare worker: its process, the GPUs it holds a context on (none: cold), the checkpoints it got ready for."""

    pid: int
    gpus: tuple[int, ...]
    warming: bool
    models: tuple[str, ...]


def gpus_of(env: dict[str, str] | None) -> tuple[int, ...]:
    """The GPUs a worker environment shows (CUDA_VISIBLE_DEVICES of NVML indices, as placement writes it)."""
    return tuple(int(gpu) for gpu in (env or {}).get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu)


class WorkerFactory(Protocol):
    def take(self, env: dict[str, str]) -> Worker:
        """A worker for a load whose environment (CUDA_VISIBLE_DEVICES) is `env`."""
        ...

    def warm_for(self) -> dict[str, str] | None:
        """The environment the next worker already holds a CUDA context for, or None."""
        ...

    def warm(self, requests: list[Warm] | None) -> None:
        """Have the next worker get ready for these models (None: drop its context), in the background."""
        ...

    def wait_ready(self, timeout: float | None = None) -> bool: ...

    def pause_warm(self) -> None:
        """Freeze a warm-up under way where it is until `resume_warm` (a release check reads the GPU meanwhile)."""
        ...

    def resume_warm(self) -> None: ...

    def drop_spare(self, check_for: Callable[[tuple[int, ...]], ReleaseCheck]) -> Release | None:
        """Stop the spare, warm or cold, and keep none until the next `take`; what it held is verified by the check
        `check_for` gives for its GPUs. None when there was no spare."""
        ...

    def spare_status(self) -> SpareStatus | None: ...

    def close(self) -> None: ...


class GpuInventory(Protocol):
    """What the pool knows of the host's GPUs; NVML's books on a real host (`vram.NvmlInventory`)."""

    def status(self) -> str | None:
        """None when GPUs can be accounted for; otherwise why not."""
        ...

    def gpus(self) -> list[GpuMemory]: ...

    def memory(self, index: int) -> GpuMemory: ...

    def process_memory(self, index: int) -> dict[int, int]: ...

    def physical_index(self, device: str) -> int | None: ...
