"""One thread that waits on every live worker's exit sentinel, so a worker that dies while idle is noticed when it
dies, not when the next request finds it gone."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Generic, TypeVar

T = TypeVar("T")


class ExitWatch(Generic[T]):
    def __init__(self, on_exit: Callable[[T], None]) -> None:
        self._on_exit = on_exit
        self._watched: dict[int, T] = {}
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()  # tells the waiting thread that the set changed
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, sentinel: int, owner: T) -> None:
        with self._lock:
            self._watched[sentinel] = owner
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vlmux-exits", daemon=True)
                self._thread.start()
        os.write(self._wake_write, b"w")

    def forget(self, sentinel: int) -> None:
        """Before the sentinel is closed: its number may be reused for another file."""
        with self._lock:
            self._watched.pop(sentinel, None)
        os.write(self._wake_write, b"f")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._watched.clear()
            thread = self._thread
        os.write(self._wake_write, b"c")
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                sentinels = list(self._watched)
            ready = wait([self._wake_read, *sentinels])
            if self._wake_read in ready:
                os.read(self._wake_read, 4096)
            for sentinel in ready:
                with self._lock:
                    owner = self._watched.pop(sentinel, None) if sentinel != self._wake_read else None
                if owner is not None:
                    self._on_exit(owner)
