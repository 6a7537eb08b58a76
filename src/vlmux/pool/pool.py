"""ModelPool: models in worker processes under a VRAM budget, with request queues, eviction, keep-alive and
verified release. The decisions are the scheduler's; this is the public face of it."""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import replace

from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.errors import ContextExceeded, ModelLoadError, ModelNotLoaded, PoolClosed
from vlmux.estimate import context_length
from vlmux.hub import resolve_model
from vlmux.images import ImageInput, from_caller
from vlmux.pool import vram
from vlmux.pool.host_tier import host_budget, to_evict
from vlmux.pool.inprocess import InProcessWorkers
from vlmux.pool.placement import PlacementError, WorkerPlacement, place, select_gpus
from vlmux.pool.spawner import Spawner
from vlmux.pool.room import Needs
from vlmux.pool.runner import ModelStatus, State, WorkerExit
from vlmux.pool.scheduler import Scheduler
from vlmux.pool.workers import GpuInventory, SpareStatus, WorkerFactory
from vlmux.protocol import Caption, Captions, Chat, ItemResult, Sleep, Wake

__all__ = ["ModelPool", "ModelStatus"]


class ModelPool:
    def __init__(self, config: PoolConfig = PoolConfig(), *, inventory: GpuInventory | None = None,
                 workers: WorkerFactory | None = None) -> None:
        """`inventory` (default: NVML's) and `workers` (default: worker processes from a fork server, with a spare;
        with isolation="none", the caller's own process) are parts a test or an embedding may replace."""
        self.config = config
        if workers is None:
            in_process = config.isolation == "none"
            workers = InProcessWorkers() if in_process else Spawner(config.spare_worker, config.hang_timeout)
        self.pid = os.getpid()  # the process it serves: a forked child's copy refuses work and never closes it
        self._own_scheduler = Scheduler(config, inventory or vram.NVML, workers)
        self._closing = threading.Lock()
        _POOLS.add(self)
        # dropped without close(): its workers (and their VRAM) must not wait for the interpreter's exit
        weakref.finalize(self, _close_dropped, self._own_scheduler, self.pid).atexit = False

    @property
    def _scheduler(self) -> Scheduler:
        if os.getpid() != self.pid:  # its threads did not survive the fork, and its workers answer the parent
            raise PoolClosed(f"this ModelPool belongs to process {self.pid}, the parent of this forked process; "
                             "create a pool in this process (or fork before creating one)")
        return self._own_scheduler

    @property
    def last_release(self) -> dict[str, vram.Release]:
        return self._scheduler.last_release

    def on_worker_exit(self, listener: Callable[[WorkerExit], None]) -> None:
        """Call `listener` with each worker that ends by itself (not on unload), from the pool's thread that saw it."""
        self._scheduler.exit_listeners.append(listener)

    # -- loading and unloading ---------------------------------------------------------------------------

    def load(self, model: str | ModelSpec, name: str | None = None, placement: WorkerPlacement | None = None,
             max_new_tokens: int | None = None) -> str:
        """Load `model` under `name` (default: the model string); returns the name. Other models keep serving
        while it loads; concurrent loads of one name load it once. `placement` (from `place`) names the GPUs the
        worker sees; by default the spec's device decides. `max_new_tokens`: what its batches are sized for."""
        spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
        name = name or spec.model
        with self._killed_on_interrupt():
            runner = self._scheduler.load(spec, name, placement, max_new_tokens)
        if runner.state is State.SLEEPING:
            self.wake(name)
        return name

    def place(self, model: str | ModelSpec, gpus: str | Sequence[int] | None = None,
              replicas: int | None = None, max_new_tokens: int | None = None) -> tuple[WorkerPlacement, ...]:
        """Workers for `model` over `gpus` ("all", "0,1", indices; default: the spec's device), from the GPU
        inventory, the estimate, the budget and what this pool holds already. Each gets room for the largest
        batch where the GPUs have it, else for its smallest. Raises PlacementError."""
        spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
        path = resolve_model(spec.model, spec.revision)
        inventory = self._scheduler.inventory
        if gpus is not None:
            if spec.device == "cpu":
                raise ModelLoadError("--gpus and --device cpu contradict each other")
            if inventory.status() is not None:
                raise ModelLoadError(f"--gpus {gpus} asked for, but {inventory.status()}")
            chosen = select_gpus(inventory.gpus(), gpus)
        else:
            gpu = self._scheduler.gpu(spec.device)
            chosen = [] if gpu is None else [inventory.memory(gpu)]
        needs = Needs.of(spec, path, max_new_tokens or GenerationSpec.max_new_tokens, bool(chosen), self.config.max_batch_size)
        booked = self._scheduler.booked()
        try:
            return place(needs.largest, chosen, replicas, self.config.vram_budget, booked)
        except PlacementError:
            return place(needs.smallest, chosen, replicas, self.config.vram_budget, booked)

    def unload(self, name: str) -> vram.Release:
        """Stop the model's worker and return once NVML shows its memory back (or the timeout says what stayed)."""
        with self._killed_on_interrupt():
            return self.unload_async(name).result()

    def unload_async(self, name: str) -> Future:
        """Start unloading `name`; the future gives its Release. Loads that need the room wait for it."""
        return self._scheduler.unload(name)

    def unload_all(self) -> tuple[dict[str, vram.Release], vram.Release | None]:
        """Unload every model (loads under way included) and stop the spare worker, warm or cold: once it returns, no
        worker of this pool is left and NVML shows their memory back. The next load forks a spare again. Returns
        each model's Release and the spare's (None if there was none)."""
        releasing = {}
        for runner in self._scheduler.runners():
            with contextlib.suppress(ModelNotLoaded):  # unloaded or evicted meanwhile
                releasing[runner.name] = self.unload_async(runner.name)
        wait(releasing.values())
        spare = self._scheduler.drop_spare()
        return {name: future.result() for name, future in releasing.items()}, spare

    def switch(self, old: str, new: str | ModelSpec, name: str | None = None) -> tuple[str, vram.Release]:
        """Unload `old` and load `new` (in the spare worker, warm for it if it was loaded lately) at the same time
        when the budget holds both, else one after the other; returns once `new` is loaded and `old`'s release
        is verified. The two overlap only when the spare already holds a context on the same GPU: `new`'s memory
        is then booked to its own process. A context being created is booked to no process for a moment, so with
        a cold spare the old model's release is verified first."""
        spec = new if isinstance(new, ModelSpec) else ModelSpec(new)
        if not self._spare_is_warm_for(spec):
            release = self.unload(old)
            return self.load(spec, name), release
        releasing = self.unload_async(old)
        try:
            loaded = self.load(spec, name)
        finally:
            release = releasing.result()
        return loaded, release

    def sleep(self, name: str) -> None:
        """Move the model's weights to pinned host RAM (the hot tier); over PoolConfig.host_ram_budget, the models
        asleep longest are unloaded first."""
        runner = self._scheduler.runner(name)
        if runner.placement.split:
            raise ValueError(f"{name} is split across GPUs {runner.placement.cuda_visible_devices}; it cannot sleep")
        budget = host_budget(self.config.host_ram_budget)
        if budget is not None:
            asleep = [(r.name, r.estimate.weights, r.last_used) for r in self._scheduler.runners()
                      if r.state is State.SLEEPING and r.name != name]
            for other in to_evict(name, runner.estimate.weights, asleep, budget):
                self.unload(other)
        with self._killed_on_interrupt():
            self.submit(name, Sleep()).result()

    def retain(self, name: str, keep_alive: float | None, pinned: bool = False) -> None:
        """How long the loaded model `name` stays once idle, from now or its next answer (0: unloaded as soon as it
        has nothing in flight; None: until evicted or unloaded), and whether eviction may take it (pinned: never)."""
        self._scheduler.retain(name, keep_alive, pinned)

    def wake(self, name: str) -> None:
        with self._killed_on_interrupt():
            self.submit(name, Wake()).result()

    def state(self, name: str) -> str | None:
        """`name`'s state ("loading", "ready", "sleeping", "dead"), or None if the pool does not hold it (or it is
        stopping); unlike status(), it asks NVML nothing, so it suits a per-request check."""
        try:
            return self._scheduler.runner(name).state.value
        except ModelNotLoaded:
            return None

    def awaited(self, name: str) -> bool:
        """Whether a load waits for `name` to go idle to take its memory, and `name` has been loaded for its
        `PoolConfig.min_residency`: a caller that holds back new requests for it meanwhile lets that load go first
        (first come, first served across models on a full GPU, with no model evicted soon after its load)."""
        return self._scheduler.awaited(name)

    def close(self, kill: bool = False) -> None:
        """Stop every worker (loads and unloads under way included); returns once each release is verified.
        kill=True, for work abandoned (an interrupt): kill the workers without unload_grace, return once they are
        gone; each release is looked at once, not waited for. Ctrl-C in a call that waits on a worker (load, caption,
        chat, unload, sleep, wake, or in a `with` block) closes the pool that way. In a forked child it does
        nothing: the pool and its workers are the parent's."""
        if os.getpid() != self.pid:  # a forked child's copy: the workers are its parent's
            return
        with self._closing:
            self._scheduler.close(kill)

    # -- requests -----------------------------------------------------------------------------------------

    def submit(self, name: str, payload: Caption | Chat | Sleep | Wake,
               on_text: Callable[[str], None] | None = None) -> Future:
        """Queue a request; concurrent callers of one model are served together in batches. An item that can
        never be an image fails alone (ItemResult with bad_image); an accepted request is never failed by
        eviction or keep-alive expiry. For a `Chat(..., stream=True)`, `on_text` gets the answer's text in pieces
        as the model generates it (on the pool's thread; they join to the Chatted record's text). Relative image
        paths are resolved here, in the caller's current folder."""
        if isinstance(payload, (Caption, Chat)):
            _check_request(payload, self._scheduler.runner(name).path)
        return self._scheduler.submit(name, _from_caller(payload), on_text)

    def submit_caption(self, name: str, items: list[ImageInput], prompts: str | list[str], gen: GenerationSpec,
                       batch_size: int | None = None) -> Future:
        """Queue images for captioning; the future gives Captions: one ItemResult per image, and token counts.
        batch_size None: the worker's own (auto, or PoolConfig.max_batch_size). One prompt string: the same for all."""
        items = list(items)
        return self.submit(name, Caption(items, [prompts] * len(items) if isinstance(prompts, str) else list(prompts),
                                         gen, batch_size))

    def caption(self, name: str, items: list[ImageInput], prompts: str | list[str], gen: GenerationSpec) -> list[ItemResult]:
        future = self.submit_caption(name, items, prompts, gen)
        with self._killed_on_interrupt():
            captions: Captions = future.result()
        return captions.results

    def chat(self, name: str, messages: list[dict], gen: GenerationSpec,
             on_text: Callable[[str], None] | None = None) -> str:
        """The answer's text, also given to `on_text` in pieces as it is generated if that is set; `submit(name,
        Chat(...))` gives the Chatted record with its token counts."""
        future = self.submit(name, Chat(messages, gen, stream=on_text is not None), on_text)
        with self._killed_on_interrupt():
            return future.result().text

    # -- reading ------------------------------------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        now = time.monotonic()
        runners = self._scheduler.runners()
        inventory = self._scheduler.inventory
        gpus = {gpu for runner in runners for gpu in runner.placement.gpus} if inventory.status() is None else set()
        usage = {gpu: inventory.process_memory(gpu) for gpu in gpus}
        return [runner.status(now, usage) for runner in runners]

    def load_info(self, name: str) -> dict[str, float]:
        """Seconds the worker spent loading `name`: total and its parts."""
        loaded = self._loaded(name)
        return {"total": round(loaded.seconds, 3), **{k: round(v, 3) for k, v in loaded.timings.items()}}

    def batch_size(self, name: str) -> int:
        """Images per model batch the worker chose for `name` (auto, within its memory budget) or was given."""
        return self._loaded(name).batch_size

    def spare_status(self) -> SpareStatus | None:
        """The spare worker (its pid, the GPUs it holds a context on, the checkpoints it is ready for), or None."""
        return self._scheduler.workers.spare_status()

    def wait_for_spare(self, timeout: float | None = None) -> bool:
        """Block until the spare worker finished getting ready (see PoolConfig.warm_spare); False on timeout."""
        return self._scheduler.spare.wait(timeout)

    def __contains__(self, name: str) -> bool:
        try:
            return self._scheduler.runner(name).state is not State.DEAD
        except ModelNotLoaded:
            return False

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(kill=kind is not None and issubclass(kind, KeyboardInterrupt))

    @contextlib.contextmanager
    def _killed_on_interrupt(self) -> Iterator[None]:
        """Ctrl-C in a call that waits on a worker: the caller gave up, so the pool is closed with its workers
        killed at once, as `vlmux caption` does; a worker stopped mid-load would otherwise be waited for forever,
        and a busy one for unload_grace."""
        try:
            yield
        except KeyboardInterrupt:
            self.close(kill=True)
            raise

    def _loaded(self, name: str):
        loaded = self._scheduler.runner(name).loaded
        if loaded is None:
            raise ModelNotLoaded(f"{name} is still loading")
        return loaded

    def _spare_is_warm_for(self, spec: ModelSpec) -> bool:
        if spec.device == "cpu" or self._scheduler.inventory.status() is not None:
            return False
        return self._scheduler.spare.is_warm_for(self._scheduler.gpu(spec.device))


def _check_request(payload: Caption | Chat, path) -> None:
    """What a worker would fail on obscurely (or run for minutes with), refused here with what to do instead."""
    if not isinstance(payload.gen, GenerationSpec):
        raise TypeError(f"gen must be a vlmux.GenerationSpec, not {type(payload.gen).__name__}")
    context = _context(path)
    if context is not None and payload.gen.max_new_tokens >= context:
        raise ContextExceeded(f"max_new_tokens={payload.gen.max_new_tokens} leaves no room for the prompt in the model's "
                         f"context of {context} tokens (its max_position_embeddings); ask for fewer")
    if isinstance(payload, Caption):
        if len(payload.prompts) != len(payload.items) or not all(isinstance(p, str) for p in payload.prompts):
            raise ValueError(f"{len(payload.prompts)} prompts for {len(payload.items)} images: give one string per "
                             "image, or one string for all")
        return
    if not isinstance(payload.messages, list) or not payload.messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(payload.messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(content, (str, list)):
            raise ValueError(f"messages[{index}] must be a dict with a 'role' string and a 'content' string or list "
                             f"of parts, not {message!r:.80}")
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict) or part.get("type") not in ("text", "image") or part["type"] not in part:
                raise ValueError(f"messages[{index}] has a content part {part!r:.80}; a part is "
                                 "{'type': 'text', 'text': ...} or {'type': 'image', 'image': path | bytes | PIL image}")


_context = functools.lru_cache(maxsize=64)(context_length)


def _from_caller(payload: Caption | Chat | Sleep | Wake) -> Caption | Chat | Sleep | Wake:
    """The request with its image paths made absolute in the caller's folder (a worker's folder is another)."""
    if isinstance(payload, Caption):
        return replace(payload, items=[from_caller(item) for item in payload.items])
    if isinstance(payload, Chat):
        return replace(payload, messages=[_message_from_caller(message) for message in payload.messages])
    return payload


def _message_from_caller(message: dict) -> dict:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts = [{**part, "image": from_caller(part["image"])} if isinstance(part, dict) and part.get("type") == "image"
             and "image" in part else part for part in content]
    return {**message, "content": parts}


def _close_dropped(scheduler: Scheduler, pid: int) -> None:
    """A pool's finaliser: close it on a thread of its own, as the garbage collector may run this on any thread,
    one of the pool's own included; not a daemon, so the interpreter's exit waits for it. Never in a forked child."""
    if os.getpid() == pid and not scheduler.closed:
        threading.Thread(target=scheduler.close, name="vlmux-close-dropped").start()


_POOLS: weakref.WeakSet[ModelPool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - at exit, one pool's failure must not keep the others' workers alive
            pass
