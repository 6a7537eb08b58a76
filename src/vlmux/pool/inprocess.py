"""isolation="none": the worker's handler run inside the caller's process, for those who insist.

Nothing can take back a context that this process owns, so the release report says honestly what stayed.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import replace

from vlmux.errors import ModelLoadError
from vlmux.pool import vram
from vlmux.pool.workers import ReleaseCheck
from vlmux.protocol import ChatText, Load, Reply, Request, Warm


class InProcessWorker:
    def __init__(self) -> None:
        from vlmux.worker.handler import Handler  # torch comes in with it: only for a pool that asked for this

        self._handler = Handler()
        self._lock = threading.Lock()
        self._gpu: int | None = None
        self._held_before = 0

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def sentinel(self) -> int | None:
        return None  # it ends with the caller

    @property
    def context_env(self) -> None:
        return None

    def call(self, request: Request, timeout: float | None = None,
             on_text: Callable[[ChatText], None] | None = None) -> Reply:
        if isinstance(request, Load):
            request = self._in_this_process(request)
        send = None if on_text is None else lambda message: on_text(message) if isinstance(message, ChatText) else None
        with self._lock:
            return self._handler.handle(request, send)

    def abort(self, ident: int) -> None:
        self._handler.aborts.add(ident)

    def stop(self, grace: float, check: ReleaseCheck) -> vram.Release:
        with self._lock:
            self._handler.close()  # del, gc.collect(), torch.cuda.empty_cache(): the usual in-process recipe
        if self._gpu is None:
            return vram.Release(None, None, None, 0.0, "isolation='none' on the CPU: host memory stays with the allocator")
        residue = max(0, self._held() - self._held_before) / vram.MIB
        note = f"isolation='none': this process keeps its CUDA context and torch's cache ({residue:.0f} MiB stay)"
        return vram.Release(residue == 0, False, residue, 0.0, note)

    def exit_reason(self) -> str:
        return "the in-process model failed"

    def _in_this_process(self, request: Load) -> Load:
        """The caller's process keeps its environment: the placement's GPU is named as the caller sees it."""
        gpus = [entry for entry in request.env.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry]
        if len(gpus) > 1:
            raise ModelLoadError("isolation='none' runs on one device; a model split over GPUs needs worker processes")
        self._gpu = int(gpus[0]) if gpus else None
        self._held_before = self._held()
        visible = [entry for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry]
        ordinal = visible.index(gpus[0]) if gpus and visible else self._gpu
        device = "cpu" if self._gpu is None else f"cuda:{ordinal}"
        return replace(request, spec=replace(request.spec, device=device), env={})

    def _held(self) -> int:
        return 0 if self._gpu is None else vram.process_memory(self._gpu).get(os.getpid(), 0)


class InProcessWorkers:
    """The `WorkerFactory` of isolation="none": a new in-process worker per load, and no spare."""

    def take(self, env: dict[str, str]) -> InProcessWorker:
        return InProcessWorker()

    def warm_for(self) -> dict[str, str] | None:
        return None

    def warm(self, requests: list[Warm] | None) -> None:
        return None

    def wait_ready(self, timeout: float | None = None) -> bool:
        return True

    def pause_warm(self) -> None:
        return None

    def resume_warm(self) -> None:
        return None

    def drop_spare(self, check_for) -> vram.Release | None:
        return None

    def spare_status(self) -> None:
        return None

    def close(self) -> None:
        return None
