"""The pool's record of one loaded model: its worker, its state, and the queue of requests waiting for it."""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from vlmux.config import ModelSpec
from vlmux.estimate import Estimate
from vlmux.pool.placement import WorkerPlacement
from vlmux.pool.inprocess import InProcessWorker
from vlmux.pool.process import WorkerProcess
from vlmux.protocol import Caption, Chat, Loaded


@dataclass
class Request:
    payload: Caption | Chat
    future: Future = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(self.payload.items) if isinstance(self.payload, Caption) else 1


@dataclass
class Resident:
    name: str
    spec: ModelSpec
    path: Path
    worker: WorkerProcess | InProcessWorker
    gpu: int | None
    estimate: Estimate
    loaded: Loaded
    state: str = "ready"  # ready | asleep | dead | closing
    busy: bool = False
    requests: int = 0
    batches: int = 0
    last_used: float = field(default_factory=time.monotonic)
    pending: deque = field(default_factory=deque)
    condition: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None
    placement: WorkerPlacement = field(default_factory=WorkerPlacement)  # the GPUs its worker sees

    def status(self, now: float) -> ModelStatus:
        return ModelStatus(
            self.name, self.spec.model, self.state, self.device_name,
            self.loaded.dtype, self.worker.pid, self.estimate.total, now - self.last_used,
            holds_device_context=self.gpu is not None, requests=self.requests, batches=self.batches,
        )

    @property
    def device_name(self) -> str:
        if self.gpu is None:
            return self.loaded.device
        return ",".join(f"cuda:{gpu}" for gpu in self.placement.gpus)


@dataclass(frozen=True)
class ModelStatus:
    name: str
    model: str
    state: str
    device: str
    dtype: str
    pid: int
    estimate_bytes: int
    idle_seconds: float
    holds_device_context: bool
    requests: int  # requests answered
    batches: int  # worker calls that answered them: fewer than requests when callers were batched together
