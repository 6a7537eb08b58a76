"""The worker process's side: it owns the device context and serves requests until told to exit."""
from __future__ import annotations

import os
import threading
from multiprocessing.connection import Connection

from vlmux.protocol import HEARTBEAT_SECONDS, ChatText, Exit, Heartbeat, Reply
from vlmux.worker.handler import Handler
from vlmux.worker.orphan import exit_when_orphaned


def serve(conn: Connection, parent_pid: int) -> None:
    exit_when_orphaned(parent_pid)
    handler = Handler()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        if isinstance(request, Exit):
            break
        heartbeats = Heartbeats(conn)  # from now until the reply
        heartbeats.reply(handler.handle(request, heartbeats.send))
        handler.after_reply(request)
    conn.close()
    # Skip interpreter and CUDA teardown: the OS takes everything back faster, and that is the point.
    os._exit(0)


class Heartbeats:
    """Sends a Heartbeat every HEARTBEAT_SECONDS until the request's reply is sent, so that the parent can tell a
    long request from a hung worker."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._sending = threading.Lock()  # a heartbeat never interleaves with the reply, nor follows it
        self._replied = threading.Event()
        threading.Thread(target=self._beat, name="vlmux-heartbeat", daemon=True).start()

    def reply(self, reply: Reply) -> None:
        with self._sending:
            self._replied.set()
            self._conn.send(reply)

    def send(self, message: ChatText) -> None:
        """Something for the caller before the reply: a piece of a streamed answer."""
        with self._sending:
            self._conn.send(message)

    def _beat(self) -> None:
        while not self._replied.wait(HEARTBEAT_SECONDS):
            with self._sending:
                if self._replied.is_set():
                    return
                try:
                    self._conn.send(Heartbeat())
                except OSError:  # the parent is gone; the request loop finds out on its own
                    return
