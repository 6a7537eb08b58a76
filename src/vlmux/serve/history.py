"""What the dashboard shows of the past: memory per device over the last minutes, load and unload marks, and the
recent requests; drawn with the chart the run report uses."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

from vlmux.chart import Mark, Series, line_chart, time_ticks

MIB = 2**20


@dataclass(frozen=True)
class RequestRecord:
    at: float  # wall-clock seconds
    model: str
    status: int
    seconds: float
    first_token_seconds: float | None
    completion_tokens: int
    stream: bool


class History:
    def __init__(self, seconds: float, requests: int) -> None:
        self.seconds = seconds
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        self._events: deque[tuple[float, str, str]] = deque()
        self._requests: deque[RequestRecord] = deque(maxlen=requests)
        self._lock = threading.Lock()

    def sample(self, used: dict[str, int]) -> None:
        """Bytes in use per device ("GPU 0", or the workers' host memory on a host without GPUs)."""
        now = time.time()
        with self._lock:
            self._samples.append((now, dict(used)))
            self._trim(now)

    def event(self, model: str, kind: str) -> None:
        with self._lock:
            self._events.append((time.time(), model, kind))

    def request(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def requests(self) -> list[dict]:
        with self._lock:
            return [asdict(r) for r in reversed(self._requests)]

    def events(self) -> list[dict]:
        with self._lock:
            return [{"at": at, "model": model, "event": kind} for at, model, kind in self._events]

    def chart(self, width: int = 900, height: int = 280) -> str:
        """Memory over the window up to now, in MiB, x in seconds before now."""
        now = time.time()
        with self._lock:
            samples, events = list(self._samples), list(self._events)
        devices = sorted({device for _, used in samples for device in used})
        series = [Series(device, [(at - now, used[device] / MIB) for at, used in samples if device in used])
                  for device in devices]
        marks = [Mark(at - now, f"{model} {kind}", kind) for at, model, kind in events]
        start = max(-self.seconds, min((at - now for at, _ in samples), default=-60.0))
        return line_chart(series, marks, x_range=(start, 0.0), x_label=_ago, x_ticks=time_ticks,
                          width=width, height=height)

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.seconds:
            self._samples.popleft()
        while self._events and self._events[0][0] < now - self.seconds:
            self._events.popleft()


def _ago(seconds: float) -> str:
    if seconds == 0:
        return "now"
    if seconds <= -3600 and seconds % 3600 == 0:
        return f"{-seconds / 3600:g} h ago"
    return f"{-seconds / 60:g} min ago" if seconds <= -60 and seconds % 60 == 0 else f"{-seconds:g} s ago"
