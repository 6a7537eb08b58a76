"""The worker process's side: it owns the device context and serves requests until told to exit."""
from __future__ import annotations

import multiprocessing
import os
from multiprocessing.connection import Connection

from vlmux.worker.handler import Handler
from vlmux.protocol import Exit
from vlmux.worker.orphan import exit_when_orphaned


def serve(conn: Connection, parent_pid: int) -> None:
    exit_when_orphaned(parent_pid)
    # The parent starts workers as daemons (gone with it); a daemon may not start processes, and a worker starts its
    # preparing processes (worker/prep.py), which watch its pid and end with it.
    multiprocessing.current_process().daemon = False
    handler = Handler()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        if isinstance(request, Exit):
            break
        conn.send(handler.handle(request))
    conn.close()
    # Skip interpreter and CUDA teardown: the OS takes everything back faster, and that is the point.
    os._exit(0)
