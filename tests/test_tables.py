"""Every output format as a rerun reads it back (caption/tables.py, caption/sinks.py): captions round-trip byte for
byte, control characters are stripped the same way everywhere, the padding note reaches the tables, and a rerun with
nothing to do rewrites nothing."""
from pathlib import Path

import pytest

from vlmux.caption.outputs import open_output
from vlmux.caption.sinks import Record, SidecarSink
from vlmux.caption.sources import ImageRef

MODEL = "org/model"
# What models write: Windows line ends, a lone \r, tabs, quotes and commas, and the separators str.splitlines and
# read_text's newline translation cut at (U+2028, U+0085 is a control character and goes, like NUL).
TRICKY = 'a "red", square\r\nleft\rof\ta\u2028circle'
OUTPUTS = ["out.jsonl", "out.csv", "out.parquet", "metadata.jsonl", "metadata.csv"]


def ref(folder: Path, name: str = "x.png") -> ImageRef:
    return ImageRef(folder / name, folder)


def write_and_reopen(path: Path, record: Record) -> Record | None:
    image = ref(path.parent)
    sink = open_output(path, [MODEL])
    sink.write([(image, Record(image.key, MODEL, record.caption, record.error, record.note))])
    sink.close()
    reopened = open_output(path, [MODEL])
    try:
        return reopened.held(image, MODEL)
    finally:
        reopened.close()


@pytest.mark.parametrize("name", OUTPUTS)
def test_a_caption_round_trips_byte_for_byte(tmp_path, name):
    held = write_and_reopen(tmp_path / name, Record("x.png", MODEL, TRICKY, None))
    assert held is not None and held.caption == TRICKY


def test_a_sidecar_round_trips_byte_for_byte(tmp_path):
    image = ref(tmp_path)
    sink = SidecarSink("txt", [MODEL])
    sink.write([(image, Record(image.key, MODEL, TRICKY, None))])
    assert sink.held(image, MODEL).caption == TRICKY


@pytest.mark.parametrize("name", OUTPUTS)
def test_control_characters_are_stripped_in_every_format(tmp_path, name):
    held = write_and_reopen(tmp_path / name, Record("x.png", MODEL, "a\x00 red\x1b[31m\x85 square\x7f", None))
    assert held.caption == "a red[31m square"
    if not name.endswith(".parquet"):  # a binary format holds NULs of its own
        assert b"\x00" not in (tmp_path / name).read_bytes()


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv", "out.parquet"])
def test_the_padding_note_reaches_every_long_table(tmp_path, name):
    note = "padded from 100:1 to 50:1"
    assert write_and_reopen(tmp_path / name, Record("x.png", MODEL, "a strip", None, note)).note == note


@pytest.mark.parametrize("name", OUTPUTS[1:])
def test_a_rerun_with_nothing_to_do_rewrites_nothing(tmp_path, name):
    path = tmp_path / name
    write_and_reopen(path, Record("x.png", MODEL, TRICKY, None))
    before = path.stat()
    open_output(path, [MODEL]).close()
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not replaced, not written
