"""The sink for an output file: its name picks the format (sinks.py and tables.py hold the sinks themselves)."""
from __future__ import annotations

from pathlib import Path

from vlmux.caption.sinks import JsonlSink, Sink
from vlmux.caption.sources import UsageError
from vlmux.caption.tables import MetadataSink, TableSink


def open_output(path: Path, models: list[str] = ()) -> Sink:
    """The sink for -o PATH: the name picks the format; `models` (the job's, in order) name metadata columns.
    Raises OutputBusy while another job writes the output."""
    if not path.parent.exists():
        raise UsageError(f"{path}: the folder {path.parent} does not exist; create it first")
    if path.name in ("metadata.jsonl", "metadata.csv"):
        return MetadataSink(path, models)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return JsonlSink(path)
    if suffix in (".csv", ".parquet"):
        return TableSink(path)
    raise UsageError(f"{path}: unsupported output format {path.suffix!r}; use .jsonl, .csv, .parquet or metadata.jsonl")
