"""The scheduler on fake GPUs with real tiny workers: eviction, PoolFull, budget accounting, keep-alive, switch
overlap, slow releases and many concurrent callers, all through ModelPool's public interface."""
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vlmux import GenerationSpec, ModelNotLoaded, ModelPool, ModelSpec, PoolConfig, PoolFull
from vlmux.estimate import estimate
from vlmux.pool.scheduler import FRESH_SECONDS
from vlmux.testing.fakes import GIB, FakeGpus, FakeGpuWorkers
from vlmux.testing.processes import process_gone

GEN = GenerationSpec(max_new_tokens=4)


def charge(model) -> int:
    return estimate(model, "auto", 1, GEN.max_new_tokens, on_gpu=True).total


def fake_pool(budget: int, **config):
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus)
    pool = ModelPool(PoolConfig(vram_budget=budget, max_batch_size=1, **config), inventory=gpus, workers=workers)
    return pool, gpus, workers


def load(pool, model) -> str:
    return pool.load(ModelSpec(str(model), device="cuda"), max_new_tokens=GEN.max_new_tokens)


def caption(pool, name, image) -> str:
    return pool.caption(name, [image], ["Describe."], GEN)[0].caption


def assert_switch_overlaps(pool, workers, current: str, old, new, image) -> None:
    """Switch from `current` (model `old`) to `new`: the new load starts before the old worker has stopped."""
    workers.events.clear()
    name, release = pool.switch(current, ModelSpec(str(new), device="cuda"))
    assert release.verified
    when = {(e.what, e.name): e.at for e in workers.events}
    assert when[("load_start", str(new))] < when[("stop_end", str(old))]  # overlapped
    assert caption(pool, name, image)


@pytest.fixture()
def image(image_dir):
    return sorted(image_dir.iterdir())[0]


def test_the_least_recently_used_idle_model_is_evicted_and_its_memory_comes_back(tiny_models, image):
    a, b, c = tiny_models["llava"], tiny_models["qwen2_vl"], tiny_models["idefics3"]
    pool, gpus, _ = fake_pool(charge(a) + charge(b) + charge(c) - 1)
    with pool:
        first, second = load(pool, a), load(pool, b)
        time.sleep(FRESH_SECONDS)  # a model just loaded is kept for its loaders' first requests, whatever its age
        caption(pool, first, image)  # b is now the least recently used
        evicted_pid = next(s.pid for s in pool.status() if s.name == second)
        third = load(pool, c)
        assert sorted(s.name for s in pool.status()) == sorted([first, third])
        assert process_gone(evicted_pid) and evicted_pid not in gpus.process_memory(0)
        assert pool.last_release[second].verified
        assert caption(pool, third, image)


def test_a_load_waits_for_a_busy_model_to_go_idle_then_evicts_it(tiny_models, image):
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    pool, _, _ = fake_pool(max(charge(a), charge(b)) + 1)
    with pool:
        first = load(pool, a)
        long = pool.submit_caption(first, [image] * 6, ["Describe."] * 6,
                                   GenerationSpec(max_new_tokens=300, ignore_eos=True))
        time.sleep(0.5)
        second = load(pool, b)  # waits for the long request, then evicts its model
        assert long.done() and long.result().results[0].caption is not None
        assert [s.name for s in pool.status()] == [second]


def test_pool_full_names_the_numbers_when_busy_models_stay_busy_or_the_model_never_fits(tiny_models, image):
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    pool, _, _ = fake_pool(max(charge(a), charge(b)) + 1, wait_for_room=0.5)
    with pool:
        first = load(pool, a)
        long = pool.submit_caption(first, [image] * 6, ["Describe."] * 6,
                                   GenerationSpec(max_new_tokens=300, ignore_eos=True))
        time.sleep(0.5)
        with pytest.raises(PoolFull, match=r"needs ~.* GiB on GPU 0; budget .* busy.*waited 0.5 s"):
            load(pool, b)
        long.result(120)
    small, _, _ = fake_pool(charge(b) - 1)
    with small:
        started = time.monotonic()
        with pytest.raises(PoolFull, match="resident: none"):
            load(small, b)
        assert time.monotonic() - started < 5  # nothing to wait for


RESIDENCY = 0.6  # seconds: long beside a tiny model's load and request, short for a test
BUSY = GenerationSpec(max_new_tokens=200, ignore_eos=True)  # a request that keeps a tiny model busy for a while


def feed(pool, name, image, until) -> float:
    """Keep `name` busy as the server does (three requests in flight, one sent as one is answered) until `until()`
    says True; the time it did. Every request sent is answered."""
    sent = []
    deadline = time.monotonic() + 60
    while not until():
        assert time.monotonic() < deadline, "the wait never ended"
        while sum(not future.done() for future in sent) < 3:
            sent.append(pool.submit_caption(name, [image], ["Describe."], BUSY))
        time.sleep(0.01)
    ended = time.monotonic()
    assert all(future.result(60).results[0].caption for future in sent)
    return ended


def yields_after(tiny_models, image, workers_setup=lambda workers, a: None, **config) -> tuple[float, float]:
    """With a budget for one model, `a` loaded and kept busy, a load of `b` waiting: the seconds from `a`'s load
    until `pool.awaited(a)` said True, and the seconds `a`'s worker said its load took. `b` is loaded then."""
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    pool, _, workers = fake_pool(max(charge(a), charge(b)) + 1, **config)
    workers_setup(workers, a)
    with pool, ThreadPoolExecutor(1) as loader:
        first = load(pool, a)
        ready = time.monotonic()
        load_seconds = pool.load_info(first)["total"]
        second = loader.submit(load, pool, b)
        yielded = feed(pool, first, image, lambda: pool.awaited(first))
        assert not second.done()  # b's load waited for a the whole time
        assert second.result(60) == str(b) and [s.name for s in pool.status()] == [str(b)]
    return yielded - ready, load_seconds


def test_a_busy_model_keeps_its_new_requests_for_its_minimum_residency_then_yields_to_a_waiting_load(
        tiny_models, image):
    waited, _ = yields_after(tiny_models, image, min_residency=RESIDENCY)
    assert RESIDENCY - 0.1 <= waited <= RESIDENCY + 0.5


def test_with_no_minimum_residency_a_busy_model_yields_to_a_waiting_load_at_once(tiny_models, image):
    waited, _ = yields_after(tiny_models, image, min_residency=0)
    assert waited < 0.3


def test_the_minimum_residency_is_by_default_as_long_as_the_models_own_load_took(tiny_models, image):
    def slow_load(workers, a):
        workers.load_delay[str(a)] = RESIDENCY

    waited, load_seconds = yields_after(tiny_models, image, slow_load)
    assert load_seconds >= RESIDENCY and load_seconds - 0.1 <= waited <= load_seconds + 0.5


def test_an_idle_model_is_evicted_for_a_waiting_load_at_once_within_its_minimum_residency(tiny_models, image):
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    pool, _, _ = fake_pool(max(charge(a), charge(b)) + 1, min_residency=60)
    with pool:
        first = load(pool, a)
        caption(pool, first, image)
        started = time.monotonic()
        second = load(pool, b)  # a is idle: evicted once its loaders' second passed
        assert time.monotonic() - started < 10 and [s.name for s in pool.status()] == [second]


def test_within_its_residency_a_model_whose_queue_just_emptied_takes_its_clients_next_request(
        tiny_models, image, monkeypatch):
    monkeypatch.setattr("vlmux.pool.runner.IDLE_GRACE", 1.0)  # wide: a busy CI machine must not close it
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    pool, _, _ = fake_pool(max(charge(a), charge(b)) + 1, min_residency=60)
    with pool, ThreadPoolExecutor(1) as loader:
        first = load(pool, a)
        time.sleep(1.05)  # past the just-loaded second, which alone would keep it
        caption(pool, first, image)
        second = loader.submit(load, pool, b)
        time.sleep(0.2)  # a closed-loop client's next request, a moment after its answer
        assert pool.submit_caption(first, [image], ["Describe."], GEN).result(60).results[0].caption
        assert second.result(60) == str(b)  # then idle for its grace: evicted
        assert [s.name for s in pool.status()] == [str(b)]


def test_a_loads_wait_for_room_counts_from_the_end_of_the_busy_models_residency(tiny_models, image):
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    pool, _, _ = fake_pool(max(charge(a), charge(b)) + 1, min_residency=RESIDENCY, wait_for_room=0.3)
    with pool, ThreadPoolExecutor(1) as loader:
        first = load(pool, a)
        ready = time.monotonic()
        second = loader.submit(load, pool, b)
        failed = feed(pool, first, image, second.done)  # a never goes idle
        with pytest.raises(PoolFull, match="waited 0.3 s"):
            second.result()
    assert failed - ready >= RESIDENCY + 0.3 - 0.05


def test_the_load_carries_the_room_its_batches_may_use(tiny_models):
    model = tiny_models["qwen2_vl"]
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus)
    need = estimate(model, "auto", 1, GEN.max_new_tokens, on_gpu=True)
    with ModelPool(PoolConfig(max_batch_size=1), inventory=gpus, workers=workers) as pool:
        name = load(pool, model)
        [request] = workers.loads
        assert request.memory_budget == need.kv_cache + need.activations
        assert request.batch_size == 1 and request.max_new_tokens == GEN.max_new_tokens
        assert request.env["CUDA_VISIBLE_DEVICES"] == "0" and request.spec.device == "cuda:0"
        assert pool.batch_size(name) == 1


def test_auto_batches_get_room_for_the_largest_batch_when_the_gpu_has_it(tiny_models):
    model = tiny_models["qwen2_vl"]
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus)
    with ModelPool(PoolConfig(), inventory=gpus, workers=workers) as pool:
        load(pool, model)
        [request] = workers.loads
        largest = estimate(model, "auto", 256, GEN.max_new_tokens, on_gpu=True)
        assert request.batch_size is None and request.memory_budget == largest.kv_cache + largest.activations


def test_a_budget_short_of_the_largest_batch_still_gives_the_model_the_batches_it_holds(tiny_models):
    model = tiny_models["qwen2_vl"]
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus)
    one = estimate(model, "auto", 1, GEN.max_new_tokens, on_gpu=True)
    twenty = estimate(model, "auto", 20, GEN.max_new_tokens, on_gpu=True)
    with ModelPool(PoolConfig(vram_budget=twenty.total + one.kv_cache // 2), inventory=gpus, workers=workers) as pool:
        load(pool, model)
        [request] = workers.loads
        assert request.memory_budget == twenty.kv_cache + twenty.activations  # room for 20 images, not for one


def test_a_model_that_evicts_another_fills_the_room_it_leaves(tiny_models):
    # the serve load of issue 22: a budget that holds one model's batches; each load evicted the other and booked
    # room for one image, so every model after the first answered one request at a time
    a, b = tiny_models["qwen2_vl"], tiny_models["llava"]
    twenty = {m: estimate(m, "auto", 20, GEN.max_new_tokens, on_gpu=True) for m in (a, b)}
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus)
    budget = max(t.total for t in twenty.values())
    with ModelPool(PoolConfig(vram_budget=budget), inventory=gpus, workers=workers) as pool:
        names = [load(pool, model) for model in (a, b, a)]
        assert [s.name for s in pool.status()] == [names[2]]  # each load evicted the other model
        for request, model in zip(workers.loads, (a, b, a)):
            one = estimate(model, "auto", 1, GEN.max_new_tokens, on_gpu=True)
            assert request.memory_budget >= twenty[model].kv_cache + twenty[model].activations > one.kv_cache + one.activations


def test_an_accepted_request_is_never_failed_by_keep_alive_expiry(tiny_llava, image):
    pool, _, _ = fake_pool(64 * 2**30, keep_alive=0.05)
    failures, answers = [], 0
    with pool:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                name = load(pool, tiny_llava)
                future = pool.submit_caption(name, [image], ["Describe."], GEN)
            except ModelNotLoaded:
                continue  # refused before it was accepted: the caller loads again
            try:
                future.result(60)
                answers += 1
            except Exception as e:  # noqa: BLE001
                failures.append(e)
            time.sleep(0.06)  # long enough for the model to expire now and then
    assert answers > 5 and failures == []


def test_a_switch_loads_the_new_model_while_the_old_one_is_released_once_the_spare_is_warm(tiny_models, image):
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus)
    workers.stop_delay[str(b)] = 1.5
    with ModelPool(PoolConfig(max_batch_size=1, warm_spare_linger=60), inventory=gpus, workers=workers) as pool:
        first = load(pool, a)
        caption(pool, first, image)
        second, _ = pool.switch(first, ModelSpec(str(b), device="cuda"))  # cold spare: one after the other
        caption(pool, second, image)
        assert pool.wait_for_spare(60) and workers.warm_for() is not None
        assert_switch_overlaps(pool, workers, second, b, a, image)


def test_with_prewarm_the_first_switch_overlaps_too(tiny_models, image):
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus)
    workers.stop_delay[str(a)] = 1.5
    with ModelPool(PoolConfig(max_batch_size=1, warm_spare_linger=60, prewarm=[str(b)]), inventory=gpus,
                   workers=workers) as pool:
        first = load(pool, a)
        caption(pool, first, image)
        assert pool.wait_for_spare(60) and workers.warm_for() is not None  # warm for b before any switch
        assert_switch_overlaps(pool, workers, first, a, b, image)


def test_unload_all_leaves_no_worker_and_nothing_on_the_gpu_within_a_second_spare_included(tiny_models, image):
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus, spare_bytes=500 * 2**20)  # a warm spare's context and pinned pages
    with ModelPool(PoolConfig(max_batch_size=1, warm_spare_linger=60, prewarm=[str(b)]), inventory=gpus,
                   workers=workers) as pool:
        name = load(pool, a)
        caption(pool, name, image)
        assert pool.wait_for_spare(60)
        spare = pool.spare_status()
        assert spare is not None and spare.gpus == (0,) and gpus.process_memory(0)[spare.pid] == 500 * 2**20
        model_pid = pool.status()[0].pid
        started = time.monotonic()
        models, spare_release = pool.unload_all()
        took = time.monotonic() - started
        assert list(models) == [name] and models[name].verified and spare_release.verified
        assert took < 1.0 and gpus.memory(0).used == 0 and gpus.process_memory(0) == {}
        assert process_gone(model_pid, within=0.1) and process_gone(spare.pid, within=0.1)
        time.sleep(0.5)  # no spare forked back, and no warm-up, while nothing is asked for
        assert pool.spare_status() is None and gpus.memory(0).used == 0 and pool.status() == []
        assert caption(pool, load(pool, b), image)  # the next load brings the spare back
        assert pool.wait_for_spare(60) and pool.spare_status() is not None


def test_status_says_what_a_model_holds_on_its_gpu_and_asleep_on_the_host(tiny_models, image):
    pool, gpus, workers = fake_pool(8 * GIB)
    with pool:
        name = load(pool, tiny_models["qwen2_vl"])
        awake = pool.status()[0]
        assert awake.device_bytes == workers.held_bytes and awake.host_bytes == 0
        pool.sleep(name)
        asleep = pool.status()[0]
        assert asleep.state == "sleeping" and asleep.host_bytes > 0  # its weights, in pinned host memory
        assert caption(pool, name, image)
        assert pool.status()[0].host_bytes == 0


def test_a_model_to_prewarm_that_does_not_exist_fails_at_once(tmp_path):
    with pytest.raises(ValueError, match="nothing: no such folder"):
        ModelPool(PoolConfig(prewarm=[str(tmp_path / "nothing")]))


def test_a_slow_release_blocks_neither_status_nor_requests_to_a_loaded_model(tiny_models, image):
    a, b = tiny_models["llava"], tiny_models["qwen2_vl"]
    pool, _, _ = fake_pool(64 * 2**30, unload_grace=3.0)
    with pool:
        first, second = load(pool, a), load(pool, b)
        caption(pool, first, image)
        stuck = next(s.pid for s in pool.status() if s.name == second)
        os.kill(stuck, signal.SIGSTOP)  # it will ignore the exit request: killed after unload_grace
        releasing = pool.unload_async(second)
        started = time.monotonic()
        assert [s.name for s in pool.status()] == [first]
        assert caption(pool, first, image)
        assert time.monotonic() - started < 2.0 and not releasing.done()
        assert releasing.result(30).process_gone and process_gone(stuck)


def test_concurrent_callers_of_three_models_under_a_budget_for_two(tiny_models, image):
    run_callers(tiny_models, image, threads=16, requests=4)


@pytest.mark.stress
def test_sixteen_threads_times_fifty_requests_over_three_models_under_a_budget_for_two(tiny_models, image):
    run_callers(tiny_models, image, threads=16, requests=50)


def run_callers(tiny_models, image, threads: int, requests: int) -> None:
    """Every answer equals the model's answer alone; a caller whose model was loaded never waits for another
    model's (slow) release; no worker is left at the end."""
    models = [tiny_models[arch] for arch in ("llava", "qwen2_vl", "idefics3")]
    charges = sorted(charge(m) for m in models)
    pool, gpus, workers = fake_pool(charges[1] + charges[2] + 1, unload_grace=5.0)
    for model in models:
        workers.stop_delay[str(model)] = 3.0  # every release is slow
    with pool:
        expected = {}
        for model in models:
            name = load(pool, model)
            expected[name] = caption(pool, name, image)
        lock = threading.Lock()
        wrong, slow_when_loaded = [], []

        def caller(number: int) -> None:
            for request in range(requests):
                model = models[(number + request) % 3]
                while True:
                    name = load(pool, model)
                    started = time.monotonic()
                    try:
                        answer = caption(pool, name, image)
                    except ModelNotLoaded:
                        continue  # evicted between load and request: not accepted, so load again
                    waited = time.monotonic() - started
                    break
                with lock:
                    if answer != expected[name]:
                        wrong.append((name, answer))
                    if waited > 2.5:  # a release takes 3 s: an answer this slow waited for one
                        slow_when_loaded.append((name, round(waited, 2)))

        with ThreadPoolExecutor(threads) as callers:
            list(callers.map(caller, range(threads)))
        pids = {e.pid for e in workers.events if e.what == "take"}
    assert wrong == [] and slow_when_loaded == []
    assert all(process_gone(pid) for pid in pids)
    assert gpus.process_memory(0) == {}
