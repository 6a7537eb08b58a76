"""Many concurrent requests through the server over three tiny models on a fake GPU whose budget holds two: every
answer is the model's own (the one a lone request gets), none is lost, a full queue answers 429, and no worker is
left after the unload. The pool's scheduler does the eviction; the server only routes."""
import asyncio

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
    pids = {e.pid for e in workers.events if e.what == "loaded"}
    with httpx.Client(timeout=300) as client:
        unloaded = client.post(url + "/api/unload", json={}).json()["unloaded"]
        assert unloaded and all(u["verified"] and u["process_gone"] for u in unloaded)
        assert client.get(url + "/api/ps").json()["models"] == []
    assert all(process_gone(pid) for pid in pids) and gpus.process_memory(0) == {}


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
