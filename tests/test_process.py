"""Worker processes: started without the caller's main module, a dead fork server replaced, a hung worker killed."""
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlmux.config import GenerationSpec, ModelSpec
from vlmux.errors import WorkerDied
from vlmux.pool.process import WorkerProcess
from vlmux.protocol import HEARTBEAT_SECONDS, Caption, Captions, Load, Loaded
from vlmux.testing.processes import process_gone
from vlmux.testing.workers import CPU_ENV, NoRelease
from vlmux.tiny import draw_sample_images

CHILD_TIMEOUT = 120  # the child's fork server imports torch and transformers first

# A plain script: no `if __name__ == "__main__":` guard around the pipeline.
PIPELINE = """
import glob, vlmux
with vlmux.pipeline({model!r}, device="cpu", max_new_tokens=4) as pipe:
    for caption in pipe(sorted(glob.glob({images!r}))[:2]):
        print("CAPTION", repr(caption))
"""


def pipeline_source(model: Path, images: Path) -> str:
    return PIPELINE.format(model=str(model), images=str(images / "*"))


def assert_two_captions(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    captions = [line for line in result.stdout.splitlines() if line.startswith("CAPTION ")]
    assert len(captions) == 2, result.stdout
    assert all(caption != "CAPTION ''" for caption in captions), result.stdout


def test_a_script_without_a_main_guard_runs_a_pipeline(tiny_llava, image_dir, tmp_path):
    script = tmp_path / "caption.py"
    script.write_text(pipeline_source(tiny_llava, image_dir))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert_two_captions(result)


def test_a_script_read_from_stdin_runs_a_pipeline(tiny_llava, image_dir):
    result = subprocess.run([sys.executable, "-"], input=pipeline_source(tiny_llava, image_dir), capture_output=True,
                            text=True, timeout=CHILD_TIMEOUT)
    assert_two_captions(result)


def test_a_command_line_program_runs_a_pipeline(tiny_llava, image_dir):
    result = subprocess.run([sys.executable, "-c", pipeline_source(tiny_llava, image_dir)], capture_output=True,
                            text=True, timeout=CHILD_TIMEOUT)
    assert_two_captions(result)


def test_a_notebook_cell_runs_a_pipeline(tiny_llava, image_dir):
    # What IPython does with a cell: code named after no file, run in a __main__ that has no file either.
    cell = (f"src = {pipeline_source(tiny_llava, image_dir)!r}\n"
            "exec(compile(src, '<ipython-input-1>', 'exec'), {'__name__': '__main__'})\n")
    result = subprocess.run([sys.executable, "-c", cell], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert_two_captions(result)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])



def loaded_worker(model: Path, hang_timeout: float = 30.0) -> WorkerProcess:
    worker = WorkerProcess(hang_timeout=hang_timeout)
    spec = ModelSpec(str(model), device="cpu")
    assert isinstance(worker.call(Load(spec, str(model), CPU_ENV), timeout=120), Loaded)
    return worker


def caption(items: list, max_new_tokens: int = 4, ignore_eos: bool = False) -> Caption:
    return Caption(items, ["Describe."] * len(items), GenerationSpec(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos),
                   None)


def test_a_killed_fork_server_leaves_its_workers_running_and_is_started_again(tiny_llava, image_dir):
    image = str(sorted(image_dir.iterdir())[0])
    worker = loaded_worker(tiny_llava)
    fresh = None
    try:
        server = parent_of(worker.pid)
        os.kill(server, signal.SIGKILL)
        assert process_gone(server)
        assert worker.alive
        reply = worker.call(caption([image]))
        assert isinstance(reply, Captions) and reply.results[0].caption
        fresh = WorkerProcess()
        assert parent_of(fresh.pid) != server  # forked by a new server
        assert isinstance(fresh.call(Load(ModelSpec(str(tiny_llava), device="cpu"), str(tiny_llava), CPU_ENV)), Loaded)
        assert fresh.call(caption([image])).results == reply.results
    finally:
        worker.stop(5, NoRelease())
        if fresh is not None:
            fresh.stop(5, NoRelease())
    assert process_gone(worker.pid) and process_gone(fresh.pid)


STOPPED_WORKER = """
import time
from vlmux.pool.process import WorkerProcess
print(WorkerProcess().pid, flush=True)
time.sleep(600)
"""


def test_a_stopped_worker_goes_when_its_pools_process_is_killed():
    """A worker watches for its parent's end itself, which a stopped one never does: its fork server kills it."""
    parent = subprocess.Popen([sys.executable, "-c", STOPPED_WORKER], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    try:
        os.kill(worker, signal.SIGSTOP)
        parent.kill()
        parent.wait()
        assert process_gone(worker, within=10), "a stopped worker outlived its pool's process"
    finally:
        if not process_gone(worker, within=0):
            os.kill(worker, signal.SIGKILL)


def long_request(folder: Path) -> Caption:
    """Some seconds of work for the tiny model on 2 cores (1.6 s for 48 images with torch 2.14 here: 96 to be sure)."""
    draw_sample_images(folder, count=96, seed=5)
    return caption(sorted(str(p) for p in folder.iterdir()), max_new_tokens=200, ignore_eos=True)


def test_a_request_longer_than_the_hang_timeout_is_kept_alive_by_heartbeats(tiny_llava, tmp_path):
    request = long_request(tmp_path)
    worker = loaded_worker(tiny_llava, hang_timeout=1.5)
    try:
        start = time.monotonic()
        reply = worker.call(request)
        # else this test proves nothing: past hang_timeout + one heartbeat, two heartbeats at least kept it alive
        assert time.monotonic() - start > worker.hang_timeout + HEARTBEAT_SECONDS
        assert isinstance(reply, Captions) and all(r.caption for r in reply.results)
        assert worker.alive
    finally:
        worker.stop(5, NoRelease())


def test_a_worker_that_stops_answering_is_killed_within_its_hang_timeout(tiny_llava, image_dir):
    worker = loaded_worker(tiny_llava, hang_timeout=2.0)
    try:
        os.kill(worker.pid, signal.SIGSTOP)  # stopped: no heartbeat, no reply
        start = time.monotonic()
        with pytest.raises(WorkerDied, match="stopped answering for 2 s") as died:
            worker.call(caption([str(sorted(image_dir.iterdir())[0])]))
        # not before its hang timeout; the upper bound is generous: a loaded 2-core machine delays the kill and reap
        assert 2.0 <= time.monotonic() - start < 2.0 + 10.0, died.value
        assert process_gone(worker.pid, within=5)
        assert not worker.alive and "stopped answering" in worker.exit_reason()
    finally:
        worker.stop(0, NoRelease())


def test_a_paused_worker_has_every_thread_stopped_and_finishes_its_request_once_resumed(tiny_llava, image_dir):
    worker = loaded_worker(tiny_llava)
    try:
        worker.pause()  # returns once every thread has stopped
        states = {task.name: (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                  for task in Path(f"/proc/{worker.pid}/task").iterdir()}
        assert set(states.values()) <= {"T", "t"}, states
        replies = []
        asking = threading.Thread(target=lambda: replies.append(worker.call(caption(sorted(map(str, image_dir.iterdir()))))))
        asking.start()
        asking.join(1.0)  # a paused worker cannot answer, however slow the machine: the request waits on it
        assert asking.is_alive() and replies == [] and worker.alive
        worker.resume()
        asking.join(60)
        assert isinstance(replies[0], Captions) and all(r.caption for r in replies[0].results) and worker.alive
    finally:
        worker.stop(5, NoRelease())


def test_a_request_that_overruns_its_timeout_is_killed(tiny_llava, image_dir):
    worker = loaded_worker(tiny_llava)
    try:
        os.kill(worker.pid, signal.SIGSTOP)  # a request that never ends, however fast the machine
        start = time.monotonic()
        with pytest.raises(WorkerDied, match="took longer than 2 s"):
            worker.call(caption([str(sorted(image_dir.iterdir())[0])]), timeout=2.0)
        # not before its timeout; the upper bound is generous: a loaded 2-core machine delays the kill and reap
        assert 2.0 <= time.monotonic() - start < 2.0 + 10.0
        assert process_gone(worker.pid, within=5) and not worker.alive
    finally:
        worker.stop(0, NoRelease())


def test_an_unpicklable_request_fails_at_once_and_the_worker_serves_the_next(tiny_llava, image_dir):
    image = str(sorted(image_dir.iterdir())[0])
    worker = loaded_worker(tiny_llava)
    try:
        with pytest.raises((TypeError, pickle.PicklingError), match="generator"):
            worker.call(caption([(x for x in [image])]))
        reply = worker.call(caption([image]), timeout=60)
        assert isinstance(reply, Captions) and reply.results[0].caption and reply.results[0].error is None
        assert worker.alive
    finally:
        worker.stop(5, NoRelease())


def test_a_load_never_waits_for_the_spares_warm_up_slice_and_the_warm_up_yields_after_it(tiny_llava, tiny_qwen):
    """The spare's warm-up slice blocks (its process stopped): a load takes a fresh worker at once and loads, and the
    warm-up sends no further slice once the blocked one ends."""
    from vlmux.pool.spawner import Spawner
    from vlmux.protocol import Warm

    spawner = Spawner(keep_spare=True)
    try:
        assert spawner.wait_ready(60)
        spare = spawner.spare_status().pid
        os.kill(spare, signal.SIGSTOP)  # a warm-up slice that blocks until the test lets it go
        spawner.warm([Warm(ModelSpec(str(model), device="cpu"), str(model), CPU_ENV) for model in (tiny_llava, tiny_qwen)])
        deadline = time.monotonic() + 10
        while not spawner.spare_status().warming:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        worker = spawner.take(CPU_ENV)
        assert worker.pid != spare and time.monotonic() - started < 1.0
        assert isinstance(worker.call(Load(ModelSpec(str(tiny_llava), device="cpu"), str(tiny_llava), CPU_ENV),
                                      timeout=120), Loaded)
        os.kill(spare, signal.SIGCONT)
        assert spawner.wait_ready(60)
        status = spawner.spare_status()
        assert status.pid == spare and status.models == (str(tiny_llava),)  # the second slice was never sent
        worker.kill()
    finally:
        os.kill(spare, signal.SIGCONT)
        spawner.close()
