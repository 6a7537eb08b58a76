"""The parent's side of a worker: fork it from vlmux's fork server, send it requests, notice at once when it dies or
hangs, stop it (pool/spawner.py keeps one ahead of the next load). Never imports torch."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path

from vlmux import hostmem
from vlmux.errors import WorkerDied
from vlmux.pool.forks import FORK_SERVER
from vlmux.pool.vram import Release
from vlmux.pool.workers import ReleaseCheck
from vlmux.protocol import Abort, ChatText, Exit, Heartbeat, Reply, Request

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
        return hostmem.private_bytes(self.pid)

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
