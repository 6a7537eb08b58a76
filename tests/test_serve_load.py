"""Many concurrent requests through the server over three tiny models on a fake GPU whose budget holds two: every
answer is the model's own (the one a lone request gets), none is lost, a full queue answers 429, and no worker is
left after the unload. The pool's scheduler does the eviction; the server only routes."""
import asyncio
import os
import subprocess
import sys
import time

import httpx
import pytest

from vlmux.testing.load import PROMPTS, drive, fake_gpu_server, mixed_requests, picture
from vlmux.testing.fakes import FakeGpus, FakeGpuWorkers
from vlmux.testing.load import chat_body as body
from vlmux.testing.processes import process_gone


@pytest.fixture()
def fake_server(tiny_models):
    models = {"a": tiny_models["llava"], "b": tiny_models["qwen2_vl"], "c": tiny_models["idefics3"]}
    with fake_gpu_server(models) as served:
        yield served


def lone_answers(url: str, image: str) -> dict[tuple[str, str], str]:
    """Each (model, prompt) asked alone: the answer every copy of it must get under load."""
    with httpx.Client(timeout=300) as client:
        return {(m, p): client.post(url + "/v1/chat/completions", json=body(m, p, image)).json()["choices"][0]
                ["message"]["content"] for m in "abc" for p in PROMPTS}


def unload_all(url: str, gpus, workers) -> None:
    """POST /api/unload {}: every model and the spare worker stopped, their memory verified back."""
    pids = {e.pid for e in workers.events if e.what == "loaded"}
    with httpx.Client(timeout=300) as client:
        spare = client.get(url + "/api/ps").json()["spare"]
        answer = client.post(url + "/api/unload", json={}).json()
        unloaded = answer["unloaded"]
        assert unloaded and all(u["verified"] and u["process_gone"] for u in unloaded)
        assert answer["spare"]["process_gone"] and client.get(url + "/api/ps").json()["spare"] is None
        assert client.get(url + "/api/ps").json()["models"] == []
    assert all(process_gone(pid) for pid in pids | {spare["pid"]}) and gpus.process_memory(0) == {}


async def _send(client: httpx.AsyncClient, url: str, request: dict) -> httpx.Response:
    return await client.post(url + "/v1/chat/completions", json=request, timeout=300)


def run_burst(url: str, requests: list[dict], expected: dict, gpus: FakeGpus, workers: FakeGpuWorkers) -> None:
    async def burst():
        # no kept-alive connections: one the server times out just as it is reused would fail a request
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=400, max_keepalive_connections=0)) as client:
            first = await asyncio.gather(*(_send(client, url, r) for r in requests))
            refused = [r for r, answer in zip(requests, first) if answer.status_code == 429]
            answered = [(r, a) for r, a in zip(requests, first) if a.status_code != 429]
            gate = asyncio.Semaphore(50)  # the refused ones again, within the queue

            async def again(request):
                async with gate:
                    return await _send(client, url, request)

            answered += list(zip(refused, await asyncio.gather(*(again(r) for r in refused))))
            return first, answered, (await client.get(url + "/api/ps")).json()

    first, answered, ps = asyncio.run(burst())
    full = [a for a in first if a.status_code == 429]
    assert full, "a burst three times the queue must be answered 429 in part"
    assert all(a.json()["error"]["code"] == "queue_full" and a.headers["retry-after"] == "1" for a in full)
    assert len(answered) == len(requests)
    for request, answer in answered:
        assert answer.status_code == 200, answer.text
        key = (request["model"], request["messages"][0]["content"][1]["text"])
        assert answer.json()["choices"][0]["message"]["content"] == expected[key], key
        assert answer.json()["model"] == request["model"]
    loaded = [m["name"] for m in ps["models"]]
    assert len(loaded) <= 2 and ps["queue"] == 0
    assert sum(1 for e in workers.events if e.what == "loaded") > 3  # models were evicted and loaded again


def test_300_concurrent_requests_over_three_models_on_a_budget_for_two(fake_server):
    url, gpus, workers = fake_server
    image = picture("orange")
    expected = lone_answers(url, image)
    assert len(set(expected.values())) >= 10  # the answers tell models and prompts apart
    requests = [body("abc"[i % 3], PROMPTS[i // 3 % len(PROMPTS)], image) for i in range(300)]
    run_burst(url, requests, expected, gpus, workers)
    unload_all(url, gpus, workers)


@pytest.mark.stress
def test_1200_requests_in_bursts_stay_right(fake_server):
    url, gpus, workers = fake_server
    image = picture("purple")
    expected = lone_answers(url, image)
    for burst in range(4):
        requests = [body("abc"[(i * 7 + burst) % 3], PROMPTS[i % len(PROMPTS)], image) for i in range(300)]
        run_burst(url, requests, expected, gpus, workers)


@pytest.mark.stress
def test_2000_requests_at_concurrency_64_are_all_answered_right_and_leave_no_worker(fake_server):
    url, gpus, workers = fake_server
    image = picture("teal")
    expected = lone_answers(url, image)
    result = drive(url, mixed_requests(2000, list("abc"), image, seed=22), concurrency=64)
    assert result.statuses == {200: 2000}, result.summary()
    for request, text in result.answers:
        assert text == expected[request["model"], request["messages"][0]["content"][1]["text"]]
    assert sum(1 for e in workers.events if e.what == "loaded") > 3  # the budget made models take turns
    unload_all(url, gpus, workers)


def test_a_model_waiting_for_a_busy_ones_memory_goes_before_that_models_later_requests(tiny_models):
    """A GPU that holds one model: while `a` answers a stream that never pauses, a request for `b` is answered,
    before the stream ends (`a`'s new requests wait their turn) and long before the pool's wait for room runs out."""
    models = {"a": tiny_models["qwen2_vl"], "b": tiny_models["llava"]}
    image = picture("red")

    async def run(url: str) -> tuple[float, int, int]:
        async with httpx.AsyncClient(timeout=300) as client:
            assert (await _send(client, url, body("a", "Describe it.", image))).status_code == 200
            b_done = asyncio.Event()
            a_after_b: list[int] = []

            async def stream_to_a(delay: float) -> None:  # callers of `a`, each asking again at once, until b is
                await asyncio.sleep(delay)  # answered; started apart, so some always wait while others are answered
                while not b_done.is_set():
                    response = await _send(client, url, body("a", "Describe it.", image))
                    if b_done.is_set():
                        a_after_b.append(response.status_code)

            streams = [asyncio.create_task(stream_to_a(i * 0.05)) for i in range(8)]
            await asyncio.sleep(1.0)
            started = asyncio.get_running_loop().time()
            answer = await asyncio.wait_for(_send(client, url, body("b", "Describe it.", image)), 50)
            waited = asyncio.get_running_loop().time() - started
            b_done.set()
            await asyncio.gather(*streams)
            return waited, answer.status_code, len(a_after_b)

    with fake_gpu_server(models, holds=1) as (url, gpus, workers):
        waited, status, a_finished_later = asyncio.run(run(url))
        unload_all(url, gpus, workers)
    assert status == 200 and a_finished_later == 8  # the stream to a was still running when b answered
    print(f"\nb answered after {waited:.1f} s while a's stream went on")


def test_a_busy_models_new_requests_are_answered_during_its_minimum_residency_while_a_load_waits(tiny_models):
    """A GPU that holds one model, --min-residency 3: while `a` answers a stream that never pauses, `b` is asked for
    (its load waits for `a`'s memory) and then `a` again: that request is answered by `a` within its residency,
    before `b`; `b` follows once the residency is over and `a` has drained."""
    models = {"a": tiny_models["qwen2_vl"], "b": tiny_models["llava"]}
    image = picture("red")
    residency = 3.0

    async def run(url: str) -> tuple[tuple[int, float], tuple[int, float]]:
        async with httpx.AsyncClient(timeout=300) as client:
            loop = asyncio.get_running_loop()
            assert (await _send(client, url, body("a", "Describe it.", image))).status_code == 200
            ready = loop.time()  # a's residency began a little earlier, when its load finished
            b_done = asyncio.Event()

            async def answered(request: dict) -> tuple[int, float]:  # its status, and when, from a's load
                response = await _send(client, url, request)
                return response.status_code, loop.time() - ready

            async def stream_to_a(delay: float) -> None:  # as in the test above: a never goes idle until b answers
                await asyncio.sleep(delay)
                while not b_done.is_set():
                    assert (await _send(client, url, body("a", "Describe it.", image))).status_code == 200

            streams = [asyncio.create_task(stream_to_a(i * 0.05)) for i in range(8)]
            await asyncio.sleep(0.3)
            b = asyncio.create_task(answered(body("b", "Describe it.", image)))
            await asyncio.sleep(0.3)  # b's load waits for a's memory now
            probe = await answered(body("a", "Name the shape.", image))
            b_answer = await asyncio.wait_for(b, 50)
            b_done.set()
            await asyncio.gather(*streams)
            return probe, b_answer

    with fake_gpu_server(models, holds=1, min_residency=residency) as (url, gpus, workers):
        (probe_status, probed), (b_status, b_answered) = asyncio.run(run(url))
        unload_all(url, gpus, workers)
    assert probe_status == 200 and b_status == 200
    assert probed < b_answered, (probed, b_answered)  # a's request did not wait behind b's load and answer
    assert probed < residency < b_answered  # a answered in its residency; b's load went after it
    print(f"\na answered {probed:.1f} s after its load, b {b_answered:.1f} s (residency {residency:g} s)")


def test_unload_all_frees_the_gpu_in_a_second_spare_included_and_the_spare_warms_again_only_when_asked(tiny_models):
    """Through `vlmux unload` (no model): after a switch the spare is warm on the GPU and /api/ps lists it; unloading
    all leaves nothing of ours on the GPU and no worker, and nothing comes back until a model is asked for."""
    models = {"a": tiny_models["qwen2_vl"], "b": tiny_models["llava"]}
    image = picture("green")
    with fake_gpu_server(models, holds=1) as (url, gpus, workers), httpx.Client(timeout=300) as client:
        workers.spare_bytes = 300 * 2**20
        for model in "ab":  # a switch: the spare gets warm for both
            assert client.post(url + "/v1/chat/completions", json=body(model, "Describe it.", image)).status_code == 200
        deadline = time.monotonic() + 60
        while (spare := client.get(url + "/api/ps").json()["spare"]) is None or spare["state"] != "warm":
            assert time.monotonic() < deadline, spare
            time.sleep(0.05)
        assert spare["gpus"] == [0] and spare["vram_bytes"] == 300 * 2**20 and len(spare["models"]) == 2
        model_pid = client.get(url + "/api/ps").json()["models"][0]["pid"]
        started = time.monotonic()
        unloaded = subprocess.run([sys.executable, "-m", "vlmux.cli", "unload"], capture_output=True, text=True,
                                  env={**os.environ, "VLMUX_URL": url}, timeout=60)
        assert unloaded.returncode == 0 and "b: release verified" in unloaded.stdout, unloaded.stdout
        assert "spare worker: release verified" in unloaded.stdout, unloaded.stdout
        assert gpus.memory(0).used == 0 and time.monotonic() - started < 1.0 + 2.0  # 2 s: the CLI's own start
        assert process_gone(model_pid, within=0.1) and process_gone(spare["pid"], within=0.1)
        time.sleep(0.5)
        ps = client.get(url + "/api/ps").json()
        assert ps["models"] == [] and ps["spare"] is None and gpus.memory(0).used == 0
        assert client.post(url + "/v1/chat/completions", json=body("a", "Describe it.", image)).status_code == 200
        deadline = time.monotonic() + 60
        while client.get(url + "/api/ps").json()["spare"] is None:  # asked for a model: a spare again
            assert time.monotonic() < deadline
            time.sleep(0.05)
