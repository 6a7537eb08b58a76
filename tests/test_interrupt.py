"""Ctrl-C during a caption job: one line on stderr, every vlmux process gone within a second or so, and the rerun
captions only what is missing. A terminal's Ctrl-C is SIGINT to the whole foreground process group."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmux.shapes import write_dataset
from vlmux.testing.cli import read_jsonl, run_caption, shapes_job
from vlmux.testing.processes import descendants, group_members, still_running

IMAGES = 120
# Seconds from the signal until no process of the job is left. A bound, not a figure: stopping must not wait for a
# request to finish (tens of seconds) nor a hang timeout (30 s); 1.5 s failed on a loaded 2-core machine.
STOPPED_WITHIN = 8.0


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("interrupt") / "images"
    write_dataset(folder, IMAGES, seed=11)
    return folder


def written(out: Path) -> Path:
    """Where results land as they come: a table's go to its journal first."""
    return out if out.suffix == ".jsonl" else out.with_name(f".{out.name}.journal.jsonl")


def start_busy(images: Path, out: Path) -> subprocess.Popen:
    """The job in a process group of its own (a terminal's foreground group), once it has written a record."""
    # shapes_job has preparing processes: they (and their fork server) are in the group too
    # SIGINT as a terminal leaves it: a shell's background job (`cmd &`, nohup) would pass it on ignored
    job = subprocess.Popen([sys.executable, "-m", "vlmux.cli", "caption", *shapes_job(images, out), "--no-progress"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (written(out).exists() and written(out).read_text().count("\n")):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    return job


def interrupt(job: subprocess.Popen, send) -> tuple[str, float]:
    """Send SIGINT with `send`; returns the job's stderr and the seconds until none of its processes was left."""
    workers = descendants(job.pid)
    assert workers, "the job should have a fork server and a worker"
    processes = {job.pid, *workers, *group_members(job.pid)}
    signalled = time.monotonic()
    send(signal.SIGINT)
    left = still_running(processes, within=STOPPED_WITHIN)
    stopped = time.monotonic() - signalled
    _, stderr = job.communicate(timeout=10)
    assert left == [] and group_members(job.pid) == [], f"{left} still ran {stopped:.1f} s after the signal"
    assert job.returncode == 130, stderr
    return stderr, stopped


def assert_resumes(images: Path, out: Path, done: int) -> None:
    rerun = run_caption(*shapes_job(images, out))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{IMAGES - done} captioned, 0 errors, {done} already done" in rerun.stdout
    rows = read_jsonl(out) if out.suffix == ".jsonl" else _parquet_rows(out)
    assert sorted(row["file"] for row in rows) == sorted(path.name for path in images.iterdir())


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ctrl_c_prints_one_line_stops_every_process_at_once_and_the_rerun_resumes(tmp_path, images, suffix):
    out = tmp_path / f"out{suffix}"
    job = start_busy(images, out)
    stderr, stopped = interrupt(job, lambda sig: os.killpg(job.pid, sig))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["vlmux caption: interrupted; finished results are saved, rerun to resume"], stderr
    assert stopped < STOPPED_WITHIN, f"{stopped:.1f} s until the job's processes were gone"
    done = len(read_jsonl(written(out)))
    assert 0 < done < IMAGES
    assert_resumes(images, out, done)


def test_sigint_to_the_main_process_alone_stops_its_workers_at_once(tmp_path, images):
    out = tmp_path / "out.jsonl"
    job = start_busy(images, out)
    stderr, stopped = interrupt(job, job.send_signal)
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert stopped < STOPPED_WITHIN, f"{stopped:.1f} s until the workers were gone"
    assert_resumes(images, out, len(read_jsonl(out)))


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
