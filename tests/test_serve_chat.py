"""A chat's caller leaving frees its row in the worker: a stream closed after its first piece, and a whole answer
whose client gave up (its timeout), each stop the worker's generating within a step (the worker's own count of
running rows, from its heartbeats, drops to 0 long before the answer would have ended) and the next request is
answered at once. The app runs in a thread over a real pool of one tiny Qwen2-VL worker on the CPU."""
import json
import time

import httpx
import pytest

from vlmux import ModelPool, PoolConfig
from vlmux.pool import vram
from vlmux.pool.process import WorkerProcess
from vlmux.pool.spawner import Spawner
from vlmux.serve.app import create_app
from vlmux.serve.service import Service
from vlmux.serve.limits import RequestLimits
from vlmux.serve.settings import ModelEntry, ServeConfig
from vlmux.testing.server import in_thread

# Greedy, it runs to the limit: 1-10 s of generating on two CPU cores (about 1 s on an idle one), so the deadlines
# that cut it below are 0.5 s.
CUT = 0.5
LONG = {"model": "qwen", "max_tokens": 900,
        "messages": [{"role": "user", "content": "Say something."}]}


class KeptWorkers(Spawner):
    """The pool's workers, kept where the test can read their own count of running rows."""

    def __init__(self) -> None:
        super().__init__(keep_spare=False)
        self.taken: list[WorkerProcess] = []

    def take(self, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = super().take(env)
        self.taken.append(worker)
        return worker


def serving(tiny_qwen, limits: RequestLimits = RequestLimits()):
    workers = KeptWorkers()
    config = ServeConfig(device="cpu", models=(ModelEntry("qwen", str(tiny_qwen)),), limits=limits)
    pool = ModelPool(PoolConfig(keep_alive=300), workers=workers)
    with in_thread(create_app(Service(config, pool, vram.NVML))) as url:
        yield url, workers


@pytest.fixture(scope="module")
def server(tiny_qwen):
    yield from serving(tiny_qwen)


def until(check, within: float) -> float | None:
    """Seconds until `check()` held, or None if it did not within `within`."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if check():
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def running(workers: KeptWorkers) -> int:
    return workers.taken[-1].running_rows


def test_closing_a_stream_frees_its_row_in_the_worker_and_the_next_request_is_answered(server):
    url, workers = server
    with httpx.Client(base_url=url, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert any('"content": "' in line and '"content": ""' not in line for line in lines)  # its first words
            assert until(lambda: running(workers) == 1, 5) is not None
        freed = until(lambda: running(workers) == 0, 5)
        assert freed is not None and freed < 2  # the whole answer takes about 10 s
        answer = client.post("/v1/chat/completions", json={**LONG, "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        assert 'vlmux_requests_total{model="qwen",status="499"} 1.0' in client.get("/metrics").text


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_row(server):
    url, workers = server
    with httpx.Client(base_url=url, timeout=120) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=LONG, timeout=httpx.Timeout(120, read=CUT))
        freed = until(lambda: running(workers) == 0, 5)
        assert freed is not None and freed < 2
        started = time.monotonic()
        answer = client.post("/v1/chat/completions", json={**LONG, "max_tokens": 4})
        assert answer.status_code == 200 and time.monotonic() - started < 5


def test_logprobs_whole_and_streamed_match_a_direct_forward_pass(server, tiny_qwen):
    """float32 on the CPU: each answer token's log-probability and its step's three likeliest tokens, whole and
    streamed, within 1e-4 of the model's own log-softmax over one forward pass of the prompt and the answer."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmux.backends.families import prompt_form
    from vlmux.backends.transformers import load_processor

    url, _ = server
    ask = {"model": "qwen", "max_tokens": 12, "logprobs": True, "top_logprobs": 3,
           "messages": [{"role": "user", "content": "Say something."}]}
    with httpx.Client(base_url=url, timeout=120) as client:
        whole = client.post("/v1/chat/completions", json=ask).json()["choices"][0]
        events = [line.removeprefix("data: ") for line in client.post(
            "/v1/chat/completions", json={**ask, "stream": True}).text.splitlines() if line.startswith("data: {")]
        plain = client.post("/v1/chat/completions", json={**ask, "logprobs": False, "top_logprobs": 0}).json()
        refused = client.post("/v1/chat/completions", json={**ask, "logprobs": False})
    assert plain["choices"][0]["logprobs"] is None
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"
    tokens = whole["logprobs"]["content"]
    assert len(tokens) >= 10 and "".join(t["token"] for t in tokens).strip() == whole["message"]["content"]
    streamed = [choice["logprobs"]["content"] for choice in (json.loads(e)["choices"][0] for e in events)
                if choice.get("logprobs")]
    assert len(streamed) == 1 and [t["token"] for t in streamed[0]] == [t["token"] for t in tokens]

    processor = load_processor(tiny_qwen, False)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    prompt = prompt_form(tiny_qwen).chat_text(processor, [{"role": "user", "content": [
        {"type": "text", "text": "Say something."}]}])
    ids = processor(text=[prompt], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        answer = model.generate(ids, max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None)
        answer = answer[0, ids.shape[1]:ids.shape[1] + len(tokens)]
        logprobs = torch.log_softmax(model(input_ids=torch.cat([ids[0], answer])[None]).logits[0].float(), -1)
    for step, (token, theirs) in enumerate(zip(answer.tolist(), tokens)):
        ours = logprobs[ids.shape[1] - 1 + step]
        assert theirs["token"] == processor.tokenizer.decode([token])
        assert abs(theirs["logprob"] - ours[token].item()) < 1e-4
        assert theirs["bytes"] == list(theirs["token"].encode())
        values, best = ours.topk(3)
        assert [t["token"] for t in theirs["top_logprobs"]] == [processor.tokenizer.decode([i]) for i in best.tolist()]
        assert max(abs(t["logprob"] - v) for t, v in zip(theirs["top_logprobs"], values.tolist())) < 1e-4
        assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(theirs["top_logprobs"],
                                                                     streamed[0][step]["top_logprobs"])) < 1e-4


def test_a_request_past_the_servers_deadline_gets_504_and_frees_its_row(tiny_qwen):
    """--request-timeout 0.5: a whole answer of 1-10 s gets 504 naming the flag, a stream gets the error event; each
    time the worker's count of running rows drops to 0 at once, and a short request is answered next."""
    for url, workers in serving(tiny_qwen, RequestLimits(max_seconds=CUT)):
        with httpx.Client(base_url=url, timeout=120) as client:
            short = {**LONG, "max_tokens": 2}  # until the model is loaded (a cold load takes longer than the deadline)
            assert until(lambda: client.post("/v1/chat/completions", json=short).status_code == 200, 120) is not None
            started = time.monotonic()
            late = client.post("/v1/chat/completions", json=LONG)
            assert late.status_code == 504 and time.monotonic() - started < 5
            assert late.json()["error"]["code"] == "timeout" and "--request-timeout" in late.json()["error"]["message"]
            assert until(lambda: running(workers) == 0, 1) is not None
            events = client.post("/v1/chat/completions", json={**LONG, "stream": True}).text
            assert '"code": "timeout"' in events and "[DONE]" not in events
            assert until(lambda: running(workers) == 0, 1) is not None
            started = time.monotonic()
            answer = client.post("/v1/chat/completions", json={**LONG, "max_tokens": 4})
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
            assert time.monotonic() - started < 5  # not behind the ~10 s the cut answers would have taken
