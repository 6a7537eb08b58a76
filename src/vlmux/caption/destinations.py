"""Before any work: every place results go can be written (the -o files, the sidecar folders, the report), so a
read-only folder fails the job at once, not after hours of captioning."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from vlmux.caption.sources import UsageError


def why_unwritable(folder: Path) -> str | None:
    """Why no file can be created in `folder`, or None. access() first, then a real create and delete, since access()
    says yes where the file system still refuses (read-only network and FUSE mounts, immutable folders)."""
    if not folder.exists():
        return "it does not exist; create it first"
    if not folder.is_dir():
        return "it is not a folder"
    if not os.access(folder, os.W_OK):
        return "no write permission, or a read-only file system"
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".vlmux-probe-", dir=folder)
    except OSError as e:
        return f"creating a file there fails: {e.strerror}"
    os.close(descriptor)
    os.unlink(probe)
    return None


def check_files(paths: Iterable[Path]) -> None:
    """Output files (-o, --report): their folder takes new files, and an existing file may be rewritten."""
    for path in paths:
        why = why_unwritable(path.parent)
        if why is None and path.exists() and not os.access(path, os.W_OK):
            why = "the file is read-only"
        if why is not None:
            raise UsageError(f"{path}: cannot write it: {path.parent}: {why}; choose a writable folder for it")


def check_sidecar_folders(folders: Iterable[Path]) -> None:
    """The images' folders; one that does not exist holds only missing images, which get error records, no sidecar."""
    for folder in sorted(set(folders)):
        why = why_unwritable(folder) if folder.exists() else None
        if why is not None:
            raise UsageError(f"{folder}: cannot write sidecar files there: {why}; write the results with -o "
                             f"(.jsonl, .csv, .parquet, metadata.jsonl) into a writable folder instead, or copy the "
                             f"images to a writable folder")
