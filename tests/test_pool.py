import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vlmux import GenerationSpec, ModelLoadError, ModelPool, ModelSpec, PoolConfig, pipeline
from vlmux.pool.pool import ModelNotLoaded
from vlmux.testing.processes import process_gone
from vlmux.errors import WorkerDied


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_twenty_load_close_cycles_leave_no_workers_and_no_parent_growth(tiny_llava, tiny_qwen, image_dir):
    images = sorted(image_dir.iterdir())[:2]
    pids, rss = [], []
    for cycle in range(20):
        model = tiny_llava if cycle % 2 == 0 else tiny_qwen
        with pipeline(str(model), device="cpu", max_new_tokens=4) as pipe:
            assert len(pipe(images)) == 2
            pids.append(pipe.status[0].pid)
        assert pipe.close() is pipe.release  # closing again is a no-op
        rss.append(rss_kib())
    assert len(set(pids)) == 20 and os.getpid() not in pids
    assert all(process_gone(pid) for pid in pids)
    # After warm-up, twenty cycles must not grow the parent: it holds no model state at all.
    assert rss[-1] - rss[4] < 20 * 1024, rss


def test_sigkilled_worker_fails_its_request_clearly_and_the_pool_recovers(tiny_llava, image_dir):
    images = sorted(image_dir.iterdir())
    with pipeline(str(tiny_llava), device="cpu", max_new_tokens=4) as pipe:
        before = pipe(images[0])
        pid = pipe.status[0].pid
        errors: list[BaseException] = []

        def long_request():
            try:
                pipe(images * 40, max_new_tokens=200, ignore_eos=True)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        caller = threading.Thread(target=long_request)
        caller.start()
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        caller.join(30)
        assert not caller.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], WorkerDied)
        assert "SIGKILL" in str(errors[0]) and "reloads" in str(errors[0])
        assert pipe(images[0]) == before  # the next request loads the model again and answers the same
        assert pipe.status[0].pid != pid


def test_concurrent_callers_are_served_in_batches(tiny_qwen, image_dir):
    images = sorted(image_dir.iterdir())
    gen = GenerationSpec(max_new_tokens=6)
    with ModelPool(PoolConfig(max_batch_size=8, spare_worker=False)) as pool:
        name = pool.load(ModelSpec(str(tiny_qwen), device="cpu"))
        alone = [pool.caption(name, [image], ["Describe."], gen)[0].caption for image in images]
        with ThreadPoolExecutor(len(images) * 2) as callers:
            futures = [callers.submit(pool.caption, name, [image], ["Describe."], gen) for image in images * 2]
            together = [future.result()[0].caption for future in futures]
        assert together == alone * 2
        status = pool.status()[0]
        assert status.requests == len(images) * 3
        assert status.batches < status.requests  # some callers shared a worker call


def test_a_model_that_fails_to_load_is_a_clear_error_and_leaves_no_worker(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llava"}')
    with ModelPool(PoolConfig(spare_worker=False)) as pool:
        with pytest.raises(ModelLoadError, match="could not load"):
            pool.load(ModelSpec(str(broken), device="cpu"))
        assert pool.status() == []


def test_idle_models_expire_after_keep_alive(tiny_llava):
    with ModelPool(PoolConfig(keep_alive=0.3, spare_worker=False)) as pool:
        name = pool.load(ModelSpec(str(tiny_llava), device="cpu"))
        pid = pool.status()[0].pid
        assert pool.state(name) == "ready" and pool.state("no such model") is None
        deadline = time.monotonic() + 10
        while name in pool and time.monotonic() < deadline:
            time.sleep(0.05)
        assert name not in pool and pool.state(name) is None
        assert process_gone(pid)
        with pytest.raises(ModelNotLoaded):
            pool.caption(name, [], [], GenerationSpec())


def test_concurrent_loads_of_one_model_load_it_once_and_other_models_keep_serving(tiny_llava, tiny_qwen, image_dir):
    image = sorted(image_dir.iterdir())[0]
    gen = GenerationSpec(max_new_tokens=4)
    with ModelPool(PoolConfig(spare_worker=False)) as pool:
        first = pool.load(ModelSpec(str(tiny_llava), device="cpu"))
        with ThreadPoolExecutor(6) as callers:
            loads = [callers.submit(pool.load, ModelSpec(str(tiny_qwen), device="cpu")) for _ in range(3)]
            answers = [callers.submit(pool.caption, first, [image], ["Describe."], gen) for _ in range(3)]
            assert {future.result() for future in loads} == {str(tiny_qwen)}
            assert all(future.result()[0].caption for future in answers)
        assert sorted(status.name for status in pool.status()) == sorted([str(tiny_llava), str(tiny_qwen)])


def test_a_spare_killed_while_it_waits_never_fails_a_load(tiny_llava):
    import os
    import signal

    from vlmux.testing.processes import children

    with ModelPool(PoolConfig(spare_worker=True)) as pool:
        deadline = time.monotonic() + 60
        spares: list[int] = []
        while not spares and time.monotonic() < deadline:  # the fork server, then its first child: the spare
            spares = [child for server in children(os.getpid()) for child in children(server)]
            time.sleep(0.05)
        assert spares, "no spare worker appeared"
        for pid in spares:
            os.kill(pid, signal.SIGKILL)
        name = pool.load(ModelSpec(str(tiny_llava), device="cpu"))
        assert pool.status()[0].pid not in spares and name in pool


def test_a_worker_sees_only_the_gpus_of_its_placement_and_a_split_model_gets_its_device_map(tiny_llava):
    from vlmux.pool.placement import WorkerPlacement
    from vlmux.testing.fakes import FakeGpus, FakeGpuWorkers

    gpus = FakeGpus(count=6, total=80 * 2**30)
    workers = FakeGpuWorkers(gpus)
    with ModelPool(PoolConfig(), inventory=gpus, workers=workers) as pool:
        split = WorkerPlacement((2, 3), (70 * 2**30, 71 * 2**30), (75 * 2**30, 76 * 2**30))
        pool.load(ModelSpec(str(tiny_llava)), "split", split)
        pool.load(ModelSpec(str(tiny_llava)), "single", WorkerPlacement((5,), (), (2**30,)))
        pool.load(ModelSpec(str(tiny_llava)), "cpu", WorkerPlacement())
    split_load, single, cpu = workers.loads
    assert split_load.env == {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert split_load.spec.device == "cuda:0" and split_load.spec.max_memory == split.max_memory
    assert split_load.memory_budget is None  # a split model's batches keep to free memory
    assert single.env["CUDA_VISIBLE_DEVICES"] == "5" and single.spec.max_memory == ()
    assert cpu.env["CUDA_VISIBLE_DEVICES"] == "" and cpu.spec.device == "cpu"


def test_two_cpu_replicas_of_one_model_serve_side_by_side_and_answer_alike(tiny_qwen, image_dir):
    images = sorted(image_dir.iterdir())
    gen = GenerationSpec(max_new_tokens=6)
    spec = ModelSpec(str(tiny_qwen), device="cpu")
    with ModelPool(PoolConfig(max_batch_size=2, spare_worker=False)) as pool:
        placements = pool.place(spec, replicas=2)
        assert [p.gpus for p in placements] == [(), ()]
        names = [pool.load(spec, f"replica-{i}", placement) for i, placement in enumerate(placements)]
        assert len({status.pid for status in pool.status()}) == 2
        answers = [pool.submit_caption(name, images, ["Describe."] * len(images), gen) for name in names]
        first, second = ([r.caption for r in future.result().results] for future in answers)
        assert first == second and all(first)
        assert all(status.requests == 1 for status in pool.status())
        releases = [pool.unload(name) for name in names]
        assert all(release.process_gone for release in releases)


def test_a_streamed_chat_gives_its_text_in_pieces_that_join_to_the_answer(tiny_qwen, image_dir):
    image = sorted(image_dir.iterdir())[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Describe."}]}]
    gen = GenerationSpec(max_new_tokens=24)
    with ModelPool() as pool:
        name = pool.load(ModelSpec(str(tiny_qwen), device="cpu"))
        pieces: list[str] = []
        streamed = pool.chat(name, messages, gen, on_text=pieces.append)
        whole = pool.chat(name, messages, gen)
    assert streamed == whole and "".join(pieces) == whole
    assert len(pieces) > 1  # as generated, not the answer in one piece at the end


def test_concurrent_chats_share_a_batch_and_each_gets_its_own_answer_and_stream(tiny_qwen, image_dir):
    images = sorted(image_dir.iterdir())
    gen = GenerationSpec(max_new_tokens=12)

    def conversation(image, question="Describe."):
        return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]}]

    asks = [conversation(image, question) for image in images for question in ("Describe.", "What is it, in a few words?")]
    asks.append(conversation(image_dir / "missing.jpg"))  # a bad image fails alone
    with ModelPool(PoolConfig(max_batch_size=8, spare_worker=False)) as pool:
        name = pool.load(ModelSpec(str(tiny_qwen), device="cpu"))
        alone = [pool.chat(name, messages, gen) for messages in asks[:-1]]
        pieces: list[list[str]] = [[] for _ in asks]
        with ThreadPoolExecutor(len(asks)) as callers:
            futures = [callers.submit(pool.chat, name, messages, gen, pieces[i].append) for i, messages in enumerate(asks)]
            together = [future.result() for future in futures[:-1]]
            with pytest.raises(RuntimeError, match="missing.jpg"):
                futures[-1].result()
        status = pool.status()[0]
    assert together == alone
    assert ["".join(streamed) for streamed in pieces[:-1]] == alone and pieces[-1] == []
    assert status.batches < status.requests  # some conversations shared a worker call
