"""One job per output: an exclusive flock on a lock file beside each output, held while its sink is open; a set of
files (sidecars in an image folder) is locked through a file in the temporary folder, so image folders get no
lock files.

The OS drops the lock when the process dies, however it dies, so a killed job never leaves an output locked. A job
that ends removes its lock file while still holding the lock; a job that locked a file just removed sees that the
path no longer names it and locks the new one, so two jobs never hold locks on different files of one path."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

from vlmux.caption.sources import UsageError


class OutputBusy(UsageError):
    """Another job holds the output's lock."""


class OutputLock:
    def __init__(self, output: Path, what: str | None = None) -> None:
        """Lock `output` (a file, or a folder for a set of files such as sidecars) or raise OutputBusy."""
        self.path = output.with_name(f".{output.name}.lock") if what is None else _set_lock(output, what)
        self._fd: int | None = None
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                named = f"{output}" if what is None else f"the {what} under {output}"
                raise OutputBusy(f"{named}: another vlmux job writes it; wait for that job to end, or write elsewhere"
                                 ) from None
            if _names(self.path, fd):
                self._fd = fd
            else:  # its holder removed it as it let go: lock the file the path names now
                os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # before the flock drops: nobody can lock this file and keep it
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        on_disk, ours = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino)


def _set_lock(folder: Path, what: str) -> Path:
    """This host's lock file for a set of files in `folder` (flock only holds on one host anyway)."""
    locks = Path(tempfile.gettempdir()) / "vlmux-locks"
    locks.mkdir(mode=0o1777, exist_ok=True)
    digest = hashlib.sha256(f"{os.path.realpath(folder)}\0{what}".encode()).hexdigest()[:32]
    return locks / f"{digest}.lock"
