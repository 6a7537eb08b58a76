"""The sink for an output file: its name picks the format (sinks.py and tables.py hold the sinks themselves)."""
from __future__ import annotations

from pathlib import Path

from vlmux.caption.sinks import JsonlSink, Sink
from vlmux.caption.sources import UsageError
from vlmux.caption.tables import MetadataSink, TableSink

FORMATS = ".jsonl, .csv, .parquet, metadata.jsonl or metadata.csv"


def output_kind(path: Path) -> type:
    """The sink class for -o PATH, its name picking the format; a UsageError for a format vlmux does not write.
    Creates nothing, so that every output can be checked before any is opened."""
    if not path.parent.exists():
        raise UsageError(f"{path}: the folder {path.parent} does not exist; create it first")
    if is_metadata(path):
        return MetadataSink
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return JsonlSink
    if suffix in (".csv", ".parquet"):
        return TableSink
    raise UsageError(f"{path}: unsupported output format {path.suffix!r}; use {FORMATS}")


def is_metadata(path: Path) -> bool:
    return path.name in ("metadata.jsonl", "metadata.csv")


def open_output(path: Path, models: list[str] = ()) -> Sink:
    """The sink for -o PATH: the name picks the format; `models` (the job's, in order) name metadata columns.
    Raises OutputBusy while another job writes the output."""
    kind = output_kind(path)
    return kind(path, models) if kind is MetadataSink else kind(path)
