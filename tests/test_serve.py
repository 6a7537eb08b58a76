"""`vlmux serve` as a child process on loopback with two tiny models, driven by the official openai client and the
management API: images as data: URLs and from a loopback HTTP server, streamed and whole answers, errors with their
status codes, keep-alive, loads and unloads that /api/ps and /metrics follow, and no worker left after an unload."""
import base64
import http.server
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from vlmux.serve.service import exit_reason
from vlmux.testing.processes import process_gone
from vlmux.testing.server import served
from vlmux.testing.workers import wait_until

KEY = "test-key-1234"


@pytest.fixture(scope="module")
def server(tiny_llava, tiny_qwen, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with served("--model", f"llava={tiny_llava}", "--model", f"qwen={tiny_qwen}", "--device", "cpu", "--api-key", KEY,
                "--allow-remote-images", "--allow-private-images", "--max-tokens", "12", log=str(log)) as (process, url):
        yield process, url, log


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0)


def api(server, method: str, path: str, body: dict | None = None, key: str = KEY) -> httpx.Response:
    return httpx.request(method, server[1] + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def png(colour: str, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def ask(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "system", "content": "You describe pictures."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def streamed(client, model: str, messages, **options) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **options))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_both_models_answer_images_whole_and_streamed_with_usage(client):
    for model in ("llava", "qwen"):
        messages = ask(data_url(png("red")))
        first = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
        again = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
        text, chunks = streamed(client, model, messages, max_tokens=8)
        assert first.model == model and first.choices[0].message.role == "assistant"
        assert first.choices[0].message.content and first.choices[0].message.content == again.choices[0].message.content
        assert text == first.choices[0].message.content  # greedy: the stream says the same
        assert first.usage.prompt_tokens > 10 and 1 <= first.usage.completion_tokens <= 8
        assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
        assert first.choices[0].finish_reason == ("length" if first.usage.completion_tokens == 8 else "stop")
        assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == first.choices[0].finish_reason
    long_text, long_chunks = streamed(client, "qwen", ask(data_url(png("red"))), max_tokens=24)
    pieces = [c.choices[0].delta.content for c in long_chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # the text as the model generates it, not in one piece at the end
    stop = long_text[len(long_text) // 2 : len(long_text) // 2 + 2]
    cut = client.chat.completions.create(model="qwen", messages=ask(data_url(png("red"))), max_tokens=24, stop=[stop])
    cut_text, cut_chunks = streamed(client, "qwen", ask(data_url(png("red"))), max_tokens=24, stop=[stop])
    assert cut_text == cut.choices[0].message.content == long_text[: long_text.index(stop)]
    assert [c.choices[0].finish_reason for c in cut_chunks if c.choices][-1] == "stop"
    other = client.chat.completions.create(model="llava", messages=ask(data_url(png("blue", (64, 30)))), max_tokens=8)
    assert other.choices[0].message.content  # another picture, another request


def test_an_image_from_a_loopback_http_server_answers_like_the_same_image_inline(client, tmp_path):
    image = png("green")
    (tmp_path / "green.png").write_bytes(image)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        remote = client.chat.completions.create(
            model="qwen", messages=ask(f"http://127.0.0.1:{httpd.server_address[1]}/green.png"), max_tokens=8)
        inline = client.chat.completions.create(model="qwen", messages=ask(data_url(image)), max_tokens=8)
        assert remote.choices[0].message.content == inline.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            client.chat.completions.create(model="qwen", messages=ask(
                f"http://127.0.0.1:{httpd.server_address[1]}/missing.png"), max_tokens=8)
    finally:
        httpd.shutdown()


def test_errors_have_openai_bodies_and_the_right_status(server, client):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=ask(data_url(png("red"))))
    assert "no-such-model" in unknown.value.message and unknown.value.body["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="llava", messages=ask(data_url(png("red"))))
    assert httpx.get(server[1] + "/api/ps").status_code == 401 and httpx.get(server[1] + "/metrics").status_code == 401
    assert httpx.get(server[1] + "/health").json() == {"status": "ok"}
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="llava", messages=ask(data_url(png("red"))), max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="base64"):
        client.chat.completions.create(model="llava", messages=ask("data:image/png;base64,@@@"))
    with pytest.raises(openai.BadRequestError, match="could not be read"):
        client.chat.completions.create(model="llava", messages=ask(data_url(b"not an image at all")))
    with pytest.raises(openai.BadRequestError, match="--allow-local-images"):
        client.chat.completions.create(model="llava", messages=ask("/etc/passwd"))
    with pytest.raises(openai.APIStatusError) as huge:  # 48 MP, over the 40 MP default; tiny as a PNG
        client.chat.completions.create(model="llava", messages=ask(data_url(png("white", (8000, 6000)))))
    assert huge.value.status_code == 413 and "pixels" in huge.value.message
    too_big = httpx.post(server[1] + "/v1/chat/completions", content=b"x" * (33 * 2**20),
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    not_json = httpx.post(server[1] + "/v1/chat/completions", content=b"{", headers={"Authorization": f"Bearer {KEY}"})
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"


def test_ps_and_metrics_follow_loads_and_unloads_and_no_worker_is_left(server, tiny_llava):
    api(server, "POST", "/api/unload", {})
    assert api(server, "GET", "/api/ps").json()["models"] == []
    before = api(server, "GET", "/metrics").text
    loads, unloads = _value(before, LOADS), _value(before, UNLOADS)
    env = {**os.environ, "VLMUX_URL": server[1], "VLMUX_API_KEY": KEY}
    loaded = subprocess.run([sys.executable, "-m", "vlmux.cli", "load", "llava"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert loaded.returncode == 0 and "llava loaded in" in loaded.stdout, loaded.stderr
    model = api(server, "GET", "/api/ps").json()["models"][0]
    assert (model["name"], model["model"], model["state"]) == ("llava", str(tiny_llava), "ready")
    assert model["pid"] > 0 and model["host_bytes"] > 0 and model["expires_at"] > time.time()
    metrics = api(server, "GET", "/metrics").text
    assert 'vlmux_model_state{model="llava",state="ready"} 1.0' in metrics
    assert _value(metrics, LOADS) == loads + 1
    # a CPU worker's one measure is its private host memory: published as such, never as VRAM, and the same
    # figure its release line reports
    assert _value(metrics, 'vlmux_model_host_bytes{model="llava"}') > 0
    assert 'vlmux_model_vram_bytes{model="llava"}' not in metrics
    listed = subprocess.run([sys.executable, "-m", "vlmux.cli", "ps"], capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and "llava" in listed.stdout and "ready" in listed.stdout
    assert " MiB host" in listed.stdout, listed.stdout
    unloaded = subprocess.run([sys.executable, "-m", "vlmux.cli", "unload", "llava"], capture_output=True, text=True,
                              env=env, timeout=120)
    assert unloaded.returncode == 0 and f"CPU worker {model['pid']} exited" in unloaded.stdout, unloaded.stdout
    returned = float(re.search(r"its (\d+) MiB of host memory returned", unloaded.stdout).group(1))
    assert abs(returned - model["host_bytes"] / 2**20) <= max(5, 0.1 * returned), (returned, model["host_bytes"])
    assert process_gone(model["pid"], within=0.1)
    assert api(server, "GET", "/api/ps").json()["models"] == []
    metrics = api(server, "GET", "/metrics").text
    assert 'vlmux_model_state{model="llava",state="ready"} 0.0' in metrics
    assert (_value(metrics, LOADS), _value(metrics, UNLOADS)) == (loads + 1, unloads + 1)
    again = api(server, "POST", "/api/unload", {"model": "llava"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "model_not_loaded"


def test_keep_alive_zero_unloads_after_the_answer_and_a_stream_announces_the_load(server, client):
    api(server, "POST", "/api/unload", {})
    text, chunks = streamed(client, "qwen", ask(data_url(png("red"))), max_tokens=4)
    assert chunks[0].model_extra["vlmux"] == {"status": "loading", "model": "qwen"} and text
    answer = client.chat.completions.create(model="qwen", messages=ask(data_url(png("red"))), max_tokens=4,
                                            extra_body={"keep_alive": 0})
    assert answer.choices[0].message.content == text
    assert wait_until(lambda: api(server, "GET", "/api/ps").json()["models"] == [], within=10)
    api(server, "POST", "/api/load", {"model": "llava", "keep_alive": -1})
    assert api(server, "GET", "/api/ps").json()["models"][0]["keep_alive"] is None  # -1: never expires


def test_a_worker_killed_mid_request_gives_a_clear_error_and_the_next_request_is_answered(server, client):
    api(server, "POST", "/api/load", {"model": "llava"})
    ps = api(server, "GET", "/api/ps").json()["models"]
    pid, answered = next((m["pid"], m["requests"]) for m in ps if m["name"] == "llava")
    outcome = {}

    def long_request():
        try:
            outcome["answer"] = client.chat.completions.create(model="llava", messages=ask(data_url(png("red"))),
                                                               max_tokens=900)
        except openai.APIStatusError as e:
            outcome["error"] = e

    thread = threading.Thread(target=long_request)
    thread.start()
    assert wait_until(lambda: any(m["name"] == "llava" and m["in_flight"] == 1
                                  for m in api(server, "GET", "/api/ps").json()["models"]))
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert outcome["error"].status_code == 500 and outcome["error"].body["code"] == "worker_died"
    assert "reloads the model" in outcome["error"].message
    after = client.chat.completions.create(model="llava", messages=ask(data_url(png("red"))), max_tokens=4)
    assert after.choices[0].message.content and server[0].poll() is None
    # the exit is in the log, counted by reason, marked on the chart; the new worker's count goes on from the old
    assert f"llava's worker ended: worker {pid} was killed by SIGKILL" in server[2].read_text()
    metrics = api(server, "GET", "/metrics").text
    assert _value(metrics, 'vlmux_worker_exits_total{model="llava",reason="SIGKILL"}') == 1
    dashboard = api(server, "GET", "/api/dashboard").json()
    assert any(e["model"] == "llava" and e["event"] == "worker exit" for e in dashboard["events"])
    assert "llava worker exit" in dashboard["chart"]
    now = next(m["requests"] for m in dashboard["models"] if m["name"] == "llava")
    assert now == answered + 1, (answered, now)  # the killed request failed; the one after it answered


def test_refused_requests_are_counted_by_status_and_listed(server):
    def count(series: str) -> float:
        metrics = api(server, "GET", "/metrics").text
        return _value(metrics, series) if series in metrics else 0.0

    bad, unknown = 'vlmux_requests_total{model="llava",status="400"}', 'vlmux_requests_total{model="-",status="404"}'
    before = count(bad), count(unknown)
    assert api(server, "POST", "/v1/chat/completions", {"model": "llava", "messages": ask("x"), "stop": 5}).status_code == 400
    assert api(server, "POST", "/v1/chat/completions", {"model": "nope" * 50, "messages": ask("x")}).status_code == 404
    assert (count(bad), count(unknown)) == (before[0] + 1, before[1] + 1)
    listed = api(server, "GET", "/api/dashboard").json()["requests"]
    assert [(r["model"], r["status"]) for r in listed[:2]] == [("-", 404), ("llava", 400)]


LOADS, UNLOADS = 'vlmux_loads_total{model="llava"}', 'vlmux_unloads_total{model="llava"}'


def _value(metrics: str, series: str) -> float:
    """A series' value; 0 for a counter not yet shown (a model never loaded)."""
    return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(series)), 0.0)


def test_sleep_keeps_the_worker_and_the_next_request_wakes_it_with_the_same_answer(server, client):
    api(server, "POST", "/api/unload", {})
    messages = ask(data_url(png("green")))
    awake = client.chat.completions.create(model="llava", messages=messages, max_tokens=6).choices[0].message.content
    pid = api(server, "GET", "/api/ps").json()["models"][0]["pid"]
    asleep = api(server, "POST", "/api/sleep", {"model": "llava"})
    assert asleep.status_code == 200, asleep.text
    [model] = [m for m in asleep.json()["models"] if m["name"] == "llava"]
    assert (model["state"], model["pid"]) == ("sleeping", pid) and model["host_bytes"] > 0
    woken = client.chat.completions.create(model="llava", messages=messages, max_tokens=6).choices[0].message.content
    assert woken == awake
    [model] = api(server, "GET", "/api/ps").json()["models"]
    assert (model["state"], model["pid"]) == ("ready", pid)  # woken in the same worker, not loaded again


def test_the_favicon_is_served_without_the_key_and_is_an_icon(server):
    answer = httpx.get(server[1] + "/favicon.ico", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/x-icon"
    assert Image.open(io.BytesIO(answer.content)).format == "ICO"


@pytest.mark.parametrize("text, reason", [
    ("worker 7 was killed by SIGKILL (the kernel's out-of-memory killer sends SIGKILL: check host RAM)", "SIGKILL"),
    ("worker 7 exited with code 3", "exit_3"), ("worker 7 stopped answering for 30 s and was killed", "hang"),
    ("worker 7 took longer than 60 s and was killed", "timeout"),
    ("worker 7 ended; how is unknown (the fork server that started it is gone)", "unknown")])
def test_a_worker_exit_is_labelled_by_a_short_reason(text, reason):
    assert exit_reason(text) == reason
