"""Faults a caller meets (B1-B8 of issue 15): every request gets its answer or a clear exception in bounded time,
a bad input fails only its own item, close() leaves no worker, a dead worker is noticed when it dies."""
import os
import signal
import threading
import time

import pytest
from PIL import Image

import vlmux
from vlmux import (GenerationSpec, ImageError, ModelNotLoaded, ModelPool, ModelSpec, PoolClosed, PoolConfig, WorkerDied,
                   pipeline)
from vlmux.testing.processes import children, process_gone
from vlmux.testing.workers import wait_until

GEN = GenerationSpec(max_new_tokens=4)
LONG = GenerationSpec(max_new_tokens=300, ignore_eos=True)


def cpu_pool(**config) -> ModelPool:
    return ModelPool(PoolConfig(spare_worker=False, **config))


def test_the_public_exceptions_are_exported_and_print_plainly():
    assert {"WorkerDied", "ModelNotLoaded", "PoolClosed", "PoolFull", "ModelLoadError"} <= set(vlmux.__all__)
    assert str(ModelNotLoaded("m is not loaded")) == "m is not loaded"


def test_b1_inputs_that_cannot_be_pickled_fail_alone_and_later_callers_are_served(tiny_llava, image_dir):
    path = sorted(image_dir.iterdir())[0]
    with pipeline(str(tiny_llava), device="cpu", max_new_tokens=4) as pipe:
        alone = pipe(path)
        assert pipe(p for p in [path, path]) == [alone, alone]  # any iterable of images
        with open(path, "rb") as f:
            assert pipe([f]) == [alone]  # an open file is read
        with pytest.raises(ImageError, match="image 0: not an image: generator"):
            pipe([(p for p in [path])])
        assert pipe(path) == alone


def test_b2_a_worker_that_stops_answering_is_killed_and_reported_and_close_returns(tiny_llava, image_dir):
    image = sorted(image_dir.iterdir())[0]
    pool = cpu_pool(hang_timeout=2.0)
    name = pool.load(ModelSpec(str(tiny_llava), device="cpu"))
    pid = pool.status()[0].pid
    request = pool.submit_caption(name, [image] * 200, ["Describe."] * 200, LONG)
    time.sleep(1.0)
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(WorkerDied, match="stopped answering"):
        request.result(30)
    assert time.monotonic() - started < 10 and process_gone(pid)
    assert pool.caption(name, [image], ["Describe."], GEN)[0].caption  # loaded again
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 10


def test_b3_a_bad_item_fails_only_itself_even_batched_with_other_callers(tiny_qwen, image_dir):
    image = sorted(image_dir.iterdir())[0]
    with cpu_pool(max_batch_size=8) as pool:
        name = pool.load(ModelSpec(str(tiny_qwen), device="cpu"))
        alone = pool.caption(name, [image], ["Describe."], GEN)[0].caption
        blocker = pool.submit_caption(name, [image] * 2, ["Describe."] * 2, GenerationSpec(max_new_tokens=40, ignore_eos=True))
        # queued behind the blocker, these three are served together in one worker call
        good = pool.submit_caption(name, [image], ["Describe."], GEN)
        none = pool.submit_caption(name, [None], ["Describe."], GEN)
        empty = pool.submit_caption(name, [Image.new("RGB", (0, 4)), image], ["Describe."] * 2, GEN)
        blocker.result(60)
        assert good.result(60).results[0].caption == alone
        [bad] = none.result(60).results
        assert bad.bad_image and "NoneType" in bad.error
        zero, fine = empty.result(60).results
        assert zero.bad_image and "no pixels" in zero.error and fine.caption == alone
        assert pool.status()[0].batches < pool.status()[0].requests


def test_b4_close_during_a_load_waits_for_it_and_leaves_no_worker(tiny_llava):
    pool = cpu_pool()
    outcome = []

    def load():
        try:
            pool.load(ModelSpec(str(tiny_llava), device="cpu"))
            outcome.append("loaded")
        except PoolClosed as e:
            outcome.append(e)

    loader = threading.Thread(target=load)
    loader.start()
    assert wait_until(lambda: [s.state for s in pool.status()] == ["loading"], 10)
    server = children(os.getpid())
    pool.close()
    loader.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], PoolClosed)
    workers = [child for parent in server for child in children(parent)]
    assert all(process_gone(pid) for pid in workers) and pool.status() == []


def test_b5_close_during_an_unload_returns_only_once_that_worker_is_gone(tiny_llava):
    pool = cpu_pool(unload_grace=2.0)
    name = pool.load(ModelSpec(str(tiny_llava), device="cpu"))
    pid = pool.status()[0].pid
    os.kill(pid, signal.SIGSTOP)  # it ignores the exit request: killed after the grace period
    releasing = pool.unload_async(name)
    pool.close()
    assert process_gone(pid) and releasing.done()


def test_b7_a_worker_that_dies_while_idle_is_noticed_and_the_next_request_reloads(tiny_llava, image_dir):
    image = sorted(image_dir.iterdir())[0]
    with cpu_pool() as pool:
        name = pool.load(ModelSpec(str(tiny_llava), device="cpu"))
        before = pool.caption(name, [image], ["Describe."], GEN)[0].caption
        pid = pool.status()[0].pid
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: pool.status()[0].state == "dead", 5)  # no request needed to notice
        assert pool.caption(name, [image], ["Describe."], GEN)[0].caption == before
        assert pool.status()[0].pid != pid


def test_b7_requests_queued_behind_a_dying_worker_are_served_after_the_reload(tiny_llava, image_dir):
    image = sorted(image_dir.iterdir())[0]
    with cpu_pool(max_batch_size=1) as pool:
        name = pool.load(ModelSpec(str(tiny_llava), device="cpu"))
        before = pool.caption(name, [image], ["Describe."], GEN)[0].caption
        pid = pool.status()[0].pid
        running = pool.submit_caption(name, [image] * 200, ["Describe."] * 200, LONG)
        queued = [pool.submit_caption(name, [image], ["Describe."], GEN) for _ in range(3)]
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied, match="SIGKILL"):
            running.result(30)
        assert [future.result(60).results[0].caption for future in queued] == [before] * 3


def test_b8_a_dead_fork_server_leaves_healthy_workers_healthy(tiny_llava, tiny_qwen, image_dir):
    image = sorted(image_dir.iterdir())[0]
    with cpu_pool() as pool:
        name = pool.load(ModelSpec(str(tiny_llava), device="cpu"))
        pid = pool.status()[0].pid
        servers = [child for child in children(os.getpid()) if pid in children(child)]
        assert servers, "the worker's fork server was not found"
        os.kill(servers[0], signal.SIGKILL)
        assert wait_until(lambda: process_gone(servers[0]), 5)
        time.sleep(0.5)
        assert pool.status()[0].state == "ready" and pool.status()[0].pid == pid
        assert pool.caption(name, [image], ["Describe."], GEN)[0].caption
        assert pool.load(ModelSpec(str(tiny_qwen), device="cpu"))  # a new fork server starts it
        with pytest.raises(ModelNotLoaded):
            pool.caption("never-loaded", [image], ["Describe."], GEN)
