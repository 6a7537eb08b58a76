"""The parent's side of a worker: fork it from vlmux's fork server, send it requests, notice at once when it dies or
hangs, stop it. Never imports torch."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path

from vlmux.errors import WorkerDied, WorkerStartError
from vlmux.pool.forks import FORK_SERVER
from vlmux.pool.vram import Release
from vlmux.pool.workers import ReleaseCheck, SpareStatus, gpus_of
from vlmux.protocol import Abort, ChatText, Exit, Heartbeat, Reply, Request, Warm

HANG_TIMEOUT = 30.0  # seconds without a heartbeat or a reply after which a worker counts as hung
STATUS_WAIT = 1.0  # how long the fork server may take to report a worker it reaps
PAUSE_WAIT = 10.0  # seconds a paused worker's threads may take to stop (one in a driver call stops after it)


class WorkerProcess:
    """One worker process, forked from the fork server (a `workers.Worker`)."""

    _closed = True  # until a worker was forked: nothing to close

    def __init__(self, hang_timeout: float = HANG_TIMEOUT) -> None:
        self.hang_timeout = hang_timeout
        self._conn, self._pid, self._status_fd = FORK_SERVER.fork()
        self._closed = False
        self._pidfd = _pidfd(self._pid)
        self._lock = threading.Lock()  # one call at a time
        self._sending = threading.Lock()  # one writer at a time: a call's request, an Abort, Exit
        self.running_rows = 0  # chat rows the worker generates now, by its last heartbeat (0 once a call returns)
        self._status: int | None = None  # the wait status, once the fork server reported it
        self._status_lock = threading.Lock()  # one reader of the status pipe: a second would read its end as "unknown"
        self._killed_for: str | None = None  # why we killed it, when it hung or overran its time
        self.warm_env: dict[str, str] | None = None  # set once the worker created a context for these GPUs
        self.warmed: set[str] = set()  # model paths whose kernels it ran

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def sentinel(self) -> int:
        """Readable once the worker has exited. The status pipe is the fallback only: it also reads as ended when
        the fork server dies, though the worker may live on."""
        return self._pidfd if self._pidfd is not None else self._status_fd

    @property
    def context_env(self) -> dict[str, str] | None:
        return self.warm_env if self.warmed else None

    @property
    def alive(self) -> bool:
        return not self._closed and not wait([self.sentinel], 0)

    def private_bytes(self) -> int | None:
        """Host memory only this worker holds (what its exit gives back; pages shared with the fork server are
        not counted), from /proc; None where that cannot be read."""
        try:
            with open(f"/proc/{self.pid}/smaps_rollup") as f:
                return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
        except OSError:
            return None

    def call(self, request: Request, timeout: float | None = None,
             on_text: Callable[[ChatText], None] | None = None) -> Reply:
        """Send one request and wait for its reply, skipping heartbeats; a streamed chat's pieces go to `on_text`. Raises WorkerDied if the worker ends, sends
        nothing for `hang_timeout` seconds or takes longer than `timeout` (those two are killed first). A request
        that cannot be pickled raises at once and leaves the worker usable."""
        with self._lock:
            try:
                with self._sending:
                    self._conn.send(request)  # pickles the whole request before writing any of it
            except OSError:
                raise WorkerDied(self.exit_reason()) from None
            try:
                return self._wait_reply(timeout, on_text)
            finally:
                self.running_rows = 0

    def abort(self, ident: int) -> None:
        """Tell the worker its chat `ident` lost its caller (at any time, also while a call runs); a worker that is
        gone needs no telling."""
        try:
            with self._sending:
                self._conn.send(Abort(ident))
        except (OSError, ValueError):  # ValueError: the connection was closed by stop()
            pass

    def _wait_reply(self, timeout: float | None, on_text: Callable[[ChatText], None] | None) -> Reply:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            quiet = self.hang_timeout if deadline is None else min(self.hang_timeout, deadline - time.monotonic())
            ready = wait([self._conn, self.sentinel], max(0.0, quiet))
            if self._conn in ready:
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    raise WorkerDied(self.exit_reason()) from None
                if isinstance(message, ChatText):
                    if on_text is not None:
                        on_text(message)
                elif isinstance(message, Heartbeat):
                    self.running_rows = message.rows
                else:
                    return message
            elif ready:
                raise WorkerDied(self.exit_reason())
            elif deadline is not None and time.monotonic() >= deadline:
                raise self._kill_for(f"worker {self.pid} took longer than {timeout:g} s and was killed")
            else:
                raise self._kill_for(f"worker {self.pid} stopped answering for {self.hang_timeout:g} s and was killed")

    def stop(self, grace: float, check: ReleaseCheck) -> Release:
        """Ask the worker to exit, kill it if it has not within `grace` seconds, and report what its exit gave back
        once it is gone."""
        check.before_exit(self.pid)
        host_bytes, alive = None, True
        try:
            host_bytes = self.private_bytes()
            if self.alive:
                try:
                    with self._sending:
                        self._conn.send(Exit())
                except OSError:
                    pass
                wait([self.sentinel], grace)
            self.kill()
            alive = self.alive
            self._exit_status()  # kept for exit_reason(), before the pipe closes
            with self._lock:  # a call still waiting on the worker has seen it end
                self._close()
        finally:  # every before_exit has its after_exit: the check holds the GPU's books until then
            release = check.after_exit(self.pid, alive, host_bytes)
        return release

    def kill(self) -> None:
        """Kill the worker if it still runs; return once it is gone."""
        if not self.alive:
            return
        self._signal(signal.SIGKILL)
        wait([self.sentinel])

    def pause(self) -> None:
        """Stop the worker (SIGSTOP) and return once every thread of it has stopped: it then makes no driver call,
        so what it holds on a GPU stays as it is, until `resume`."""
        if not self.alive:
            return
        self._signal(signal.SIGSTOP)
        deadline = time.monotonic() + PAUSE_WAIT
        while self.alive and not _all_threads_stopped(self.pid) and time.monotonic() < deadline:
            time.sleep(0.001)

    def resume(self) -> None:
        if self.alive:
            self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)  # a pidfd cannot hit a recycled pid
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def exit_reason(self) -> str:
        """Why the worker ended: killed by us for hanging, a signal, or its exit code."""
        if self._killed_for is not None:
            return self._killed_for
        if not self._closed and not wait([self.sentinel], STATUS_WAIT):
            return f"worker {self.pid} stopped answering"
        status = self._exit_status()
        if status is None:
            return f"worker {self.pid} ended; how is unknown (the fork server that started it is gone)"
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the kernel's out-of-memory killer sends SIGKILL: check host RAM)" if name == "SIGKILL" else ""
            return f"worker {self.pid} was killed by {name}{hint}"
        return f"worker {self.pid} exited with code {code}"

    def _exit_status(self) -> int | None:
        """The wait status the fork server reported; None while the worker runs, or where the server died first."""
        with self._status_lock:
            if self._status is None and not self._closed and wait([self._status_fd], STATUS_WAIT):
                text = os.read(self._status_fd, 32)
                self._status = int(text) if text else None
            return self._status

    def _kill_for(self, reason: str) -> WorkerDied:
        self._killed_for = reason
        self.kill()
        return WorkerDied(reason)

    def _close(self) -> None:
        if self._closed:
            return
        with self._status_lock:
            self._closed = True
            self._conn.close()
            for fd in (self._pidfd, self._status_fd):
                if fd is not None:
                    os.close(fd)

    def __del__(self) -> None:
        self._close()


def stat_fields(stat: Path) -> list[str] | None:
    """The fields of a /proc/PID/stat (or /proc/PID/task/TID/stat) file after the name: state, parent, group, ...;
    None once the process or thread is gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split() or None
    except (OSError, IndexError):
        return None


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (or gone)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True
    states = [fields[0] for task in tasks if (fields := stat_fields(task / "stat")) is not None]
    return all(state in ("T", "t", "Z", "X") for state in states)


def _pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when `pid` exits, though it is not our child; None where pidfds are
    missing (Linux < 5.3) or the process is already gone."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class Spawner:
    """Keeps one spare worker forked and waiting, and forks the next one in the background.

    On request (`warm`) the spare also gets ready for given models on a GPU: its CUDA context, pinned staging
    memory and the models' kernels (`backends.transformers.warm_up`), which takes ~1.5 s off a load's critical
    path at the price of the context's memory while it waits (docs/BENCHMARKS.md). `warm(None)` makes it cold again."""

    def __init__(self, keep_spare: bool, hang_timeout: float = HANG_TIMEOUT) -> None:
        self._keep_spare = keep_spare
        self._hang_timeout = hang_timeout
        self._spare: WorkerProcess | None = None
        self._lock = threading.Lock()  # one call at a time
        self._sending = threading.Lock()  # one writer at a time: a call's request, an Abort, Exit
        self.running_rows = 0  # chat rows the worker generates now, by its last heartbeat (0 once a call returns)
        self._refill: threading.Thread | None = None
        self._warming: threading.Thread | None = None
        self._warm_lock = threading.Lock()
        self._warm_gate = threading.Event()  # cleared while a release check has the warm-up paused
        self._warm_gate.set()
        self._warming_worker: WorkerProcess | None = None  # the worker a Warm request may be running in
        self._paused: WorkerProcess | None = None
        self._dropped = False  # no spare until the next take: a pool that unloaded all keeps no worker
        self._passed_by = False  # a load did not wait for the warm-up's slice under way: it stops after that slice
        if keep_spare:
            self._start_refill()

    def take(self, env: dict[str, str] | None = None) -> WorkerProcess:
        """A worker for a load with this environment: the spare if it can serve it (cold, or warm for the same
        GPUs), else a fresh one."""
        with self._lock:
            spare, self._spare = self._spare, None
            self._dropped = False
            if spare is not None and spare is self._warming_worker:  # mid-slice: the load takes a fresh worker
                self._spare, spare, self._passed_by = spare, None, True
        if spare is not None and (not spare.alive or spare.warm_env not in (None, env)):
            spare.kill()
            spare = None
        worker = spare if spare is not None else WorkerProcess(self._hang_timeout)
        if self._keep_spare:
            self._start_refill()
        return worker

    def warm(self, requests: list[Warm] | None) -> None:
        """Get the spare ready for these models (one GPU placement, the env of the first), in the background;
        None: drop a warm spare for a cold one, so that no vlmux process holds device memory."""
        if not self._keep_spare:
            return
        if not requests:
            with self._lock:
                spare = self._spare if self._spare is not None and self._spare.warm_env is not None else None
                if spare is not None:
                    self._spare = None
            if spare is not None:
                spare.kill()
                self._start_refill()
            return
        with self._lock:
            self._passed_by = False
        warming = threading.Thread(target=self._warm, args=(requests,), name="vlmux-warm", daemon=True)
        warming.start()
        self._warming = warming  # started before others can see it: they may join it

    def warm_for(self) -> dict[str, str] | None:
        """The environment (GPUs) the spare holds a context for, or None if it is cold or missing."""
        with self._lock:
            spare = self._spare
        return spare.warm_env if spare is not None and spare.alive and spare.warmed else None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Whether the spare is forked and done warming, waiting up to `timeout` seconds for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._refill, self._warming):
            if thread is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    return False
        return True

    def drop_spare(self, check_for: Callable[[tuple[int, ...]], ReleaseCheck]) -> Release | None:
        """Stop the spare (a warm-up under way ends with it) and fork none until the next `take`."""
        with self._lock:
            self._dropped = True
        if self._refill is not None:
            self._refill.join()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        return spare.stop(0.0, check_for(gpus_of(spare.warm_env)))

    def spare_status(self) -> SpareStatus | None:
        with self._lock:
            spare, warming = self._spare, self._warming_worker is not None
        if spare is None or not spare.alive:
            return None
        return SpareStatus(spare.pid, gpus_of(spare.warm_env), warming, tuple(sorted(spare.warmed)))

    def close(self) -> None:
        self._keep_spare = False
        for thread in (self._refill, self._warming):
            if thread is not None:
                thread.join()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.kill()

    def _warm(self, requests: list[Warm]) -> None:
        with self._warm_lock:
            self._warm_spare(requests)

    def _warm_spare(self, requests: list[Warm]) -> None:
        if self._refill is not None:
            self._refill.join()
        with self._lock:
            spare = self._spare
        if spare is None or not spare.alive:
            return
        if spare.warm_env not in (None, requests[0].env):  # warm for other GPUs: start over with a cold one
            self.warm(None)
            return self._warm_spare(requests)
        spare.warm_env = requests[0].env  # before the context exists: take() must not place it elsewhere meanwhile
        try:
            for request in requests:
                if request.path in spare.warmed:
                    continue
                with self._lock:  # before the gate: a pause that clears the gate after this finds the worker
                    if self._spare is not spare or self._passed_by:  # a load took it or wants the GPU: yield
                        return
                    self._warming_worker = spare
                self._warm_gate.wait()
                try:
                    # a worker that loaded since skips it
                    spare.call(Warm(request.spec, request.path, requests[0].env, request.pin_weights))
                except WorkerDied:
                    return
                spare.warmed.add(request.path)
        finally:
            with self._lock:
                self._warming_worker = None

    def pause_warm(self) -> None:
        """Freeze the spare's warm-up where it is (its process stopped) until `resume_warm`: a release check reads
        the GPU's books meanwhile."""
        self._warm_gate.clear()
        with self._lock:
            worker = self._warming_worker
        if worker is not None:
            worker.pause()
            self._paused = worker

    def resume_warm(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.resume()
        self._warm_gate.set()

    def _start_refill(self) -> None:
        def refill() -> None:
            with self._lock:
                if self._spare is not None or not self._keep_spare or self._dropped:
                    return
            try:
                worker = WorkerProcess(self._hang_timeout)
            except WorkerStartError:  # the load that takes no spare starts its own worker and reports why it can't
                return
            with self._lock:
                if self._spare is None and self._keep_spare and not self._dropped:
                    self._spare, worker = worker, None
            if worker is not None:
                worker.kill()

        thread = threading.Thread(target=refill, name="vlmux-spare", daemon=True)
        thread.start()
        self._refill = thread  # started before others can see it: they may join it
