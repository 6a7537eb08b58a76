"""A `Runner`: one model in one worker. It owns the worker, the queue of requests accepted for it, the dispatcher
thread that serves them in batches (concurrent callers of one model share a worker call), its state and its count
of requests in flight. Its fields are guarded by the scheduler's lock, which it shares; it holds that lock only to
take or settle work, never across a worker call."""
from __future__ import annotations

import enum
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from vlmux.config import ModelSpec, PoolConfig
from vlmux.errors import ModelNotLoaded, RequestFailed, WorkerDied
from vlmux.estimate import Estimate
from vlmux.images import check_input
from vlmux.pool.placement import WorkerPlacement
from vlmux.pool.workers import Worker
from vlmux.protocol import (
    Caption, Captions, Chat, Chats, ChatsAnswered, ChatText, Chatted, Done, Failed, ItemResult, Loaded, Sleep, Wake,
)


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    SLEEPING = "sleeping"
    STOPPING = "stopping"
    DEAD = "dead"


SERVING = (State.READY, State.SLEEPING)
# Within its minimum residency a model whose queue empties is kept this long: closed-loop clients send their next
# requests right after their answers, and a queue empty between two of their batches is not a model with no work.
IDLE_GRACE = 0.25


@dataclass
class Request:
    payload: Caption | Chat | Sleep | Wake
    future: Future = field(default_factory=Future)
    bad: dict[int, str] = field(default_factory=dict)  # caption items that can never be images, by position
    on_text: Callable[[str], None] | None = None  # a streamed chat's pieces, as they come

    @classmethod
    def of(cls, payload: Caption | Chat | Sleep | Wake, on_text: Callable[[str], None] | None = None) -> Request:
        if not isinstance(payload, Caption):
            return cls(payload, on_text=on_text)
        reasons = [check_input(item) for item in payload.items]
        bad = {index: reason for index, reason in enumerate(reasons) if reason is not None}
        good = [item for item, reason in zip(payload.items, reasons) if reason is None]
        prompts = [prompt for prompt, reason in zip(payload.prompts, reasons) if reason is None]
        return cls(Caption(good, prompts, payload.gen, payload.batch_size), bad=bad)

    @property
    def size(self) -> int:
        return len(self.payload.items) if isinstance(self.payload, Caption) else 1


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
    in_flight: int = 0  # requests accepted and not yet answered
    keep_alive: float | None = None  # seconds it stays loaded once idle; None: until evicted or unloaded
    expires_in: float | None = None  # seconds until keep-alive unloads it; None: it is busy or never expires
    pinned: bool = False  # never evicted to make room for another model
    gpus: tuple[int, ...] = ()
    device_bytes: int = 0  # what its worker holds on its GPUs now (NVML), asleep included: its CUDA context
    host_bytes: int = 0  # pinned host memory its weights take while it sleeps


@dataclass(frozen=True)
class WorkerExit:
    """A worker that ended by itself (killed, crashed, hung), as the pool's exit listeners are told of it."""

    name: str
    pid: int
    reason: str  # WorkerDied's text: "worker 123 was killed by SIGKILL ..."
    requests: int  # requests its worker had answered


class Runner:
    def __init__(self, name: str, spec: ModelSpec, path: Path, placement: WorkerPlacement, estimate: Estimate,
                 lock: threading.Lock, config: PoolConfig) -> None:
        self.name, self.spec, self.path, self.placement, self.estimate = name, spec, path, placement, estimate
        self.keep_alive = config.keep_alive  # seconds it stays once idle (None: until evicted); changed by retain
        self.residency = config.min_residency  # None (auto) until loaded: then the seconds its load took (`ready`)
        self.ready_since: float | None = None  # when its load finished
        self.pinned = False  # never chosen as a victim to make room
        self.state = State.LOADING
        self.worker: Worker | None = None
        self.loaded: Loaded | None = None
        self.pending: deque[Request] = deque()
        self.in_flight = 0  # accepted and not yet settled: a runner with any is never evicted or expired
        self.requests = 0
        self.batches = 0
        self.last_used = time.monotonic()
        self.fresh_until = 0.0  # until then, a load that needs its room waits: its loaders' requests are on the way
        self.changed = threading.Condition(lock)  # new work, a state change, or in_flight reaching 0
        self.answered = threading.Event()  # it has answered a request and has none left (the spare warms then)
        self.stopped: Future = Future()  # its Release, once the worker is gone
        self.expiry: threading.Timer | None = None
        self.load_error: Exception | None = None
        self.reloading = False  # a dead runner's successor is being loaded for its queued requests
        self._thread: threading.Thread | None = None

    @property
    def gpu(self) -> int | None:
        return self.placement.gpus[0] if self.placement.gpus else None

    @property
    def batch_size(self) -> int:
        return self.loaded.batch_size if self.loaded is not None else 1

    # -- with the lock held ---------------------------------------------------------------------------------

    def ready(self, loaded: Loaded, now: float) -> None:
        """Its load finished: it serves, and its minimum residency starts (auto: the seconds that load took)."""
        self.loaded, self.state, self.ready_since = loaded, State.READY, now
        if self.residency is None:
            self.residency = loaded.seconds

    def kept_until(self) -> float:
        """When its minimum residency ends: from then on a load waiting for its memory goes before its new requests.
        Not while it loads, unless it has none. An idle runner is evicted whatever this says."""
        if self.residency == 0:
            return 0.0
        return math.inf if self.ready_since is None else self.ready_since + self.residency

    def evictable(self, now: float) -> bool:
        """Whether a load needing its room may stop it now: idle, not pinned, not just loaded, and past its minimum
        residency or idle for IDLE_GRACE."""
        return (self.state in SERVING and self.in_flight == 0 and not self.pinned and self.fresh_until <= now
                and (self.yields(now) or now - self.last_used >= IDLE_GRACE))

    def yields(self, now: float) -> bool:
        """Whether a load waiting for its memory goes before its new requests now."""
        return now >= self.kept_until()

    def accept(self, request: Request) -> None:
        self.in_flight += 1
        self.answered.clear()
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.pending.append(request)
        self.changed.notify_all()

    def fail_pending(self, error: BaseException) -> None:
        while self.pending:
            _settle(self.pending.popleft(), error)
            self.in_flight -= 1

    def status(self, now: float, device_usage: dict[int, dict[int, int]]) -> ModelStatus:
        """device_usage: GPU -> pid -> bytes, as NVML books them."""
        gpus = ",".join(f"cuda:{gpu}" for gpu in self.placement.gpus)
        idle = now - self.last_used
        expires = self.state in SERVING and self.in_flight == 0 and self.keep_alive is not None
        pid = self.worker.pid if self.worker else 0
        return ModelStatus(
            self.name, self.spec.model, self.state.value, gpus or (self.loaded.device if self.loaded else "cpu"),
            self.loaded.dtype if self.loaded else self.spec.dtype, pid,
            self.estimate.total, idle, holds_device_context=bool(gpus), requests=self.requests,
            batches=self.batches, in_flight=self.in_flight, keep_alive=self.keep_alive,
            expires_in=max(0.0, self.keep_alive - idle) if expires else None, pinned=self.pinned,
            gpus=tuple(self.placement.gpus),
            device_bytes=sum(device_usage.get(gpu, {}).get(pid, 0) for gpu in self.placement.gpus),
            host_bytes=self.estimate.weights if self.state is State.SLEEPING else 0,
        )

    # -- the dispatcher ---------------------------------------------------------------------------------------

    def start(self, on_idle: Callable[[Runner], None], on_death: Callable[[Runner, WorkerDied], None],
              request_timeout: float | None) -> None:
        """Serve the queue in a thread of its own until the runner stops or its worker dies. `on_idle` runs with
        the lock held whenever in_flight drops to 0; `on_death` runs without it after the worker died."""
        self._thread = threading.Thread(target=self._serve, args=(on_idle, on_death, request_timeout),
                                        name=f"vlmux-runner-{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _serve(self, on_idle, on_death, request_timeout: float | None) -> None:
        while True:
            with self.changed:
                while not self.pending and self.state in SERVING:
                    self.changed.wait()
                if self.state not in SERVING:
                    return
                batch = self._take_batch()
                waking = self.state is State.SLEEPING and not isinstance(batch[0].payload, (Sleep, Wake))
            try:
                if waking:
                    self._control(Wake(), request_timeout)
                self._serve_batch(batch, request_timeout)
            except WorkerDied as e:
                with self.changed:
                    stopping = self.state is State.STOPPING
                failure = ModelNotLoaded(f"{self.name} was unloaded while this request ran") if stopping else WorkerDied(
                    f"{self.name}: {e}; the request failed; the next request reloads the model")
                self._finish(batch, failure, on_idle)
                if not stopping:
                    on_death(self, e)
                return
            except Exception as e:  # noqa: BLE001 - the batch fails, the runner and its other callers go on
                self._finish(batch, e, on_idle)
                continue
            self._finish(batch, None, on_idle)

    def _take_batch(self) -> list[Request]:
        """Caption requests with the same generation settings join the first, up to the worker's batch size."""
        first = self.pending.popleft()
        batch = [first]
        if isinstance(first.payload, Caption):
            room = max(self.batch_size, first.size) - first.size
            while self.pending and isinstance(self.pending[0].payload, Caption):
                follower = self.pending[0]
                if follower.payload.gen != first.payload.gen or follower.size > room:
                    break
                batch.append(self.pending.popleft())
                room -= follower.size
        elif isinstance(first.payload, Chat):
            key = _chat_key(first.payload)
            while (self.pending and len(batch) < self.batch_size and isinstance(self.pending[0].payload, Chat)
                   and _chat_key(self.pending[0].payload) == key):
                batch.append(self.pending.popleft())
        return batch

    def _serve_batch(self, batch: list[Request], request_timeout: float | None) -> None:
        first = batch[0].payload
        if isinstance(first, (Sleep, Wake)):
            self._control(first, request_timeout)
            _settle(batch[0], None)
            return
        if isinstance(first, Chat):
            batch = self._abortable(batch)
            if not batch:
                return
            first = batch[0].payload
        if isinstance(first, Chat) and len(batch) == 1:
            on_text = batch[0].on_text
            reply = self.worker.call(first, request_timeout, None if on_text is None else lambda piece: on_text(piece.text))
            _settle(batch[0], reply if isinstance(reply, Chatted) else _failure(reply))
            return
        if isinstance(first, Chat):
            def on_text(piece: ChatText) -> None:
                if batch[piece.row].on_text is not None:
                    batch[piece.row].on_text(piece.text)

            reply = self.worker.call(Chats([request.payload for request in batch]), request_timeout, on_text)
            answers = reply.replies if isinstance(reply, ChatsAnswered) else [reply] * len(batch)
            for request, answer in zip(batch, answers):
                _settle(request, answer if isinstance(answer, Chatted) else _failure(answer))
            return
        items = [item for request in batch for item in request.payload.items]
        prompts = [prompt for request in batch for prompt in request.payload.prompts]
        reply = self.worker.call(Caption(items, prompts, first.gen, first.batch_size), request_timeout) if items else (
            Captions([], 0.0, 0))
        if not isinstance(reply, Captions):
            for request in batch:
                _settle(request, RuntimeError(_message(reply)))
            return
        offset = 0
        for number, request in enumerate(batch):
            results = reply.results[offset : offset + request.size]
            offset += request.size
            share = reply.tokens * request.size // max(1, len(reply.results))  # tokens are counted per worker call
            _settle(request, Captions(_with_bad(results, request.bad), reply.seconds, sum(r.error is None for r in results),
                                      share, *((reply.prepared_apart, reply.input_wait) if number == 0 else (0, 0.0))))

    def _abortable(self, batch: list[Request]) -> list[Request]:
        """The chats whose callers are still there; each one's worker is told (Abort) if its caller leaves later."""
        worker, live = self.worker, [request for request in batch if not request.future.cancelled()]
        for request in live:
            request.future.add_done_callback(
                lambda future, ident=request.payload.ident: worker.abort(ident) if future.cancelled() else None)
        return live

    def _control(self, payload: Sleep | Wake, request_timeout: float | None) -> None:
        reply = self.worker.call(payload, request_timeout)
        if not isinstance(reply, Done):
            raise RuntimeError(f"{type(payload).__name__.lower()} failed: {_message(reply)}")
        with self.changed:
            if self.state in SERVING:
                self.state = State.SLEEPING if isinstance(payload, Sleep) else State.READY
                self.changed.notify_all()

    def _finish(self, batch: list[Request], error: BaseException | None, on_idle) -> None:
        for request in batch:
            if error is not None:
                _settle(request, error)
        with self.changed:
            self.in_flight -= len(batch)
            self.last_used = time.monotonic()
            served = sum(not isinstance(r.payload, (Sleep, Wake)) for r in batch)
            if error is None and served:
                self.requests += served
                self.batches += 1
            if self.in_flight == 0:
                if self.batches:
                    self.answered.set()
                on_idle(self)
            self.changed.notify_all()


def _with_bad(results: list[ItemResult], bad: dict[int, str]) -> list[ItemResult]:
    """The worker's results with the items that never reached it put back in their places."""
    merged, sent = [], iter(results)
    for index in range(len(results) + len(bad)):
        merged.append(ItemResult(None, bad[index], bad_image=True) if index in bad else next(sent))
    return merged


def _chat_key(chat: Chat) -> tuple:
    """Conversations that can share a batch: the same generation settings, and all with images or all without."""
    contents = [message.get("content") for message in chat.messages if isinstance(message, dict)]
    items = [item for content in contents if isinstance(content, list) for item in content if isinstance(item, dict)]
    return chat.gen, any(item.get("type") == "image" for item in items)


def _settle(request: Request, outcome) -> None:
    if request.future.done():
        return
    if isinstance(outcome, BaseException):
        request.future.set_exception(outcome)
    else:
        request.future.set_result(outcome)


def _failure(reply) -> RuntimeError:
    return RequestFailed(reply.kind, reply.message) if isinstance(reply, Failed) else RuntimeError(_message(reply))


def _message(reply) -> str:
    return reply.message if isinstance(reply, Failed) else f"unexpected reply {type(reply).__name__}"
