"""isolation="none": the worker's handler run inside the caller's process, for those who insist.

Nothing can take back a context that this process owns, so the release report says honestly what stayed.
"""
from __future__ import annotations

import os
import threading

from vlmux.pool import vram
from vlmux.worker.handler import Handler
from vlmux.protocol import Reply, Request


class InProcessWorker:
    def __init__(self, gpu: int | None) -> None:
        self.pid = os.getpid()
        self.alive = True
        self._gpu = gpu
        self._held_before = self._held()
        self._handler = Handler()
        self._lock = threading.Lock()

    def call(self, request: Request) -> Reply:
        with self._lock:
            return self._handler.handle(request)

    def stop(self, grace: float) -> None:
        with self._lock:
            self._handler.close()  # del, gc.collect(), torch.cuda.empty_cache(): the usual in-process recipe
            self.alive = False

    def release_report(self) -> vram.Release:
        if self._gpu is None:
            return vram.Release(None, None, None, 0.0, "isolation='none' on the CPU: host memory stays with the allocator")
        residue = max(0, self._held() - self._held_before) / vram.MIB
        note = f"isolation='none': this process keeps its CUDA context and torch's cache ({residue:.0f} MiB stay)"
        return vram.Release(residue == 0, False, residue, 0.0, note)

    def _held(self) -> int:
        return 0 if self._gpu is None else vram.process_memory(self._gpu).get(self.pid, 0)
