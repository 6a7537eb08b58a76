"""The worker process's side: it owns the device context and serves requests until told to exit. A reader thread
takes every message as it comes, so an Abort reaches the handler while a request runs; requests wait their turn."""
from __future__ import annotations

import os
import queue
import threading
from multiprocessing.connection import Connection

from vlmux.protocol import HEARTBEAT_SECONDS, Abort, ChatText, Exit, Heartbeat, Reply, Request
from vlmux.worker.handler import Handler
from vlmux.worker.orphan import exit_when_orphaned


def serve(conn: Connection, parent_pid: int) -> None:
    exit_when_orphaned(parent_pid)
    handler = Handler()
    requests: queue.SimpleQueue[Request | None] = queue.SimpleQueue()  # None: the parent's end closed
    threading.Thread(target=_read, args=(conn, handler, requests), name="vlmux-requests", daemon=True).start()
    while True:
        request = requests.get()
        if request is None or isinstance(request, Exit):
            break
        heartbeats = Heartbeats(conn)  # from now until the reply
        heartbeats.reply(handler.handle(request, heartbeats.send))
        handler.after_reply(request)
    conn.close()
    # Skip interpreter and CUDA teardown: the OS takes everything back faster, and that is the point.
    os._exit(0)


def _read(conn: Connection, handler: Handler, requests: queue.SimpleQueue) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            requests.put(None)
            return
        if isinstance(message, Abort):
            handler.aborts.add(message.ident)
        else:
            requests.put(message)
            if isinstance(message, Exit):
                return


class Heartbeats:
    """Sends a Heartbeat every HEARTBEAT_SECONDS until the request's reply is sent, so that the parent can tell a
    long request from a hung worker; each carries the count of chat rows running, which is also sent when it
    changes."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._sending = threading.Lock()  # a heartbeat never interleaves with the reply, nor follows it
        self._replied = threading.Event()
        self._rows = 0
        threading.Thread(target=self._beat, name="vlmux-heartbeat", daemon=True).start()

    def reply(self, reply: Reply) -> None:
        with self._sending:
            self._replied.set()
            self._conn.send(reply)

    def send(self, message: ChatText | Heartbeat) -> None:
        """Something for the caller before the reply: a piece of a streamed answer, or the rows running now."""
        with self._sending:
            if isinstance(message, Heartbeat):
                self._rows = message.rows
            self._conn.send(message)

    def _beat(self) -> None:
        while not self._replied.wait(HEARTBEAT_SECONDS):
            with self._sending:
                if self._replied.is_set():
                    return
                try:
                    self._conn.send(Heartbeat(self._rows))
                except OSError:  # the parent is gone; the request loop finds out on its own
                    return
