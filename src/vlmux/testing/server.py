"""`vlmux serve` for tests: as a child process on a free loopback port, or an app run by uvicorn in a thread (for
a pool built on fake GPUs). Both give the base URL; neither listens beyond loopback."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vlmux.testing.cli import VLMUX

LISTENING = re.compile(r"listening on (http://\S+) ")


@contextlib.contextmanager
def served(*args: str, timeout: float = 60.0, log: str | None = None, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`vlmux serve ARGS --port 0` as a child, in `cwd` with `env` (default: this process's); yields it and its
    URL, then stops it (SIGTERM, then SIGKILL). With `log`, the server's output is copied to that file."""
    command = [*VLMUX, "serve", "--host", "127.0.0.1", "--port", "0", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                               env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
    try:
        url = _wait_for_url(process, timeout, log)
        yield process, url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_url(process: subprocess.Popen, timeout: float, log: str | None) -> str:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("vlmux serve ended before listening:\n" + "".join(lines))
        lines.append(line)
        found = LISTENING.search(line)
        if found:
            threading.Thread(target=_drain, args=(process, lines, log), daemon=True).start()
            return found.group(1)
    raise RuntimeError("vlmux serve did not listen in time:\n" + "".join(lines))


def _drain(process: subprocess.Popen, lines: list[str], log: str | None) -> None:
    """Keep the server's pipe drained (a full pipe would block it), copying its output to `log`."""
    if log is None:
        process.stdout.read()
        return
    with open(log, "w") as out:
        out.writelines(lines)
        for line in process.stdout:
            out.write(line)
            out.flush()


@contextlib.contextmanager
def in_thread(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free loopback port; yields its URL, then shuts it down."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vlmux-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
