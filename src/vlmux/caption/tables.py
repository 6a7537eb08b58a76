"""Results as one table: CSV, Parquet, and Hugging Face ImageFolder metadata (metadata.jsonl / metadata.csv).

A table cannot be appended to safely, so each batch goes first to a journal (JSONL, appended and fsynced beside
the table), and the table is rewritten atomically from what it held plus the journal whenever a model finishes
and when the job ends. A job killed at any point loses nothing: the next run reads the table and the journal.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

from vlmux.caption.identity import model_tag, model_tags
from vlmux.caption.locks import OutputLock
from vlmux.caption.sinks import JsonlSink, Record, atomic_write, json_lines
from vlmux.caption.sources import ImageRef, UsageError

LONG_COLUMNS = ("file", "model", "caption", "error", "note")


class TableSink:
    """Long tables: one row per (file, model) with the JSONL record's columns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = OutputLock(path)  # before reading: the table may be mid-rewrite by another job
        self._rows: dict[tuple[str, str], Record] = {}
        if path.exists():
            for record in self._read():
                self._rows[(record.file, record.model)] = record
        self._journal = JsonlSink(path.with_name(f".{path.name}.journal.jsonl"), lock=False)
        journaled = self._journal.records()
        for record in journaled:
            self._rows[(record.file, record.model)] = record
        self._changed = bool(journaled) or not path.exists()  # a killed job's journal to fold in, or no table yet

    def key(self, ref: ImageRef) -> str:
        return ref.key

    def done(self, ref: ImageRef, model: str) -> bool:
        return (self.key(ref), model) in self._rows

    def held(self, ref: ImageRef, model: str) -> Record | None:
        return self._rows.get((self.key(ref), model))

    def refusal(self, ref: ImageRef, model: str) -> str | None:
        return None  # a row holds any result

    def write(self, pairs: list[tuple[ImageRef, Record]]) -> None:
        keyed = [(ref, Record(self.key(ref), record.model, record.caption, record.error, record.note))
                 for ref, record in pairs]
        self._journal.write(keyed)
        for _, record in keyed:
            self._rows[(record.file, record.model)] = record
        self._changed = True

    def forget(self, keys: set[tuple[str, str]]) -> None:
        self._journal.forget(keys)
        for key in keys:
            self._changed |= self._rows.pop(key, None) is not None

    def flush(self) -> None:
        """Rewrite the table atomically from everything held, then drop the journal it now contains; a table with
        nothing new is left as it is (a rerun with nothing to do rewrites nothing)."""
        if not self._changed:
            return
        atomic_write(self.path, self._encode(list(self._rows.values())))
        self._journal.clear()
        self._changed = False

    def close(self) -> None:
        self.flush()
        self._journal.close()
        self._journal.path.unlink(missing_ok=True)
        self._lock.release()

    # -- formats ------------------------------------------------------------------------------------------

    def _read(self) -> list[Record]:
        if self.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(self.path).to_pylist()
        else:
            rows = _csv_rows(self.path)
        return [Record(row["file"], row["model"], _none(row.get("caption")), _none(row.get("error")),
                       _none(row.get("note"))) for row in rows]

    def _encode(self, records: list[Record]) -> bytes:
        rows = [asdict(record) for record in records]
        if self.path.suffix == ".parquet":
            return _parquet_bytes(rows, LONG_COLUMNS)
        return _csv_bytes(rows, LONG_COLUMNS)


def metadata_key(metadata: Path, ref: ImageRef) -> str:
    """The image's `file_name` in the ImageFolder metadata file `metadata`: relative to the file's folder."""
    try:
        return ref.path.relative_to(metadata.parent.absolute()).as_posix()
    except ValueError:
        raise UsageError(f"{ref.path} is not inside {metadata.parent}: ImageFolder metadata must sit at or above its images") from None


class MetadataSink(TableSink):
    """Hugging Face ImageFolder metadata: `file_name` relative to the metadata file's folder and one caption
    column per model (named by its tag, identity.model_tags over `models`). A missing caption is not a result, so a
    rerun tries it again."""

    def __init__(self, path: Path, models: list[str] = ()) -> None:
        self.tags = model_tags(list(models))
        super().__init__(path)

    def tag(self, model: str) -> str:
        return self.tags.get(model) or model_tag(model)

    def key(self, ref: ImageRef) -> str:
        return metadata_key(self.path, ref)

    def done(self, ref: ImageRef, model: str) -> bool:
        return self.held(ref, model) is not None

    def held(self, ref: ImageRef, model: str) -> Record | None:
        record = self._rows.get((self.key(ref), self.tag(model)))
        return None if record is None or record.caption is None else Record(ref.key, model, record.caption, None)

    def _read(self) -> list[Record]:
        if self.path.suffix == ".jsonl":
            rows = [json.loads(line) for line in json_lines(self.path.read_bytes())]
        else:
            rows = _csv_rows(self.path)
        # The wide layout keeps only the model's tag; a rerun with the same -m maps back to it by tag.
        return [Record(row["file_name"], column, _none(value), None)
                for row in rows for column, value in row.items() if column != "file_name"]

    def write(self, pairs: list[tuple[ImageRef, Record]]) -> None:
        super().write([(ref, Record(record.file, self.tag(record.model), record.caption, record.error)) for ref, record in pairs])

    def forget(self, keys: set[tuple[str, str]]) -> None:
        super().forget({(file, self.tag(model)) for file, model in keys})

    def _encode(self, records: list[Record]) -> bytes:
        columns = list(dict.fromkeys(record.model for record in records))
        table: dict[str, dict[str, str | None]] = {}
        for record in records:
            table.setdefault(record.file, {"file_name": record.file})[record.model] = record.caption
        rows = [table[name] for name in sorted(table)]
        if self.path.suffix == ".jsonl":
            return "".join(json.dumps({c: row.get(c) for c in ["file_name", *columns]}, ensure_ascii=False) + "\n" for row in rows).encode()
        return _csv_bytes(rows, ("file_name", *columns))


def _none(value):
    return None if value in (None, "") else value


def _csv_rows(path: Path) -> list[dict]:
    """A CSV file's rows, its quoted fields as written: read_text's newline translation would turn a caption's \\r
    into \\n."""
    return list(csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))


def _csv_bytes(rows: list[dict], columns) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _parquet_bytes(rows: list[dict], columns) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(column, pa.string()) for column in columns])
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue()
