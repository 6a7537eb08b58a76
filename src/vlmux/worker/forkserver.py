"""vlmux's fork server: workers fork from one process that imported torch once. Not multiprocessing's, which
re-imports the caller's main module in every child (a script without a main guard, stdin, a notebook)."""
from __future__ import annotations

import os
import signal
import socket
import traceback
from multiprocessing.connection import Connection, wait

PID_BYTES = 8
START_REPORT_BYTES = 4  # the length of the start-up report that precedes every fork answer


def main(control_fd: int, parent_pid: int) -> None:
    """Serve fork requests on `control_fd` until it closes or the parent dies, then kill the workers still running.

    First the server reports on `control_fd` whether it started (its imports), with the error if not.
    A request is one byte with one end of a socketpair attached; the answer is the worker's pid, with the read end
    of a pipe that gets the worker's wait status (as text) once this server reaps it."""
    # Ctrl-C reaches the whole foreground process group: the parent stops the workers; before torch's import too.
    # Workers and the preparing processes they start (SIG_IGN survives exec) inherit it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=control_fd)
    try:
        import vlmux.worker.preload  # noqa: F401 - once, here: every worker starts with it imported
    except BaseException:  # noqa: BLE001 - the parent quotes it in the error of the load that waits for us
        _report_start(control, traceback.format_exc())
        raise SystemExit(1) from None
    _report_start(control, "")
    parent = _pidfd(parent_pid)
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_r, False)
    os.set_blocking(wakeup_w, False)
    handlers = {signal.SIGCHLD: signal.getsignal(signal.SIGCHLD)}
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # the wakeup fd gets a byte only for handled signals
    statuses: dict[int, int] = {}  # pid -> write end of its status pipe
    watched = [control, wakeup_r] + ([parent] if parent is not None else [])
    try:
        while True:
            ready = wait(watched, None if parent is not None else 1.0)  # without a pidfd: check the parent each second
            if parent in ready or os.getppid() != parent_pid:
                return
            if wakeup_r in ready:
                _drain(wakeup_r)
                _reap(statuses)
            if control in ready:
                try:
                    message, fds, _, _ = socket.recv_fds(control, 1, 1)
                except OSError:
                    return
                if not message or not fds:
                    return
                status_r, status_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    _run_worker(fds[0], parent_pid, handlers, control,
                                [wakeup_r, wakeup_w, status_r, status_w, *statuses.values(), *watched[2:]])
                statuses[pid] = status_w
                try:
                    socket.send_fds(control, [pid.to_bytes(PID_BYTES, "little")], [status_r])
                except OSError:  # the parent is gone
                    return
                finally:
                    os.close(status_r)
                    os.close(fds[0])
    finally:
        _kill_workers(statuses)


def _report_start(control: socket.socket, error: str) -> None:
    """Tell the parent whether this server started: a length, then the error text (empty: ready for forks)."""
    data = error.encode(errors="replace")
    try:
        control.sendall(len(data).to_bytes(START_REPORT_BYTES, "little") + data)
    except OSError:  # the parent is gone
        pass


def _run_worker(fd: int, parent_pid: int, handlers: dict, control: socket.socket, server_fds: list[int]) -> None:
    """In the forked child: drop what is the server's, then serve the parent; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        control.close()
        for server_fd in server_fds:
            os.close(server_fd)
        from vlmux.worker.main import serve

        serve(Connection(fd), parent_pid)
        code = 0
    except BaseException:  # noqa: BLE001 - the worker's last word, on the stderr it shares with the parent
        traceback.print_exc()
    finally:
        os._exit(code)


def _kill_workers(statuses: dict[int, int]) -> None:
    """SIGKILL the workers not yet reaped: a stopped one (SIGSTOP, a debugger) never runs its own watch for the
    parent's end, and would keep its device memory and the parent's stderr for good."""
    for pid in statuses:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _reap(statuses: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_w = statuses.pop(pid, None)
        if status_w is not None:
            try:
                os.write(status_w, str(status).encode())
            except OSError:  # the parent closed its end: nobody asks any more
                pass
            os.close(status_w)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when `pid` exits; None where pidfds are missing (Linux < 5.3)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
