"""Fault injection against `vlmux caption` (issue 22): a worker, a preparing process or the job itself gets SIGKILL,
SIGSEGV or SIGSTOP at a seeded random point; the output's disk fills up (RLIMIT_FSIZE), the output is deleted or made
read-only mid-job. After each: the job retried or said in one line what went wrong, a rerun leaves exactly one
record per image, and no process of the job is left (a gone worker's host memory is back)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmux.shapes import write_dataset
from vlmux.testing.cli import read_jsonl, run_caption, shapes_job
from vlmux.testing.processes import children, descendants, process_gone

IMAGES = 48
MANY = 200  # the preparing processes take seconds to start: a job for them to join runs longer


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "images"
    write_dataset(folder, IMAGES, seed=5)
    return folder


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "many"
    write_dataset(folder, MANY, seed=6)
    return folder


def start(images: Path, out: Path, limit_bytes: int | None = None) -> subprocess.Popen:
    """The job in a session of its own; `limit_bytes`: the largest file it may write (a full disk)."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, "-m", "vlmux.cli", "caption", *shapes_job(images, out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=limit if limit_bytes else None)


def journal(out: Path) -> Path:
    return out if out.suffix == ".jsonl" else out.with_name(f".{out.name}.journal.jsonl")


def records(out: Path) -> int:
    try:
        return journal(out).read_text().count("\n")
    except FileNotFoundError:
        return 0


class Watch:
    """Every process seen under the job while it ran, to check none outlives it."""

    def __init__(self, job: subprocess.Popen) -> None:
        self.job, self.seen = job, set()
        self.last: tuple[list[int], list[int]] = ([], [])  # what the look that ended a wait_for saw

    def look(self) -> tuple[list[int], list[int]]:
        """(workers, preparing processes) under the job now. A worker's children are the preparing processes' fork
        server and multiprocessing's resource tracker (Python's, not a fault target); the processes are below."""
        workers = [w for server in children(self.job.pid) for w in children(server)]
        preparing = [p for w in workers for below in children(w) for p in children(below)]
        self.seen |= set(workers) | {p for w in workers for p in descendants(w)} | set(children(self.job.pid))
        self.last = (workers, preparing)
        return workers, preparing

    def wait_for(self, condition, within: float = 120) -> None:
        deadline = time.monotonic() + within
        while not condition():
            assert self.job.poll() is None and time.monotonic() < deadline, self.job.communicate()
            self.look()
            time.sleep(0.02)

    def finish(self, within: float = 150) -> tuple[int, str, str]:
        stdout, stderr = self.job.communicate(timeout=within)
        left = [pid for pid in self.seen if not process_gone(pid, within=15)]
        assert not left, f"processes of the job left behind: {left}"
        return self.job.returncode, stdout, stderr


def threads(pid: int) -> int:
    """A preparing process has one thread from its fork until its set-up starts torch's; a fault before that is one
    no code of vlmux's has run in yet."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def one_record_each(images: Path, out: Path) -> list[dict]:
    rows = read_jsonl(out)
    assert sorted(row["file"] for row in rows) == sorted(p.name for p in images.iterdir()), "not one record per image"
    return rows


def inject(images: Path, out: Path, target: str, sig: signal.Signals, seed: int) -> str:
    """One fault at a random point of a job, then a rerun if the job did not finish; returns what happened."""
    rng = random.Random(seed)
    job = start(images, out)
    watch = Watch(job)
    after = rng.randrange(0, len(list(images.iterdir())) // 4)
    if target == "preparing":  # they start after the load: wait for them to be set up, then for some records
        watch.wait_for(lambda: any(threads(pid) > 1 for pid in watch.look()[1]))
        watch.wait_for(lambda: records(out) >= after)
    else:
        watch.wait_for(lambda: records(out) >= after and watch.look()[0])
    workers, preparing = watch.last  # the look that ended the wait: a later one can come after the worker is gone
    preparing = [pid for pid in preparing if threads(pid) > 1]
    victim = {"worker": lambda: rng.choice(workers), "preparing": lambda: rng.choice(preparing),
              "job": lambda: job.pid}[target]()
    os.kill(victim, sig)
    code, stdout, stderr = watch.finish()
    if code == 0:
        assert "0 errors" in stdout and "Traceback" not in stderr, (stdout, stderr)
        outcome = "finished (retried)"
    else:
        assert target == "job" and code == -sig, (code, stderr)  # only killing the job itself may end it
        rerun = run_caption(*shapes_job(images, out))
        assert rerun.returncode == 0 and "0 errors" in rerun.stdout, rerun.stderr
        outcome = "killed, rerun resumed"
    rows = one_record_each(images, out)
    assert all(row["caption"] and row["error"] is None for row in rows)
    return outcome


@pytest.mark.parametrize("target, sig, seed", [("worker", signal.SIGSEGV, 1), ("preparing", signal.SIGKILL, 2),
                                               ("job", signal.SIGKILL, 3)])
def test_a_fault_at_a_random_point_loses_nothing_and_leaves_no_process(tmp_path, images, many_images, target, sig,
                                                                     seed):
    inject(many_images if target == "preparing" else images, tmp_path / "out.jsonl", target, sig, seed)


# A stopped job is its caller's to continue or kill: SIGSTOP goes to the job's workers and preparing processes only.
CAMPAIGN = [(target, sig) for target in ("worker", "preparing", "job")
            for sig in (signal.SIGKILL, signal.SIGSEGV, signal.SIGSTOP) if (target, sig) != ("job", signal.SIGSTOP)]


@pytest.mark.stress
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("target, sig", CAMPAIGN)
def test_a_fault_at_a_random_point_loses_nothing_and_leaves_no_process_long(tmp_path, images, many_images, target,
                                                                          sig, seed):
    inject(many_images if target == "preparing" else images, tmp_path / "out.jsonl", target, sig, seed)


def test_a_full_disk_fails_in_one_line_naming_the_output_and_the_rerun_completes(tmp_path, images):
    out = tmp_path / "out.jsonl"
    job = start(images, out, limit_bytes=1500)  # about 12 records fit; the next write hits the limit mid-line
    code, _, stderr = Watch(job).finish()
    lines = [line for line in stderr.splitlines() if line.startswith("vlmux caption")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"cannot write results to {out}: File too large" in lines[0] and "free some space" in lines[0]
    assert 0 < records(out) < IMAGES
    rerun = run_caption(*shapes_job(images, out))
    assert rerun.returncode == 0, rerun.stderr
    one_record_each(images, out)


@pytest.mark.parametrize("name", ["out.jsonl", pytest.param("out.parquet", marks=pytest.mark.stress)])
def test_an_output_deleted_mid_job_is_written_again_whole(tmp_path, images, name):
    out = tmp_path / name
    job = start(images, out)
    watch = Watch(job)
    watch.wait_for(lambda: records(out) >= 8)
    journal(out).unlink()
    code, stdout, stderr = watch.finish()
    assert code == 0 and "was deleted or replaced during the job; written again" in stderr, stderr
    if name.endswith(".jsonl"):
        one_record_each(images, out)
    else:
        import pyarrow.parquet as pq

        files = sorted(row["file"] for row in pq.read_table(out).to_pylist())
        assert files == sorted(p.name for p in images.iterdir())


def read_only(folder: Path) -> None:
    """Root writes through any mode bits: as root a read-only bind mount goes over the folder (the job's open files
    stay on the mount below, as an open file keeps working after a chmod)."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
    else:
        folder.chmod(0o555)


def writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o755)


def test_an_output_made_read_only_mid_job_fails_in_one_line_and_the_rerun_completes(tmp_path, images):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "out.parquet"  # the table's rewrite at the model's end creates a file in the folder
    job = start(images, out)
    watch = Watch(job)
    watch.wait_for(lambda: records(out) >= 8)
    read_only(folder)
    try:
        code, _, stderr = watch.finish()
    finally:
        writable(folder)
    lines = [line for line in stderr.splitlines() if line.startswith("vlmux caption")]
    assert code == 1 and len(lines) == 1 and "make the output writable" in lines[0], stderr
    rerun = run_caption(*shapes_job(images, out))
    assert rerun.returncode == 0 and "already done" in rerun.stdout, rerun.stderr
    import pyarrow.parquet as pq

    assert sorted(row["file"] for row in pq.read_table(out).to_pylist()) == sorted(p.name for p in images.iterdir())
