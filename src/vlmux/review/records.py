"""Any output `vlmux caption` writes (JSONL, CSV, Parquet, ImageFolder metadata, a folder of sidecar files) read into
one `Item` per image: every model's caption or error side by side, in the images' order."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from vlmux.caption.outputs import FORMATS, is_metadata
from vlmux.caption.sources import UsageError
from vlmux.images import is_image_path


@dataclass(frozen=True)
class Candidate:
    model: str
    caption: str | None
    error: str | None


@dataclass(frozen=True)
class Item:
    key: str  # the image's name in the output (relative to the images' root)
    candidates: tuple[Candidate, ...]

    @property
    def has_error(self) -> bool:
        return any(c.error is not None or c.caption is None for c in self.candidates)


def read_output(output: Path) -> list[Item]:
    """The output's items, sorted by key; a UsageError naming what to give instead for what vlmux did not write."""
    if not output.exists() and not _table_journal(output).exists():
        raise UsageError(f"{output}: no such file or folder; give an output of `vlmux caption` ({FORMATS}, or a folder of sidecar files)")
    if output.is_dir():
        rows = _sidecar_rows(output)
    elif is_metadata(output):
        rows = _metadata_rows(output)
    elif output.suffix.lower() in (".jsonl", ".csv", ".parquet"):
        rows = _long_rows(output)
    else:
        raise UsageError(f"{output}: not an output vlmux writes ({FORMATS}, or a folder of sidecar files)")
    grouped: dict[str, dict[str, Candidate]] = {}
    for key, candidate in rows:
        grouped.setdefault(key, {})[candidate.model] = candidate  # a later line for the same pair wins, as on resume
    models = list(dict.fromkeys(c.model for _, c in rows))
    items = [Item(key, tuple(by_model.get(m, Candidate(m, None, "no result")) for m in models))
             for key, by_model in grouped.items()]
    items.sort(key=lambda item: item.key)
    return items


def _long_rows(path: Path) -> list[tuple[str, Candidate]]:
    """JSONL, CSV or Parquet with file, model, caption, error, plus a table's journal left by a killed job."""
    if not path.exists():  # a job killed before its first rewrite: everything is in the journal
        rows = []
    elif path.suffix.lower() == ".jsonl":
        rows = _jsonl(path)
    elif path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = _csv(path)
    rows += _journal_rows(path)
    try:
        return [(row["file"], Candidate(row["model"], _text(row.get("caption")), _text(row.get("error")))) for row in rows]
    except (KeyError, TypeError):
        raise UsageError(f"{path}: rows need the columns file, model, caption, error (as `vlmux caption -o` writes them)") from None


def _metadata_rows(path: Path) -> list[tuple[str, Candidate]]:
    """ImageFolder metadata: file_name and one caption column per model; an empty cell is a missing result."""
    rows = [] if not path.exists() else _jsonl(path) if path.suffix == ".jsonl" else _csv(path)
    if rows and "file_name" not in rows[0]:
        raise UsageError(f"{path}: ImageFolder metadata needs a file_name column")
    cells = [(row["file_name"], column, _text(value))
             for row in rows for column, value in row.items() if column != "file_name"]
    cells += [(row["file"], row["model"], _text(row.get("caption"))) for row in _journal_rows(path)]  # tags, as columns
    return [(key, Candidate(column, text, None if text is not None else "no caption")) for key, column, text in cells]


def _table_journal(path: Path) -> Path:
    return path.with_name(f".{path.name}.journal.jsonl")


def _journal_rows(path: Path) -> list[dict]:
    """A table's journal (tables.py): the rows of a job that ended before it rewrote the table."""
    journal = _table_journal(path)
    return _jsonl(journal) if journal.exists() else []


def _sidecar_rows(folder: Path) -> list[tuple[str, Candidate]]:
    """IMAGE.txt (model `txt`) or IMAGE.TAG.txt (model TAG) beside each image under `folder`."""
    rows = []
    for image in sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p)):
        stem = image.name.rsplit(".", 1)[0]
        for sidecar in sorted(image.parent.glob(f"{_glob_escape(stem)}.*txt")):
            middle = sidecar.name[len(stem) + 1:].removesuffix("txt").rstrip(".")
            if "." in middle or sidecar == image:
                continue
            text = sidecar.read_text(encoding="utf-8").removesuffix("\n")
            rows.append((image.relative_to(folder).as_posix(), Candidate(middle or "txt", text, None)))
    if not rows:
        raise UsageError(f"{folder}: no sidecar captions (IMAGE.txt or IMAGE.MODEL.txt) beside the images in it")
    return rows


def _jsonl(path: Path) -> list[dict]:
    rows = []
    text = path.read_bytes().decode("utf-8")
    lines = text.removesuffix("\n").split("\n")  # at line feeds only, as caption's sinks.json_lines splits
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break  # a job killed mid-write leaves a partial last line; the next run drops it too
            raise UsageError(f"{path}:{number}: not a JSON line") from None
    return rows


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


def _text(value) -> str | None:
    return None if value in (None, "") else str(value)


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
