"""The server's use of one `ModelPool`: named models to specs, requests admitted up to --max-queue, loads on demand
(one per model, however many requests wait for it), keep-alive per request and per model through `retain`, and a
watcher that turns the pool's state into metrics, dashboard history and load / unload marks. Memory decisions stay
the pool's scheduler's: this module never chooses what to evict."""
from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from vlmux import hostmem
from vlmux.config import GenerationSpec, ModelSpec
from vlmux.errors import ModelNotLoaded
from vlmux.hub import ModelNotFound, resolve_model
from vlmux.pool import ModelPool
from vlmux.budget import parse_budget
from vlmux.pool.runner import ModelStatus, WorkerExit
from vlmux.pool.workers import GpuInventory
from vlmux.protocol import Chat, Chatted
from vlmux.serve.errors import ApiError, from_pool, shown
from vlmux.serve.history import History
from vlmux.serve.metrics import Metrics
from vlmux.serve.schema import UNSET, ChatRequest
from vlmux.serve.settings import ModelEntry, ServeConfig

WATCH_SECONDS = 0.5
SUBMIT_DEADLINE = 300.0  # seconds a request keeps reloading a model that others' loads keep evicting
YIELD_POLL = 0.02  # seconds between looks while a new request lets another model's waiting load go first


class Service:
    def __init__(self, config: ServeConfig, pool: ModelPool, inventory: GpuInventory) -> None:
        self.config, self.pool, self.inventory = config, pool, inventory
        self.metrics = Metrics()
        self.history = History(config.history_seconds, config.request_log)
        self._entries = {entry.name: entry for entry in config.models}
        self._loads: dict[str, asyncio.Future] = {}  # on-demand loads under way, shared by their waiters
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._held = 0  # chat requests admitted and not yet answered
        self._loader = ThreadPoolExecutor(16, thread_name_prefix="vlmux-serve-load")
        self._reported: dict[str, object] = {}  # per model, the last release already counted
        self._seen: dict[str, str] = {}  # model -> state at the last look
        self._requests: dict[str, tuple[int, int]] = {}  # model -> (worker pid, requests it answered) at the last look
        self._counted_pids: set[int] = set()  # workers whose answers an exit already counted
        self._answered_before: Counter[str] = Counter()  # per model, requests answered by its earlier workers
        self._residue_due: set[str] = set()  # unloaded models whose release is not yet reported
        self._looking = threading.Lock()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="vlmux-serve-watch", daemon=True)

    def start(self) -> None:
        self.pool.on_worker_exit(self._worker_exited)
        self._watcher.start()

    def _worker_exited(self, gone: WorkerExit) -> None:
        """A worker ended by itself: said in the log, counted by reason, marked on the chart; its answers kept."""
        with self._looking:
            self._answered_before[gone.name] += gone.requests
            self._counted_pids.add(gone.pid)
        self.metrics.worker_exits.labels(gone.name, exit_reason(gone.reason)).inc()
        self.history.event(gone.name, "worker exit")
        print(f"vlmux serve: {gone.name}'s worker ended: {gone.reason}; the next request loads it again", flush=True)

    def close(self) -> None:
        self._stop.set()
        self.pool.close()
        self._loader.shutdown(wait=False)

    # -- models -----------------------------------------------------------------------------------------------

    def entry(self, model: str) -> ModelEntry:
        entry = self._entries.get(model)
        if entry is not None:
            return entry
        if self.config.allow_any_model:
            try:
                resolve_model(model)
            except ModelNotFound as e:
                raise ApiError(404, f"model {shown(model)} not found: {str(e)[:200]}", "model_not_found", "model") from None
            return self._entries.setdefault(model, ModelEntry(model, model))
        names = ", ".join(sorted(self._entries)) or "none"
        raise ApiError(404, f"model {shown(model)} is not served here; models: {names}", "model_not_found", "model")

    def listed(self) -> list[str]:
        return list(self._entries)

    def spec(self, entry: ModelEntry) -> ModelSpec:
        return self.spec_of(self.config, entry)

    @staticmethod
    def spec_of(config: ServeConfig, entry: ModelEntry) -> ModelSpec:
        return ModelSpec(entry.model, device=config.device, dtype=entry.dtype, decode=entry.decode)

    async def load(self, entry: ModelEntry) -> float:
        """Load `entry` (or wait for the load under way); the seconds waited. Its keep-alive is set by `retain`
        after its first answer (a request's keep_alive of 0 must not unload it before that request is in)."""
        started = time.monotonic()
        loading = self._loads.get(entry.name)
        if loading is None:
            loop = asyncio.get_running_loop()
            loading = loop.run_in_executor(self._loader, self._load, entry)
            self._loads[entry.name] = loading
            loading.add_done_callback(lambda _: self._loads.pop(entry.name, None))
        try:
            await asyncio.shield(loading)
        except Exception as e:  # noqa: BLE001 - every pool error becomes an API error with its status
            raise from_pool(e, entry.name) from None
        return time.monotonic() - started

    def _load(self, entry: ModelEntry) -> None:
        started = time.monotonic()
        self.pool.load(self.spec(entry), entry.name)
        self.look()
        try:  # what a switch costs in a server (room waited for, the spare, the load itself), for the log
            worker, batch = self.pool.load_info(entry.name)["total"], self.pool.batch_size(entry.name)
        except ModelNotLoaded:
            return  # evicted or unloaded already
        print(f"vlmux serve: {entry.name} ready {time.monotonic() - started:.2f} s after its load was asked for; "
              f"the worker's load took {worker:.2f} s; batches of up to {batch}", flush=True)

    def retain(self, entry: ModelEntry, keep_alive: float | None | str = UNSET) -> None:
        seconds = self.config.model_keep_alive(entry) if keep_alive == UNSET else keep_alive
        try:
            self.pool.retain(entry.name, seconds, entry.pinned)
        except ModelNotLoaded:
            pass  # unloaded or evicted meanwhile: nothing to keep

    async def unload(self, name: str | None) -> dict:
        """Unload `name`, or every model and the spare worker (None): the answer lists each verified release."""
        loop = asyncio.get_running_loop()
        spare = None
        if name is None:  # the spare goes too, until a model is next asked for: nothing of ours stays on a GPU
            releases, spare = await loop.run_in_executor(self._loader, self.pool.unload_all)
        else:
            try:
                releases = {name: await asyncio.wrap_future(self.pool.unload_async(name))}
            except ModelNotLoaded:
                raise ApiError(404, f"model {shown(name)} is not loaded", "model_not_loaded", "model") from None
        await loop.run_in_executor(self._loader, self.look)
        return {"unloaded": [{"model": each, **_release(release)} for each, release in releases.items()],
                "spare": None if spare is None else _release(spare)}

    async def sleep(self, entry: ModelEntry) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._loader, self.pool.sleep, entry.name)
        except ModelNotLoaded:
            raise ApiError(404, f"model {entry.name!r} is not loaded", "model_not_loaded", "model") from None
        except Exception as e:  # noqa: BLE001 - e.g. a split model cannot sleep
            raise from_pool(e, entry.name) from None
        self.look()

    # -- chat ---------------------------------------------------------------------------------------------------

    def admit(self) -> None:
        """Count a chat request in, or refuse it with 429 when --max-queue are held already."""
        if self._held >= self.config.max_queue:
            raise ApiError(429, f"the server holds {self._held} requests, its --max-queue; try again shortly",
                           "queue_full")
        self._held += 1
        self.metrics.queue.set(self._held)

    def leave(self) -> None:
        self._held -= 1
        self.metrics.queue.set(self._held)

    def generation(self, request: ChatRequest) -> GenerationSpec:
        sample = bool(request.temperature)  # absent or 0: greedy, so answers repeat
        return GenerationSpec(max_new_tokens=request.max_tokens or self.config.default_max_tokens, do_sample=sample,
                              temperature=request.temperature if sample else 1.0,
                              top_p=request.top_p if sample and request.top_p is not None else 1.0,
                              seed=request.seed, max_pixels=self.config.max_pixels)

    async def answer(self, entry: ModelEntry, request: ChatRequest, messages: list[dict], on_loading,
                     on_text: Callable[[str], None] | None = None) -> Chatted:
        """The model's answer; `on_loading()` is called once if the request waits for its model to load; `on_text`
        (on a pool thread) gets the answer's text in pieces as it is generated."""
        payload = Chat(messages, self.generation(request), stream=on_text is not None, logprobs=request.logprobs)
        limit = self._limits.setdefault(entry.name, asyncio.Semaphore(entry.max_concurrent or 1_000_000))
        async with limit:
            deadline = time.monotonic() + SUBMIT_DEADLINE
            told = False
            while True:
                while not told and self.pool.awaited(entry.name) and time.monotonic() < deadline:
                    await asyncio.sleep(YIELD_POLL)  # another model's load waits for this one's memory: it goes first
                try:
                    future = self.pool.submit(entry.name, payload, on_text)
                    break
                except ModelNotLoaded:
                    if time.monotonic() > deadline:
                        raise ApiError(503, f"{entry.name} was evicted each time it loaded for this request",
                                       "model_unloaded") from None
                    if not told:
                        told = True
                        on_loading()
                    waited = await self.load(entry)
                    self.metrics.switch.labels(entry.name).observe(waited)
                except Exception as e:  # noqa: BLE001
                    raise from_pool(e, entry.name) from None
            if not told and self.pool.state(entry.name) == "loading":
                on_loading()
            try:
                reply = await asyncio.wrap_future(future)
            except Exception as e:  # noqa: BLE001
                raise from_pool(e, entry.name) from None
        self.retain(entry, request.keep_alive)
        return reply

    # -- reading --------------------------------------------------------------------------------------------------

    def ps(self) -> dict:
        status = self.pool.status()
        held = self._memory(status)
        now = time.time()
        models = [{"name": s.name, "model": s.model, "state": s.state, "device": s.device, "gpus": list(s.gpus),
                   "pid": s.pid, "vram_bytes": held.get(s.name, 0) if s.gpus else 0,
                   "host_bytes": _host(s.pid) if s.state == "sleeping" or not s.gpus else 0,
                   "estimate_bytes": s.estimate_bytes, "in_flight": s.in_flight,
                   "requests": s.requests + self._answered_before[s.name],
                   "keep_alive": s.keep_alive, "pinned": s.pinned,
                   "expires_at": None if s.expires_in is None else round(now + s.expires_in, 3)} for s in status]
        gpus = []
        if self.inventory.status() is None:
            usage = {gpu: self.inventory.process_memory(gpu) for gpu in {gpu for s in status for gpu in s.gpus}}
            # a split model's share per GPU; ModelStatus.device_bytes sums them
            booked = {gpu: {s.name: held.get(s.pid, 0) for s in status if gpu in s.gpus} for gpu, held in usage.items()}
            gpus = [{"index": g.index, "name": g.name, "total": g.total, "used": g.used,
                     "budget": self._budget(g.total), "models": booked.get(g.index, {})} for g in self.inventory.gpus()]
        return {"models": models, "spare": self._spare(), "gpus": gpus, "queue": self._held,
                "max_queue": self.config.max_queue}

    def _spare(self) -> dict | None:
        """The spare worker: cold (a process only), warming or warm on its GPUs, and the checkpoints it is ready for."""
        spare = self.pool.spare_status()
        if spare is None:
            return None
        held = 0
        if spare.gpus and self.inventory.status() is None:
            held = sum(self.inventory.process_memory(gpu).get(spare.pid, 0) for gpu in spare.gpus)
        state = "warming" if spare.warming else "warm" if spare.gpus else "cold"
        return {"pid": spare.pid, "state": state, "gpus": list(spare.gpus), "models": list(spare.models),
                "vram_bytes": held}

    def _budget(self, total: int) -> int:
        return total if self.config.vram_budget is None else parse_budget(self.config.vram_budget, total)

    def _memory(self, status: list[ModelStatus]) -> dict[str, int]:
        """Bytes each model's worker holds: device memory on its GPUs, else its private host memory."""
        return {s.name: s.device_bytes if s.gpus else _host(s.pid) for s in status}

    def look(self) -> None:
        """Compare the pool with the last look: loads and unloads become marks and counts; gauges are set."""
        with self._looking:
            status = self.pool.status()
            states = {s.name: s.state for s in status}
            held = self._memory(status)
            for name, state in states.items():
                if state in ("ready", "sleeping") and self._seen.get(name) not in ("ready", "sleeping"):
                    self.history.event(name, "load")
                    self.metrics.loads.labels(name).inc()
                    print(f"vlmux serve: {name} loaded", flush=True)
            pids = {s.name: s.pid for s in status}
            for name, (pid, answered) in self._requests.items():  # a worker gone: its answers stay counted
                if pids.get(name) != pid and pid not in self._counted_pids:
                    self._answered_before[name] += answered
            for name, state in self._seen.items():
                if state in ("ready", "sleeping") and states.get(name) not in ("ready", "sleeping"):
                    self.history.event(name, "unload")
                    self.metrics.unloads.labels(name).inc()
                    self._residue_due.add(name)
            for name in list(self._residue_due):
                release = self.pool.last_release.get(name)
                if release is not None and name not in states and release is not self._reported.get(name):
                    self._reported[name] = release  # the same object again is the previous unload's, not this one's
                    self.metrics.residue.labels(name).set(release.residue_mib or 0.0)
                    self._residue_due.discard(name)
                    print(f"vlmux serve: {name} unloaded: {release}", flush=True)
            self._seen = states
            self._requests = {s.name: (s.pid, s.requests) for s in status}
            self.metrics.models(states, {s.name: held[s.name] for s in status if s.gpus},
                                {s.name: held[s.name] for s in status if not s.gpus})
            if self.inventory.status() is None:
                self.history.sample({f"GPU {g.index}": g.used for g in self.inventory.gpus()})
            else:
                self.history.sample({"workers (host memory)": sum(held.values())})

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            try:
                self.look()
            except Exception:  # noqa: BLE001 - a failed look must not end the watcher; the next one tries again
                continue


def exit_reason(text: str) -> str:
    """The `reason` label of vlmux_worker_exits_total from WorkerDied's text: SIGKILL, exit_1, hang, timeout or unknown."""
    if match := re.search(r"killed by (SIG[A-Z0-9]+)", text):
        return match.group(1)
    if match := re.search(r"exited with code (-?\d+)", text):
        return f"exit_{match.group(1)}"
    if "took longer than" in text:
        return "timeout"
    return "hang" if "stopped answering" in text else "unknown"


def _host(pid: int) -> int:
    """A worker's private host memory: the one measure of a CPU worker, as its release line reports it."""
    return hostmem.private_bytes(pid) or 0


def _release(release) -> dict:
    return {"verified": release.verified, "process_gone": release.process_gone, "residue_mib": release.residue_mib,
            "seconds": round(release.seconds, 3), "release": str(release)}
