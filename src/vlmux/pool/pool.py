"""ModelPool: models in worker processes under a VRAM budget, with queues, eviction and verified release."""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from concurrent.futures import Future
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from vlmux.pool import vram
from vlmux.pool.budget import parse_budget
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.pool.dispatch import dispatch
from vlmux.errors import ModelLoadError, ModelNotLoaded, PoolFull
from vlmux.estimate import estimate
from vlmux.pool.host_tier import host_budget, to_evict
from vlmux.hub import resolve_model
from vlmux.images import ImageInput
from vlmux.pool.placement import WorkerPlacement, place, select_gpus
from vlmux.pool.release import release_references, verify_release
from vlmux.pool.resident import ModelStatus, Request, Resident
from vlmux.pool.spare import WarmSpare
from vlmux.pool.inprocess import InProcessWorker
from vlmux.errors import WorkerDied
from vlmux.pool.process import WorkerProcess
from vlmux.protocol import Caption, Chat, ItemResult, Load, Loaded, Sleep, Wake

__all__ = ["ModelLoadError", "ModelNotLoaded", "ModelPool", "PoolFull"]


class ModelPool:
    def __init__(self, config: PoolConfig = PoolConfig()) -> None:
        self.config = config
        self._residents: dict[str, Resident] = {}
        self._baselines: dict[int, int] = {}  # per GPU: memory NVML booked to no process before our first model
        self._lock = threading.RLock()
        self._closed = False
        self._releasing: dict[Future, dict[int, int]] = {}  # unloads under way and the bytes per GPU they free
        self._loading: dict[str, Future] = {}  # loads under way, by name
        self._reserved: dict[str, dict[int, int]] = {}  # bytes per GPU that loads under way will take
        self._releasing_lock = threading.Lock()
        in_process = config.isolation == "none"
        self._spare = None if in_process else WarmSpare(config, self._releases, lambda: self._closed, self._holds_gpu)
        self.last_release: dict[str, vram.Release] = {}
        if config.keep_alive is not None:
            threading.Thread(target=self._expire_idle, name="vlmux-keep-alive", daemon=True).start()
        _POOLS.add(self)

    # -- loading and unloading ---------------------------------------------------------------------------

    def load(self, model: str | ModelSpec, name: str | None = None, placement: WorkerPlacement | None = None) -> str:
        """Load `model` under `name` (default: the model string); returns the name. The pool's lock is not held
        while the worker loads, so other models keep serving; concurrent loads of one name load it once.
        `placement` (from `place`) names the GPUs the worker sees; by default the spec's device decides."""
        spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
        name = name or spec.model
        while True:
            with self._lock:
                self._check_open()
                resident = self._residents.get(name)
                loading = self._loading.get(name)
                if loading is None and (resident is None or resident.state == "dead"):
                    loading = self._loading[name] = Future()
                    break
            if loading is None:  # loaded already
                if resident.state == "asleep":
                    self.wake(name)
                return name
            loading.exception()  # someone else is loading it: wait, then look again
        try:
            self._load(spec, name, placement)
            loading.set_result(name)
            return name
        except BaseException as e:
            loading.set_exception(e)
            raise
        finally:
            with self._lock:
                self._loading.pop(name, None)
                self._reserved.pop(name, None)

    def place(self, model: str | ModelSpec, gpus: str | Sequence[int] | None = None,
              replicas: int | None = None) -> tuple[WorkerPlacement, ...]:
        """Workers for `model` over `gpus` ("all", "0,1", indices; default: the spec's device), from NVML's
        inventory, the estimate, the budget and what this pool holds already. Raises PlacementError."""
        spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
        path = resolve_model(spec.model, spec.revision)
        if gpus is not None:
            if spec.device == "cpu":
                raise ModelLoadError("--gpus and --device cpu contradict each other")
            if not vram.available():
                raise ModelLoadError(f"--gpus {gpus} asked for, but {vram.nvml_status()}")
            inventory = select_gpus(vram.gpus(), gpus)
        else:
            gpu = vram.physical_index(self._place(spec.device))
            inventory = [] if gpu is None else [vram.gpu_memory(gpu)]
        need = estimate(path, spec.dtype, self.config.max_batch_size, 64, on_gpu=bool(inventory))
        with self._lock:
            booked = self._booked()
        return place(need, inventory, replicas, self.config.vram_budget, booked)

    def _load(self, spec: ModelSpec, name: str, placement: WorkerPlacement | None) -> None:
        path = resolve_model(spec.model, spec.revision)
        if placement is None:
            gpu = vram.physical_index(self._place(spec.device))
            need = estimate(path, spec.dtype, self.config.max_batch_size, 64, on_gpu=gpu is not None)
            placement = WorkerPlacement() if gpu is None else WorkerPlacement((gpu,), (), (need.total,))
        else:
            need = estimate(path, spec.dtype, self.config.max_batch_size, 64, on_gpu=bool(placement.gpus))
        gpu = placement.gpus[0] if placement.gpus else None
        with self._lock:
            for index, charge in placement.booked().items():
                self._make_room(index, charge, name)
                self._baselines.setdefault(index, vram.unattributed(index))
            self._reserved[name] = placement.booked()  # counted against the budget by loads that start meanwhile
        for attempt in range(2):  # a spare that died while waiting gets one fresh replacement
            worker = self._new_worker(gpu, placement.env)
            try:
                reply = worker.call(self._load_request(worker, spec, path, placement))
                break
            except WorkerDied as e:
                worker.stop(0)
                if attempt == 1:
                    raise ModelLoadError(f"could not load {spec.model}: {e}") from None
        if not isinstance(reply, Loaded):
            worker.stop(self.config.unload_grace)
            raise ModelLoadError(f"could not load {spec.model}: {reply.message}")
        resident = Resident(name, spec, path, worker, gpu, need, reply, placement=placement)
        resident.thread = threading.Thread(
            target=dispatch, args=(resident, self.config.max_batch_size, self.wake, self._on_death),
            name=f"vlmux-{name}", daemon=True,
        )
        with self._lock:
            self._residents[name] = resident
        resident.thread.start()
        if self._spare is not None:
            self._spare.after_load(resident)

    def unload(self, name: str) -> vram.Release:
        """Stop the model's worker and return once NVML shows its memory back (or the timeout says what stayed)."""
        return self.unload_async(name).result()

    def unload_async(self, name: str) -> Future:
        """Start unloading `name`; the future gives its Release. Loads that need the room wait for it."""
        with self._lock:
            resident = self._residents.pop(name, None)
            if resident is None:
                raise ModelNotLoaded(f"{name} is not loaded")
            with resident.condition:
                resident.state = "closing"
                resident.condition.notify_all()
            future: Future = Future()
            with self._releasing_lock:
                self._releasing[future] = resident.placement.booked()  # still on the GPU until verified

        def release() -> None:
            try:
                if resident.thread is not threading.current_thread():
                    resident.thread.join()
                host_bytes = getattr(resident.worker, "private_bytes", lambda: None)()
                references = release_references(resident, self._baselines)
                resident.worker.stop(self.config.unload_grace)
                self.last_release[name] = verify_release(
                    resident, self._baselines, self.config.release_timeout, host_bytes, references
                )
                if self._spare is not None:
                    self._spare.cool_when_idle()
                future.set_result(self.last_release[name])
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)
            finally:
                with self._releasing_lock:
                    self._releasing.pop(future, None)

        threading.Thread(target=release, name=f"vlmux-unload-{name}", daemon=True).start()
        return future

    def switch(self, old: str, new: str | ModelSpec, name: str | None = None) -> tuple[str, vram.Release]:
        """Unload `old` and load `new` (in the spare worker, warm for it if it was loaded lately) at the same time
        when the budget holds both, else one after the other; returns once `new` is loaded and `old`'s release
        is verified. The two overlap only when the spare already holds a context on the same GPU: `new`'s memory
        is then booked to its own process, and `old`'s release is checked as `release_references` says. A context
        being created is booked to no process for a moment, so with a cold spare the release is verified first."""
        spec = new if isinstance(new, ModelSpec) else ModelSpec(new)
        if not self._spare_is_warm_for(spec):  # a context created now would blur the old one's release check
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
        resident = self._get(name)
        if resident.placement.split:
            raise ValueError(f"{name} is split across GPUs {resident.placement.cuda_visible_devices}; it cannot sleep")
        budget = host_budget(self.config.host_ram_budget)
        if budget is not None:
            with self._lock:
                asleep = [(r.name, r.estimate.weights, r.last_used) for r in self._residents.values()
                          if r.state == "asleep" and r.name != name]
            for other in to_evict(name, resident.estimate.weights, asleep, budget):
                self.unload(other)
        resident.worker.call(Sleep())
        resident.state = "asleep"

    def wake(self, name: str) -> None:
        resident = self._get(name)
        if resident.state == "asleep":
            resident.worker.call(Wake())
            resident.state = "ready"

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            names = list(self._residents)
        for releasing in [self.unload_async(name) for name in names]:
            releasing.result()
        if self._spare is not None:
            self._spare.close()

    # -- requests -----------------------------------------------------------------------------------------

    def submit(self, name: str, payload: Caption | Chat) -> Future:
        """Queue a request; concurrent callers of one model are served together in batches."""
        resident = self._get(name)
        request = Request(payload)
        with resident.condition:
            if resident.state in ("closing", "dead"):
                raise ModelNotLoaded(f"{name} is being unloaded")
            resident.pending.append(request)
            resident.condition.notify()
        return request.future

    def submit_caption(
        self, name: str, items: list[ImageInput], prompts: list[str], gen: GenerationSpec, batch_size: int | None = None
    ) -> Future:
        """Queue images for captioning; the future gives Captions: one ItemResult per image, and token counts."""
        return self.submit(name, Caption(list(items), list(prompts), gen, batch_size or self.config.max_batch_size))

    def caption(self, name: str, items: list[ImageInput], prompts: list[str], gen: GenerationSpec) -> list[ItemResult]:
        return self.submit_caption(name, items, prompts, gen).result().results

    def chat(self, name: str, messages: list[dict], gen: GenerationSpec) -> str:
        return self.submit(name, Chat(messages, gen)).result()

    def status(self) -> list[ModelStatus]:
        now = time.monotonic()
        with self._lock:
            return [r.status(now) for r in self._residents.values()]

    def load_info(self, name: str) -> dict[str, float]:
        """Seconds the worker spent loading `name`: total and its parts."""
        loaded = self._get(name).loaded
        return {"total": round(loaded.seconds, 3), **{k: round(v, 3) for k, v in loaded.timings.items()}}

    def __contains__(self, name: str) -> bool:
        with self._lock:
            resident = self._residents.get(name)
            return resident is not None and resident.state != "dead"

    # -- internals ----------------------------------------------------------------------------------------

    def _get(self, name: str) -> Resident:
        with self._lock:
            resident = self._residents.get(name)
        if resident is None:
            raise ModelNotLoaded(f"{name} is not loaded; call load() first")
        if resident.state == "dead":  # its worker died: bring the model back on the next request
            self.load(resident.spec, name, resident.placement)
            with self._lock:
                return self._residents[name]
        return resident

    def _on_death(self, resident: Resident) -> None:
        resident.worker.stop(0)  # it stays listed as dead until _get reloads it
        self.last_release[resident.name] = verify_release(resident, self._baselines, self.config.release_timeout)

    def _place(self, device: str) -> str:
        if device == "auto":
            return "cuda:0" if vram.available() else "cpu"
        if device.startswith("cuda") and not vram.available():
            raise ModelLoadError(f"device {device} asked for, but {vram.nvml_status()}; use --device cpu")
        return "cuda:0" if device == "cuda" else device

    def _booked(self, skip: str | None = None) -> dict[int, int]:
        """Bytes per GPU that our loaded models and the loads under way are counted for."""
        booked: dict[int, int] = {}
        charges = [r.placement.booked() for r in self._residents.values() if r.state != "dead"]
        charges += [reserved for other, reserved in self._reserved.items() if other != skip]
        with self._releasing_lock:
            charges += list(self._releasing.values())
        for charge in charges:
            for gpu, size in charge.items():
                booked[gpu] = booked.get(gpu, 0) + size
        return booked

    def _make_room(self, gpu: int, need: int, name: str) -> None:
        budget = self._budget(gpu)
        while True:
            ours = self._booked(skip=name).get(gpu, 0)
            free = vram.gpu_memory(gpu).free
            if ours + need <= budget and need <= free:
                return
            releasing = self._releases()
            if releasing:  # memory on its way back may be enough; release threads never take self._lock
                for future in releasing:
                    future.exception()
                continue
            here = [r for r in self._residents.values() if gpu in r.placement.gpus]
            idle = [r for r in here if not r.busy and not r.pending]
            if not idle:
                resident = ", ".join(f"{r.name} (~{r.placement.booked()[gpu] / 2**30:.1f} GiB, busy)" for r in here)
                raise PoolFull(
                    f"{name} needs ~{need / 2**30:.1f} GiB on GPU {gpu}; budget {budget / 2**30:.1f} GiB, "
                    f"free {free / 2**30:.1f} GiB; resident: {resident or 'none'}. "
                    "Raise --vram-budget, lower --batch-size, or unload a model."
                )
            self.unload(min(idle, key=lambda r: r.last_used).name)

    def _budget(self, gpu: int) -> int:
        total = vram.gpu_memory(gpu).total
        budget = self.config.vram_budget
        if budget is None:
            return total
        return parse_budget(budget, total)

    def _load_request(self, worker, spec: ModelSpec, path: Path, placement: WorkerPlacement) -> Load:
        if isinstance(worker, InProcessWorker):  # the caller's process: leave its environment alone
            device = self._place(spec.device)
            if placement.gpus != (() if vram.physical_index(device) is None else (vram.physical_index(device),)):
                raise ModelLoadError("isolation='none' runs on the spec's device only; placements need worker processes")
            return Load(replace(spec, device=device), str(path), {})
        return Load(replace(spec, device=placement.device, max_memory=placement.max_memory), str(path),
                    placement.env)

    def _new_worker(self, gpu: int | None, env: dict[str, str]) -> WorkerProcess | InProcessWorker:
        return InProcessWorker(gpu) if self._spare is None else self._spare.take(env)

    def _spare_is_warm_for(self, spec: ModelSpec) -> bool:
        if self._spare is None or spec.device == "cpu" or not vram.available():
            return False
        return self._spare.is_warm_for(vram.physical_index(self._place(spec.device)))

    def wait_for_spare(self, timeout: float | None = None) -> bool:
        """Block until the spare worker finished getting ready (see PoolConfig.warm_spare); False on timeout."""
        return True if self._spare is None else self._spare.wait(timeout)

    def _releases(self) -> list[Future]:
        with self._releasing_lock:
            return list(self._releasing)

    def _holds_gpu(self) -> bool:
        """A model on a GPU or a load under way: the warm spare stays warm."""
        with self._lock:
            return bool(self._loading) or any(r.gpu is not None and r.state != "dead" for r in self._residents.values())

    def _expire_idle(self) -> None:
        while not self._closed:
            time.sleep(min(1.0, self.config.keep_alive / 4 or 0.05))
            now = time.monotonic()
            with self._lock:
                expired = [r.name for r in self._residents.values()
                           if not r.busy and not r.pending and now - r.last_used > self.config.keep_alive]
            for name in expired:
                try:
                    self.unload(name)
                except ModelNotLoaded:
                    pass

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ModelPool is closed")

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_POOLS: weakref.WeakSet[ModelPool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - at exit, one pool's failure must not keep the others' workers alive
            pass
