"""One job per output: a second job on an output that a job writes stops at once, with exit code 2."""
import os
import signal
import subprocess
import sys
import time

import pytest

from vlmux.caption.locks import OutputBusy, OutputLock
from vlmux.caption.outputs import open_output
from vlmux.caption.sinks import SidecarSink
from vlmux.testing.cli import read_jsonl, run_caption, start_caption
from vlmux.tiny import draw_sample_images


def test_a_second_job_on_the_same_output_fails_at_once_and_the_first_writes_one_record_per_image(tmp_path):
    images = tmp_path / "k"
    draw_sample_images(images / "a", count=60, seed=1)
    draw_sample_images(images / "b", count=60, seed=2)
    out = tmp_path / "c.jsonl"
    args = [str(images), "-r", "-m", "vlmux/shapes", "-o", str(out), "--batch-size", "1"]
    first = start_caption(*args)
    deadline = time.monotonic() + 120
    while not (tmp_path / ".c.jsonl.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_caption(*args, "-o", str(tmp_path / "other.parquet"))
    assert first.poll() is None, "the first job must still run when the second starts, or this tests nothing"
    assert second.returncode == 2
    assert f"{out}: another vlmux job writes it" in second.stderr
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    rows = read_jsonl(out)
    assert len(rows) == len({row["file"] for row in rows}) == 120
    assert not (tmp_path / "other.parquet").exists()  # the second job wrote nothing anywhere


@pytest.mark.parametrize("name", ["c.jsonl", "c.parquet", "c.csv", "metadata.jsonl"])
def test_every_output_format_is_locked_while_its_sink_is_open(tmp_path, name):
    sink = open_output(tmp_path / name)
    with pytest.raises(OutputBusy, match="another vlmux job writes it"):
        open_output(tmp_path / name)
    sink.close()
    open_output(tmp_path / name).close()  # closed: free again


def test_the_sidecar_set_is_locked_per_folder_and_extension(tmp_path):
    sink = SidecarSink("{model}.txt", ["a", "b"], lock_at=tmp_path)
    with pytest.raises(OutputBusy, match=f"the sidecars-MODEL.txt under {tmp_path}: another vlmux job writes it"):
        SidecarSink("{model}.txt", ["a"], lock_at=tmp_path)
    SidecarSink("tags", ["a"], lock_at=tmp_path).close()  # another extension is another set of files
    sink.close()


def test_a_killed_holder_leaves_the_output_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from vlmux.caption.locks import OutputLock; OutputLock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path / "c.jsonl")],
                              stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputBusy):
        OutputLock(tmp_path / "c.jsonl")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    OutputLock(tmp_path / "c.jsonl").release()


@pytest.mark.parametrize("name", ["c.jsonl", "c.csv"])
def test_a_closed_output_leaves_no_lock_file_and_can_be_locked_again(tmp_path, name):
    open_output(tmp_path / name).close()
    assert [p.name for p in tmp_path.iterdir()] == [name]
    again = OutputLock(tmp_path / name)
    assert again.path.exists()
    again.release()
    assert not again.path.exists()


def test_a_lock_taken_on_a_file_its_holder_just_removed_moves_to_the_new_file(tmp_path, monkeypatch):
    """The holder removes its lock file before its flock drops; a job that opened that file meanwhile gets the lock
    of a file no path names, and must lock the path's new file instead, or two jobs would hold locks at once."""
    import vlmux.caption.locks as locks

    holder = OutputLock(tmp_path / "c.jsonl")
    real_open, opens = os.open, []

    def open_then_holder_releases(path, *args):
        fd = real_open(path, *args)
        opens.append(path)
        if len(opens) == 1:  # the first open finds the holder's file; it lets go right after
            holder.release()
        return fd

    monkeypatch.setattr(locks.os, "open", open_then_holder_releases)
    taker = OutputLock(tmp_path / "c.jsonl")
    monkeypatch.setattr(locks.os, "open", real_open)
    with pytest.raises(OutputBusy):  # the path's file is the one held now
        OutputLock(tmp_path / "c.jsonl")
    assert len(opens) == 2  # the taker locked the removed file, saw it, and locked the new one
    taker.release()
