"""Where captions go: a JSONL file and sidecar text files (tables.py has CSV, Parquet and ImageFolder metadata;
outputs.py picks a sink from an output file's name).
Every sink knows what it already holds, so a rerun resumes, and writes so that a kill at any moment leaves only
whole records."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from vlmux.caption.identity import model_tag, model_tags
from vlmux.caption.locks import OutputLock
from vlmux.caption.sources import ImageRef, UsageError


# Control characters but tab, line feed and carriage return: a model's NUL or escape codes in a caption break CSV
# readers and terminals, and mean nothing in a caption.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Record:
    """One result as every sink writes it; its caption loses its control characters (but \\t \\n \\r) here, once
    for all sinks."""

    file: str
    model: str
    caption: str | None
    error: str | None
    note: str | None = None  # e.g. a strip padded to an aspect ratio processors take; JSONL lines carry it when set

    def __post_init__(self) -> None:
        if self.caption is not None and CONTROL.search(self.caption):
            object.__setattr__(self, "caption", written(self.caption))


def written(caption: str) -> str:
    """A caption as every output holds it: without control characters but tab, line feed and carriage return."""
    return CONTROL.sub("", caption)


class Sink(Protocol):
    def done(self, ref: ImageRef, model: str) -> bool: ...
    def held(self, ref: ImageRef, model: str) -> Record | None: ...  # the result it holds, to copy to other sinks
    def refusal(self, ref: ImageRef, model: str) -> str | None: ...  # why this result cannot be written here, or None
    def write(self, pairs: list[tuple[ImageRef, Record]]) -> None: ...
    def forget(self, keys: set[tuple[str, str]]) -> None: ...
    def flush(self) -> None: ...  # called when a model finishes
    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, appended and flushed per batch. `lock`: hold the output's lock while open (a
    table's journal goes under its table's lock)."""

    def __init__(self, path: Path, lock: bool = True) -> None:
        self.path = path
        self._lock = OutputLock(path) if lock else None
        self._done: dict[tuple[str, str], Record] = {}
        if path.exists():
            self._recover()
        self._file = open(path, "a", encoding="utf-8")

    def _recover(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a kill mid-write leaves a partial last line: drop it
            data = data[: data.rfind(b"\n") + 1]
            atomic_write(self.path, data)
        self._done.update(((record.file, record.model), record) for record in self.records())

    def records(self) -> list[Record]:
        if not self.path.exists():
            return []
        return [Record(**json.loads(line)) for line in json_lines(self.path.read_bytes())]

    def done(self, ref: ImageRef, model: str) -> bool:
        return (ref.key, model) in self._done

    def held(self, ref: ImageRef, model: str) -> Record | None:
        return self._done.get((ref.key, model))

    def refusal(self, ref: ImageRef, model: str) -> str | None:
        return None  # a line of JSON holds any result

    def write(self, pairs: list[tuple[ImageRef, Record]]) -> None:
        if not self._still_there():
            self._restore()
        lines = "".join(_line(record) for _, record in pairs)
        try:
            self._file.write(lines)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:  # a full disk or a read-only mount: the message names the output, not only errno
            raise OSError(e.errno, f"cannot write results to {self.path}: {e.strerror}") from None
        self._done.update(((record.file, record.model), record) for _, record in pairs)

    def _still_there(self) -> bool:
        """Does the path still name the file we append to? Deleted (or replaced) mid-job, appends would go nowhere."""
        try:
            on_disk, ours = os.stat(self.path), os.fstat(self._file.fileno())
        except FileNotFoundError:
            return False
        return (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino)

    def _restore(self) -> None:
        """The output was deleted or replaced while the job ran: write it again from the results this sink holds,
        so that nothing finished is lost, and say so."""
        print(f"vlmux: {self.path} was deleted or replaced during the job; written again with the "
              f"{len(self._done)} results held", file=sys.stderr)
        self._file.close()
        atomic_write(self.path, "".join(_line(record) for record in self._done.values()).encode("utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")

    def forget(self, keys: set[tuple[str, str]]) -> None:
        """Drop the records of these (file, model) pairs, for --overwrite."""
        if not keys & self._done.keys():
            return
        self._file.close()
        kept = [record for record in self.records() if (record.file, record.model) not in keys]
        atomic_write(self.path, "".join(_line(record) for record in kept).encode("utf-8"))
        for key in keys:
            self._done.pop(key, None)
        self._file = open(self.path, "a", encoding="utf-8")

    def clear(self) -> None:
        self._file.truncate(0)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._done.clear()

    def flush(self) -> None:
        pass  # every write is already on disk

    def close(self) -> None:
        with contextlib.suppress(OSError):  # each write was flushed and synced; one that failed has raised already
            self._file.close()
        if self._lock is not None:
            self._lock.release()


class SidecarSink:
    """IMAGE.EXT beside each image; `{model}` in EXT (the model's tag, identity.model_tags) tells several models'
    captions apart. `lock_at`: the images' common folder, locked for this extension while the sink is open (a job
    on a subfolder or a parent folder of it is not stopped)."""

    def __init__(self, extension: str, models: list[str], lock_at: Path | None = None) -> None:
        extension = extension.lstrip(".")
        if len(models) > 1 and "{model}" not in extension:
            raise UsageError(f"--sidecar {extension} with {len(models)} models would overwrite; put {{model}} in it, e.g. '{{model}}.txt'")
        self.extension = extension
        self.tags = model_tags(models)
        self._lock = None if lock_at is None else OutputLock(lock_at, f"sidecars-{extension.replace('{model}', 'MODEL')}")

    def path_for(self, ref: ImageRef, model: str) -> Path:
        tag = self.tags.get(model) or model_tag(model)
        return ref.path.with_name(f"{ref.path.name.rsplit('.', 1)[0]}.{self.extension.format(model=tag)}")

    def refusal(self, ref: ImageRef, model: str) -> str | None:
        """Why this image's sidecar cannot be written (its name is over the file system's limit), or None."""
        path = self.path_for(ref, model)
        length, limit = len(os.fsencode(path.name)), name_max(path.parent)
        if length <= limit:
            return None
        return (f"sidecar {path.name!r} not written: its name is {length} bytes and the file system allows {limit}; "
                f"shorten the image's name or write results with -o")

    def done(self, ref: ImageRef, model: str) -> bool:
        return self.refusal(ref, model) is None and self.path_for(ref, model).exists()

    def held(self, ref: ImageRef, model: str) -> Record | None:
        path = self.path_for(ref, model)
        if not path.exists():
            return None
        return Record(ref.key, model, path.read_bytes().decode("utf-8").removesuffix("\n"), None)  # \r kept as written

    def write(self, pairs: list[tuple[ImageRef, Record]]) -> None:
        for ref, record in pairs:
            if record.caption is not None and self.refusal(ref, record.model) is None:
                atomic_write(self.path_for(ref, record.model), (record.caption + "\n").encode("utf-8"))

    def forget(self, keys: set[tuple[str, str]]) -> None:
        pass  # overwritten in place when the new caption is written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()


def _line(record: Record) -> str:
    fields = asdict(record)
    if fields["note"] is None:  # the records of ordinary images keep their four fields
        del fields["note"]
    return json.dumps(fields, ensure_ascii=False) + "\n"


def json_lines(data: bytes) -> list[str]:
    """The JSON lines of a file's bytes: split at line feeds only (str.splitlines would also split inside a caption
    at U+2028 or U+0085, which JSON leaves unescaped)."""
    return [line for line in data.decode("utf-8").split("\n") if line.strip()]


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that the file system of `folder` takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` whole, through a short temporary name beside it: a name built from the final one
    could pass the file system's name limit where the final one fits."""
    temporary = path.with_name(f".vlmux-{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
