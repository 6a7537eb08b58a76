"""Preparing processes: parts joined equal the processor's whole batch, and captions equal the worker's own path."""
import time

import pytest
import torch
from PIL import Image

from vlmux.backends.transformers import host_inputs, load_processor
from vlmux.config import GenerationSpec, ModelSpec
from vlmux.images import load_image
from vlmux.testing.processes import children, descendants, process_gone
from vlmux.testing.workers import CPU_ENV, NoRelease
from vlmux.tiny import draw_sample_images
from vlmux.worker.prep import NotJoinable, join
from vlmux.pool.process import WorkerProcess
from vlmux.protocol import Caption, Captions, Load, Loaded

GEN = GenerationSpec(max_new_tokens=6)
PROMPTS = ["Describe.", "Describe this picture in a few words, please.", "What is it?"]



def pictures(count: int) -> list[Image.Image]:
    sizes = [(64, 48), (40, 72), (96, 96), (50, 50), (120, 80)]
    return [Image.new("RGB", sizes[i % len(sizes)], (30 * i % 255, 90, 160)) for i in range(count)]


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "idefics3"])
def test_parts_joined_equal_the_processor_on_the_whole_batch(tiny_models, arch):
    processor = load_processor(tiny_models[arch], trust_remote_code=False)
    images = pictures(7)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(7)]  # prompts of different lengths: padding differs per part
    whole = host_inputs(processor, images, prompts, torch.float32)
    parts = [host_inputs(processor, images[s : s + 3], prompts[s : s + 3], torch.float32) for s in range(0, 7, 3)]
    try:
        joined = join(parts, processor.tokenizer.pad_token_id)
    except NotJoinable:  # tiles per image differ between parts: the pool then prepares the chunk in one part
        assert arch == "idefics3"
        return
    assert joined.keys() == whole.keys()
    for key in whole:
        assert torch.equal(joined[key], whole[key]), key


def test_captions_prepared_in_processes_equal_the_workers_own(tiny_qwen, tmp_path):
    folder = tmp_path / "images"
    draw_sample_images(folder, count=18, seed=3)
    items = sorted(str(p) for p in folder.iterdir())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    items.insert(5, str(tmp_path / "broken.jpg"))
    Image.new("RGB", (1, 1000)).save(tmp_path / "sliver.png")  # padded to 100:1 where it is decoded; the note comes back
    items.insert(11, str(tmp_path / "sliver.png"))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(items))]
    request = Caption(items, prompts, GEN, 8)

    def captions(processes: int) -> tuple[Captions, list[int]]:
        worker = WorkerProcess()
        try:
            spec = ModelSpec(str(tiny_qwen), device="cpu", prep_processes=processes)
            assert isinstance(worker.call(Load(spec, str(tiny_qwen), CPU_ENV)), Loaded)
            reply = worker.call(request)
            deadline = time.monotonic() + 120
            while processes and reply.prepared_apart < 3 and time.monotonic() < deadline:  # 3 chunks of 8 (20 images)
                time.sleep(1)  # the processes start in the background; until then the worker prepares chunks itself
                reply = worker.call(request)
            helpers = descendants(worker.pid)
        finally:
            worker.stop(5, NoRelease())
        return reply, helpers

    own, _ = captions(0)
    apart, helpers = captions(2)
    assert own.prepared_apart == 0 and apart.prepared_apart == 3
    assert 0 < own.input_wait < own.seconds  # the first chunk is decoded before anything can generate
    assert [r.caption for r in apart.results] == [r.caption for r in own.results]
    assert apart.results[5].bad_image and apart.results[5].caption is None
    assert "padded from 1x1000 to 10x1000" in apart.results[11].note and apart.results[11].note == own.results[11].note
    assert all(r.caption for i, r in enumerate(apart.results) if i != 5)
    assert len(helpers) >= 3  # the fork server and its two preparing processes
    assert all(process_gone(pid, within=10) for pid in helpers), "a preparing process outlived its worker"


@pytest.mark.parametrize("cores,expected", [(16, 12), (64, 12), (6, 4), (4, 2), (3, 0)])
def test_on_a_gpu_the_host_cores_less_two_prepare_and_on_the_cpu_none(monkeypatch, cores, expected):
    from vlmux.worker import prep

    monkeypatch.setattr(prep.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert prep.auto_processes("cuda:0") == expected
    assert prep.auto_processes("cpu") == 0


def test_an_explicit_count_starts_the_processes_with_the_load(tiny_qwen):
    worker = WorkerProcess()
    try:
        spec = ModelSpec(str(tiny_qwen), device="cpu", prep_processes=2)
        assert isinstance(worker.call(Load(spec, str(tiny_qwen), CPU_ENV)), Loaded)
        deadline = time.monotonic() + 120
        while len(descendants(worker.pid)) < 3 and time.monotonic() < deadline:  # before any caption request
            time.sleep(0.2)
        assert len(descendants(worker.pid)) >= 3  # the fork server and two preparing processes
    finally:
        worker.stop(5, NoRelease())


def test_a_preparing_process_that_dies_leaves_the_worker_preparing_chunks_itself(tiny_qwen, tmp_path):
    import os
    import signal

    folder = tmp_path / "images"
    draw_sample_images(folder, count=16, seed=4)
    items = sorted(str(p) for p in folder.iterdir())
    request = Caption(items, ["Describe."] * len(items), GEN, 8)
    worker = WorkerProcess()
    try:
        spec = ModelSpec(str(tiny_qwen), device="cpu", prep_processes=2)
        assert isinstance(worker.call(Load(spec, str(tiny_qwen), CPU_ENV)), Loaded)
        reply = worker.call(request)
        deadline = time.monotonic() + 120
        while reply.prepared_apart < 2 and time.monotonic() < deadline:
            time.sleep(1)
            reply = worker.call(request)
        assert reply.prepared_apart == 2
        helpers = [pid for pid in descendants(worker.pid) if pid not in set(children(worker.pid))]  # not the server
        os.kill(helpers[0], signal.SIGKILL)
        assert process_gone(helpers[0])
        # The executor notices the death on its own thread: a chunk submitted before that may still be prepared
        # by the surviving process, so the first reply after the kill can be mixed; every caption must be right.
        afterwards = [worker.call(request)]
        while afterwards[-1].prepared_apart and len(afterwards) < 5:
            afterwards.append(worker.call(request))
        afterwards.append(worker.call(request))
    finally:
        worker.stop(5, NoRelease())
    assert afterwards[-2].prepared_apart == 0 and afterwards[-1].prepared_apart == 0  # its own threads from now on
    for after in afterwards:
        assert [r.caption for r in after.results] == [r.caption for r in reply.results]


def test_a_pool_closed_while_it_starts_leaves_no_preparing_process(tiny_qwen):
    import os

    from vlmux.worker.prep import PrepPool, Source

    before = set(descendants(os.getpid()))
    pool = PrepPool(2, Source(str(tiny_qwen), False, "float32"))
    pool.close()  # at once, as a failed load does: the start must not go on behind it
    assert not pool.wait_ready(120)
    started = [pid for pid in descendants(os.getpid()) if pid not in before]
    # The fork server may have started (it lives as long as this process); no preparing process may.
    assert all(process_gone(pid, within=30) for pid in started if pid not in set(children(os.getpid())))


def test_a_short_chunk_is_padded_to_the_compiled_batch_like_the_worker_pads_it(tiny_qwen, tmp_path):
    from vlmux.backends.fast import pad_rows
    from vlmux.worker.prep import PrepPool, Source

    folder = tmp_path / "images"
    draw_sample_images(folder, count=5, seed=5)
    items = sorted(str(p) for p in folder.iterdir())
    items.insert(2, str(tmp_path / "missing.jpg"))  # a bad image: the rows shrink to 5, then pad to 8
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(items))]
    pool = PrepPool(2, Source(str(tiny_qwen), False, "float32"))
    try:
        assert pool.wait_ready(120), pool.failed
        processor = load_processor(tiny_qwen, trust_remote_code=False)
        done = pool.prepare(items, prompts, pad_to=8, pad_token_id=processor.tokenizer.pad_token_id)
    finally:
        pool.close()
    assert done.good == [0, 1, 3, 4, 5] and list(done.bad) == [2] and done.rows == 5
    good_images = [load_image(items[i]) for i in done.good]
    good_prompts = [prompts[i] for i in done.good]
    expected = host_inputs(processor, pad_rows(good_images, 8), pad_rows(good_prompts, 8), torch.float32)
    assert done.inputs.keys() == expected.keys()
    for key in expected:
        assert torch.equal(done.inputs[key], expected[key]), key


EXIT_WITH_A_STOPPED_PREPARING_PROCESS = """
import os, signal, sys
from vlmux.worker.prep import PrepPool, Source
pool = PrepPool(2, Source(sys.argv[1], False, "float32"))
assert pool.wait_ready(120), pool.failed
os.kill(pool.pids[0], signal.SIGSTOP)  # a stopped process never reads the executor's exit request
print("stopped", flush=True)
"""  # and exit without close(), as a process whose owner forgot it does


def test_a_process_exits_with_a_preparing_process_stopped_and_its_pool_never_closed(tiny_qwen):
    import subprocess
    import sys

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", EXIT_WITH_A_STOPPED_PREPARING_PROCESS, str(tiny_qwen)],
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0 and "stopped" in done.stdout, done.stderr[-2000:]
    assert time.monotonic() - started < 120  # Python's exit joins the executor's processes: none may hold it
