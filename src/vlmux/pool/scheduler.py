"""The scheduler: every decision about which models hold which memory (load, evict, expire, unload, reload after a
death) is taken under its one lock, and every slow thing (a worker's load, exit or release check, an NVML wait)
happens outside it. Victims are chosen under the lock and released outside it, so a caller of one model waits for
another model's release only when it needs that model's memory."""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from concurrent.futures import Future, InvalidStateError, wait
from dataclasses import replace
from pathlib import Path

from vlmux.config import ModelSpec, PoolConfig
from vlmux.errors import ModelLoadError, ModelNotLoaded, PoolClosed, PoolFull, WorkerDied, WorkerStartError
from vlmux.hub import resolve_model
from vlmux.logs import LOGGER
from vlmux.pool import vram
from vlmux.budget import parse_budget
from vlmux.pool.exits import ExitWatch
from vlmux.pool.placement import WorkerPlacement, host_device
from vlmux.pool.release import UnattributedLock, VerifiedRelease
from vlmux.pool.room import GpuRoom, MustWait, Needs, charge_on, make_room
from vlmux.pool.runner import IDLE_GRACE, SERVING, Request, Runner, State, WorkerExit
from vlmux.pool.spare import WarmSpare
from vlmux.pool.workers import GpuInventory, WorkerFactory
from vlmux.protocol import Caption, Chat, Failed, Load, Loaded, Sleep, Wake

FRESH_SECONDS = 1.0  # a model just loaded is not evicted for a waiting load before those who loaded it get to ask


class Scheduler:
    def __init__(self, config: PoolConfig, inventory: GpuInventory, workers: WorkerFactory) -> None:
        self.config = config
        self.inventory = inventory
        self.workers = workers
        self.last_release: dict[str, vram.Release] = {}
        self.exit_listeners: list = []  # callables told each WorkerExit, from the thread that saw it
        self._lock = threading.Lock()
        self._runners: dict[str, Runner] = {}
        self._stopping: set[Runner] = set()  # off the table, still on their GPUs until their release is verified
        self._baselines: dict[int, int] = {}  # per GPU: memory NVML booked to no process before our first load
        self._closed = False
        self._room = threading.Condition(self._lock)  # a runner went idle or left: a waiting load looks again
        self._awaited: Counter[str] = Counter()  # per model, the loads waiting for it to go idle
        self._exits = ExitWatch(lambda runner: self._on_death(runner, WorkerDied(runner.worker.exit_reason())))
        self._unattributed = UnattributedLock()
        self.spare = WarmSpare(config, workers, self, self._unattributed)

    # -- loading ----------------------------------------------------------------------------------------------

    def load(self, spec: ModelSpec, name: str, placement: WorkerPlacement | None = None,
             max_new_tokens: int | None = None) -> Runner:
        """The runner for `name`, loaded: an existing one, or a new one once room is made for it."""
        with self._lock:
            existing = self._runners.get(name)
        if existing is not None and existing.state is not State.DEAD:  # the common case: no headers to read
            return self._await_loaded(existing)
        path = resolve_model(spec.model, spec.revision)
        tokens = max_new_tokens or Load.max_new_tokens
        on_gpu = bool(placement.gpus) if placement is not None else self.gpu(spec.device) is not None
        needs = Needs.of(spec, path, tokens, on_gpu, self.config.max_batch_size)
        deadline = time.monotonic() + self.config.wait_for_room
        holders: tuple[str, ...] = ()  # the models this load waits for, counted in _awaited while it waits
        try:
            while True:
                with self._lock:
                    self._check_open()
                    runner = self._runners.get(name)
                    if runner is None or runner.state is State.DEAD:
                        try:
                            runner, victims, waiting = self._decide(spec, path, name, placement, needs)
                        except MustWait as busy:
                            self._awaited.subtract(holders)
                            holders = busy.holders
                            self._awaited.update(holders)
                            deadline = max(deadline, busy.counts_from + self.config.wait_for_room)
                            if time.monotonic() >= deadline:
                                raise PoolFull(f"{busy} (waited {self.config.wait_for_room:g} s for one to go idle)"
                                               ) from None
                            self._room.wait(min(IDLE_GRACE, deadline - time.monotonic()))  # graces end unsaid
                            continue
                        if not waiting:
                            break
                if runner is not None and runner.state is not State.DEAD:
                    return self._await_loaded(runner)
                wait(waiting)
        finally:
            with self._lock:
                self._awaited.subtract(holders)
        self._stop_all(victims)
        return self._start(runner, tokens)

    def awaited(self, name: str) -> bool:
        """Whether a load waits for `name` to go idle to take its memory and `name` has had its minimum residency."""
        with self._lock:
            runner = self._runners.get(name)
            return self._awaited[name] > 0 and (runner is None or runner.yields(time.monotonic()))

    def _decide(self, spec: ModelSpec, path: Path, name: str, placement: WorkerPlacement | None,
                needs: Needs) -> tuple[Runner | None, list[Runner], list[Future]]:
        """With the lock held: a new runner and the idle runners to evict for it, or the releases to wait for."""
        runners, stopping = list(self._runners.values()), list(self._stopping)
        if placement is None:
            gpu = self.gpu(spec.device)
            placement = WorkerPlacement() if gpu is None else WorkerPlacement(
                (gpu,), (), (charge_on(self._gpu_room(gpu), needs, name, runners, stopping),))
        victims: list[Runner] = []
        for gpu, charge in placement.booked().items():
            self._baselines.setdefault(gpu, vram.unattributed(gpu, self.inventory))
            found, releasing = make_room(self._gpu_room(gpu), charge, name, runners, stopping, victims)
            if releasing:
                return self._runners.get(name), [], releasing
            victims += found
        runner = Runner(name, spec, path, placement, needs.smallest, self._lock, self.config)
        dead = self._runners.get(name)
        if dead is not None:  # requests queued for a worker that died go to its successor
            runner.pending, dead.pending = dead.pending, runner.pending
            runner.in_flight, dead.in_flight = len(runner.pending), dead.in_flight - len(runner.pending)
        self._runners[name] = runner
        for victim in victims:
            del self._runners[victim.name]
            self._retire(victim, ModelNotLoaded(f"{victim.name} was evicted"))
        return runner, victims, []

    def _start(self, runner: Runner, tokens: int) -> Runner:
        """Load the runner's worker, without the lock; a spare that died while it waited gets one replacement."""
        placement, need = runner.placement, runner.estimate
        budget = placement.charges[0] - need.weights - need.context if len(placement.gpus) == 1 else None
        request = Load(replace(runner.spec, device=placement.device, max_memory=placement.max_memory), str(runner.path),
                       placement.env, budget, self.config.max_batch_size, tokens)
        reply, release, failure = None, None, None
        for _ in range(2):
            with self._lock:
                if runner.state is State.STOPPING:
                    break
            try:
                worker = self.workers.take(placement.env)  # never the spare in the middle of a warm-up slice
                cold = worker.context_env != placement.env
                with self._lock:
                    runner.worker = worker
                # a new context's share; a warm-up under way is paused, not waited for
                with self._unattributed.held(placement.gpus if cold else (), preempt=True):
                    reply, release = worker.call(request), None
                break
            except WorkerDied as e:
                reply, release = Failed("load", str(e)), worker.stop(0, self._check(runner.placement.gpus))
            except Exception as e:  # noqa: BLE001 - no worker could start, or it could not take the request
                reply, release, failure = Failed("load", f"{type(e).__name__}: {e}"), None, e
                break
        with self._lock:
            cancelled = runner.state is State.STOPPING
            if isinstance(reply, Loaded) and not cancelled:
                runner.ready(reply, time.monotonic())
                runner.fresh_until = runner.ready_since + FRESH_SECONDS
                runner.start(self._on_idle, self._on_death, self.config.request_timeout)
                if runner.worker.sentinel is not None:
                    self._exits.watch(runner.worker.sentinel, runner)
                self._on_idle(runner)
            elif cancelled:
                runner.load_error = PoolClosed("the pool was closed") if self._closed else ModelNotLoaded(
                    f"{runner.name} was unloaded while it loaded")
            else:
                runner.load_error = failure if isinstance(failure, WorkerStartError) else ModelLoadError(
                    f"could not load {runner.spec.model}: {reply.message}")  # no worker to load into: a 503
                if self._runners.get(runner.name) is runner:
                    del self._runners[runner.name]
                runner.state = State.DEAD
                runner.fail_pending(runner.load_error)
            runner.changed.notify_all()
            self._room.notify_all()
        if runner.state in SERVING:
            self.spare.after_load(runner)
            return runner
        if release is None and runner.worker is not None:
            release = runner.worker.stop(self.config.unload_grace, self._check(runner.placement.gpus))
        self._finish_stop(runner, release or vram.Release(None, True, None, 0.0, "stopped before its worker started"))
        raise runner.load_error

    def _await_loaded(self, runner: Runner) -> Runner:
        with self._lock:
            while runner.state is State.LOADING:
                runner.changed.wait()
            if runner.state in SERVING:
                return runner
        raise runner.load_error or ModelNotLoaded(f"{runner.name} was unloaded while it loaded")

    # -- requests ---------------------------------------------------------------------------------------------

    def submit(self, name: str, payload: Caption | Chat | Sleep | Wake, on_text=None) -> Future:
        """Accept a request for `name`; a model whose worker died is loaded again for it. Once accepted, only its
        own failure, an unload or closing the pool can fail it: never expiry or eviction."""
        request = Request.of(payload, on_text)
        with self._lock:
            self._check_open()
            runner = self._runners.get(name)
            if runner is None or runner.state is State.STOPPING:
                raise ModelNotLoaded(f"{name} is not loaded; call load() first")
            runner.accept(request)
            reload = runner.state is State.DEAD and not runner.reloading
            runner.reloading |= reload
        if reload:
            threading.Thread(target=self._reload, args=(runner,), name=f"vlmux-reload-{name}", daemon=True).start()
        return request.future

    def _reload(self, dead: Runner) -> None:
        try:
            if not dead.stopped.done():
                dead.stopped.result()  # its memory is verified back before its successor books any
            self.load(dead.spec, dead.name, dead.placement)
        except Exception as e:  # noqa: BLE001 - the queued requests carry the reason
            with self._lock:
                dead.fail_pending(e)
                dead.reloading = False

    # -- stopping ---------------------------------------------------------------------------------------------

    def unload(self, name: str) -> Future:
        """Stop `name`'s worker; the future gives its verified Release."""
        with self._lock:
            runner = self._runners.pop(name, None)
            if runner is None:
                raise ModelNotLoaded(f"{name} is not loaded")
            stopping = runner.state not in (State.LOADING, State.DEAD)
            self._retire(runner, ModelNotLoaded(f"{name} was unloaded"))
        if stopping:
            self._stop_all([runner], block=False)
        return runner.stopped

    def close(self, kill: bool = False) -> None:
        """Stop every worker, loads under way included, and return once each one's release is verified. `kill`:
        the work is abandoned (an interrupt); kill the workers, loading ones too, and return once they are gone."""
        with self._lock:
            self._closed = True
            runners = list(self._runners.values())
            self._runners.clear()
            idle = [r for r in runners if r.state in SERVING]
            loading = [r for r in runners if r.state is State.LOADING and r.worker is not None]
            for runner in runners:
                self._retire(runner, PoolClosed("the pool was closed"))
            stopping = list(self._stopping)
        if kill:  # a loader interrupted in the caller's thread would never stop its worker
            self._stop_all(idle + loading, kill=True)
        else:
            self._stop_all(idle, block=False)
            wait([r.stopped for r in runners + stopping])
        self.spare.close()
        self._exits.close()

    def _retire(self, runner: Runner, reason: BaseException) -> None:
        """With the lock held: out of service; its caller, its loader or its death stops the worker."""
        if runner.state is not State.DEAD:
            runner.state = State.STOPPING
            self._stopping.add(runner)
        runner.fail_pending(reason)
        runner.answered.set()
        if runner.expiry is not None:
            runner.expiry.cancel()
            runner.expiry = None
        runner.changed.notify_all()

    def _stop_all(self, runners: list[Runner], block: bool = True, kill: bool = False) -> None:
        for runner in runners:
            threading.Thread(target=self._stop, args=(runner, kill), name=f"vlmux-stop-{runner.name}", daemon=True).start()
        if block:
            wait([r.stopped for r in runners])

    def _stop(self, runner: Runner, kill: bool = False) -> None:
        if runner.worker.sentinel is not None:
            self._exits.forget(runner.worker.sentinel)
        grace = 0.0 if kill else self.config.unload_grace
        try:  # killed: one look at its memory, no wait
            release = runner.worker.stop(grace, self._check(runner.placement.gpus, 0.0 if kill else None))
        except BaseException as e:  # noqa: BLE001 - whoever waits for the release gets the reason
            runner.stopped.set_exception(e)
            self._forget(runner)
            return
        runner.join(grace)
        self._finish_stop(runner, release)

    def _finish_stop(self, runner: Runner, release: vram.Release, keep: bool = False) -> None:
        self.last_release[runner.name] = release
        with contextlib.suppress(InvalidStateError):  # a load killed by close(kill=True) is stopped by its loader too
            runner.stopped.set_result(release)
        if not keep:
            self._forget(runner)

    def _forget(self, runner: Runner) -> None:
        with self._lock:
            self._stopping.discard(runner)
            self._room.notify_all()
        self.spare.after_release()

    def _check(self, gpus: tuple[int, ...], timeout: float | None = None) -> VerifiedRelease:
        return VerifiedRelease(self.inventory, gpus, self._baselines,
                               self.config.release_timeout if timeout is None else timeout, self._unattributed)

    def drop_spare(self) -> vram.Release | None:
        """Stop the spare worker, warm or cold, until the next load; its memory verified back like a model's."""
        return self.spare.drop(self._check)

    # -- events from runners, timers and exits ----------------------------------------------------------------

    def retain(self, name: str, keep_alive: float | None, pinned: bool) -> None:
        """`name`'s keep-alive (None: until evicted) and whether it may be evicted; an idle one's timer restarts."""
        with self._lock:
            runner = self._runners.get(name)
            if runner is None or runner.state not in SERVING:
                raise ModelNotLoaded(f"{name} is not loaded")
            runner.keep_alive, runner.pinned = keep_alive, pinned
            if runner.in_flight == 0:
                self._on_idle(runner)

    def _on_idle(self, runner: Runner) -> None:
        """With the lock held, when a runner has nothing in flight: its keep-alive timer starts."""
        self._room.notify_all()
        if runner.expiry is not None:
            runner.expiry.cancel()
        if runner.keep_alive is None or runner.state not in SERVING:
            runner.expiry = None
            return
        runner.expiry = threading.Timer(max(runner.keep_alive, runner.fresh_until - time.monotonic()), self._expire, (runner,))
        runner.expiry.daemon = True
        runner.expiry.start()

    def _expire(self, runner: Runner) -> None:
        with self._lock:
            current = runner.expiry is threading.current_thread() and runner.in_flight == 0
            if not current or self._runners.get(runner.name) is not runner or runner.state not in SERVING:
                return
            del self._runners[runner.name]
            self._retire(runner, ModelNotLoaded(f"{runner.name} expired"))
        self._stop(runner)

    def _on_death(self, runner: Runner, error: WorkerDied) -> None:
        """A worker ended by itself: its memory is verified back, and queued requests get a reload at once."""
        with self._lock:
            if runner.state in (State.STOPPING, State.DEAD):
                return
            runner.state = State.DEAD
            runner.changed.notify_all()
        LOGGER.warning("%s: %s; it is loaded again for its next request", runner.name, error)
        for listener in self.exit_listeners:
            listener(WorkerExit(runner.name, runner.worker.pid, str(error), runner.requests))
        if runner.worker.sentinel is not None:
            self._exits.forget(runner.worker.sentinel)
        self._finish_stop(runner, runner.worker.stop(0, self._check(runner.placement.gpus)), keep=True)
        with self._lock:
            reload = bool(runner.pending) and not runner.reloading and self._runners.get(runner.name) is runner
            runner.reloading |= reload
        if reload:
            self._reload(runner)

    # -- reading ----------------------------------------------------------------------------------------------

    def runner(self, name: str) -> Runner:
        with self._lock:
            runner = self._runners.get(name)
        if runner is None or runner.state is State.STOPPING:
            raise ModelNotLoaded(f"{name} is not loaded; call load() first")
        return runner

    def runners(self) -> list[Runner]:
        with self._lock:
            return list(self._runners.values())

    def booked(self) -> dict[int, int]:
        with self._lock:
            return self._booked()

    def holds_gpu(self) -> bool:
        """A model on a GPU, or one loading: a warm spare stays warm."""
        with self._lock:
            return any(r.placement.gpus and r.state is not State.DEAD for r in self._runners.values())

    @property
    def closed(self) -> bool:
        return self._closed

    def _booked(self) -> dict[int, int]:
        """Bytes per GPU that our runners are counted for, until each one's release is verified."""
        booked: Counter[int] = Counter()
        for runner in [*self._runners.values(), *self._stopping]:
            booked.update({} if runner.stopped.done() else runner.placement.booked())
        return dict(booked)

    def _gpu_room(self, gpu: int) -> GpuRoom:
        memory, budget = self.inventory.memory(gpu), self.config.vram_budget
        return GpuRoom(gpu, memory.total if budget is None else parse_budget(budget, memory.total),
                       self._booked().get(gpu, 0), memory.free)

    def gpu(self, device: str) -> int | None:
        """The NVML index a spec's device names on this host, or None for the CPU."""
        return self.inventory.physical_index(host_device(self.inventory, device))

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed("this ModelPool is closed")
