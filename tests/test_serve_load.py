"""Many concurrent requests through the server over three tiny models on a fake GPU whose budget holds two: every
answer is the model's own (the one a lone request gets), none is lost, a full queue answers 429, and no worker is
left after the unload. The pool's scheduler does the eviction; the server only routes."""
import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from vlmux import ModelPool, PoolConfig
from vlmux.config import GenerationSpec
from vlmux.estimate import estimate
from vlmux.serve.app import create_app
from vlmux.serve.service import Service
from vlmux.serve.settings import ModelEntry, ServeConfig
from vlmux.testing.fakes import FakeGpus, FakeGpuWorkers
from vlmux.testing.processes import process_gone
from vlmux.testing.server import in_thread

PROMPTS = ("Describe it.", "What colour is it?", "Name the shape.", "Is it large?", "Say one word.")


def charge(model) -> int:
    return estimate(model, "auto", 1, GenerationSpec.max_new_tokens, on_gpu=True).total


def picture(colour: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(model: str, prompt: str, image: str) -> dict:
    return {"model": model, "max_tokens": 6, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}]}]}


@pytest.fixture()
def fake_server(tiny_models):
    models = {"a": tiny_models["llava"], "b": tiny_models["qwen2_vl"], "c": tiny_models["idefics3"]}
    charges = sorted(charge(path) for path in models.values())
    budget = charges[1] + charges[2] + 1  # the two largest fit together; all three never do
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus)
    pool = ModelPool(PoolConfig(vram_budget=budget, max_batch_size=1, keep_alive=300), inventory=gpus, workers=workers)
    config = ServeConfig(device="cuda", vram_budget=budget, max_queue=100, keep_alive=300,
                         models=tuple(ModelEntry(name, str(path)) for name, path in models.items()))
    with in_thread(create_app(Service(config, pool, gpus))) as url:
        yield url, gpus, workers


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
    expected = {}
    with httpx.Client(timeout=300) as client:  # each (model, prompt) alone first: the answer every copy must get
        for model in "abc":
            for prompt in PROMPTS:
                answer = client.post(url + "/v1/chat/completions", json=body(model, prompt, image))
                assert answer.status_code == 200, answer.text
                expected[model, prompt] = answer.json()["choices"][0]["message"]["content"]
    assert len(set(expected.values())) >= 10  # the answers tell models and prompts apart
    requests = [body("abc"[i % 3], PROMPTS[i // 3 % len(PROMPTS)], image) for i in range(300)]
    run_burst(url, requests, expected, gpus, workers)
    pids = {e.pid for e in workers.events if e.what == "loaded"}
    with httpx.Client(timeout=300) as client:
        unloaded = client.post(url + "/api/unload", json={}).json()["unloaded"]
        assert unloaded and all(u["verified"] and u["process_gone"] for u in unloaded)
        assert client.get(url + "/api/ps").json()["models"] == []
    assert all(process_gone(pid) for pid in pids) and gpus.process_memory(0) == {}


@pytest.mark.stress
def test_1200_requests_in_bursts_stay_right(fake_server):
    url, gpus, workers = fake_server
    image = picture("purple")
    with httpx.Client(timeout=300) as client:
        expected = {(m, p): client.post(url + "/v1/chat/completions", json=body(m, p, image)).json()["choices"][0]
                    ["message"]["content"] for m in "abc" for p in PROMPTS}
    for burst in range(4):
        requests = [body("abc"[(i * 7 + burst) % 3], PROMPTS[i % len(PROMPTS)], image) for i in range(300)]
        run_burst(url, requests, expected, gpus, workers)
