"""Captions through every sink (caption/sinks.py, caption/tables.py) without a model: a caption round-trips byte for
byte (a \\r, U+2028, a tab), control characters are stripped the same way everywhere, a rerun with nothing to do
rewrites nothing, and the padding note reaches CSV and Parquet as it reaches JSONL."""
import os

import pyarrow.parquet as pq
import pytest

from vlmux.caption.sinks import JsonlSink, Record, SidecarSink
from vlmux.caption.sources import ImageRef
from vlmux.caption.tables import MetadataSink, TableSink

CAPTION = "a cat\r\non a mat\rwith\ta hat\u2028and \x85 more \"quoted\", too"
MODEL = "tiny/model"


def sinks(folder):
    return {"jsonl": lambda: JsonlSink(folder / "out.jsonl"),
            "csv": lambda: TableSink(folder / "out.csv"),
            "parquet": lambda: TableSink(folder / "out.parquet"),
            "metadata.csv": lambda: MetadataSink(folder / "metadata.csv", [MODEL]),
            "metadata.jsonl": lambda: MetadataSink(folder / "metadata.jsonl", [MODEL]),
            "sidecar": lambda: SidecarSink("txt", [MODEL])}


@pytest.fixture
def ref(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    return ImageRef(tmp_path / "x.jpg", tmp_path)


@pytest.mark.parametrize("kind", list(sinks(None)))
def test_a_caption_round_trips_byte_for_byte_and_loses_control_characters(tmp_path, ref, kind):
    make = sinks(tmp_path)[kind]
    sink = make()
    sink.write([(ref, Record(ref.key, MODEL, CAPTION + "\x00\x1b[31m\x7f", None))])
    sink.close()
    again = make()
    try:
        assert again.held(ref, MODEL).caption == CAPTION + "[31m"
    finally:
        again.close()


@pytest.mark.parametrize("kind", ["csv", "parquet", "metadata.csv", "metadata.jsonl"])
def test_a_rerun_with_nothing_to_do_rewrites_nothing(tmp_path, ref, kind):
    make = sinks(tmp_path)[kind]
    sink = make()
    sink.write([(ref, Record(ref.key, MODEL, CAPTION, None))])
    sink.close()
    table = next(p for p in tmp_path.iterdir() if p.name.startswith(("out.", "metadata.")))
    before = (os.stat(table).st_ino, os.stat(table).st_mtime_ns, table.read_bytes())
    again = make()
    assert again.done(ref, MODEL)
    again.flush()
    again.close()
    assert (os.stat(table).st_ino, os.stat(table).st_mtime_ns, table.read_bytes()) == before


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_the_padding_note_reaches_csv_and_parquet(tmp_path, ref, kind):
    make = sinks(tmp_path)[kind]
    sink = make()
    note = "padded from 1000x3 to 1000x10"
    sink.write([(ref, Record(ref.key, MODEL, "a strip", None, note))])
    sink.close()
    if kind == "parquet":
        assert pq.read_table(tmp_path / "out.parquet").to_pylist()[0]["note"] == note
    again = make()
    try:
        assert again.held(ref, MODEL).note == note
    finally:
        again.close()
