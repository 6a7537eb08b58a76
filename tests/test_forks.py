"""The fork server's start (pool/forks.py, worker/forkserver.py) as a user meets it: run from a folder whose files
shadow the standard library, `vlmux caption` and `vlmux serve` work; a server that cannot start fails the job or
the request at once, quoting its own error once, and nothing hangs."""
import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from vlmux.pool import forks
from vlmux.pool.forks import ForkServer
from vlmux.testing.cli import read_jsonl, run_caption, shapes_job
from vlmux.testing.server import served
from vlmux.tiny import draw_sample_images

SHADOWS = ("random", "queue", "struct", "types", "signal")  # names people give their own scripts
BROKEN = "transformers is broken on purpose"


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory) -> Path:
    """A working folder whose modules would break any process that imported them in place of the standard library."""
    folder = tmp_path_factory.mktemp("shadowed")
    for name in SHADOWS:
        (folder / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    return folder


@pytest.fixture(scope="module")
def broken_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose PYTHONPATH puts a transformers that fails at import first: the parent never imports it,
    the fork server does as it starts."""
    folder = tmp_path_factory.mktemp("broken")
    (folder / "transformers").mkdir()
    (folder / "transformers" / "__init__.py").write_text(f"raise ImportError({BROKEN!r})\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buffer, "PNG")
    return buffer.getvalue()


def chat(url: str, model: str = "shapes") -> httpx.Response:
    image = "data:image/png;base64," + base64.b64encode(png("red")).decode()
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                           {"type": "text", "text": "What is this?"}]}
    return httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": [message], "max_tokens": 4},
                      timeout=120)


def test_caption_with_preparing_processes_runs_from_a_folder_that_shadows_the_standard_library(shadowed):
    draw_sample_images(shadowed / "pics", 16)
    result = run_caption(*shapes_job(Path("pics"), Path("out.jsonl")), "--device", "cpu", cwd=shadowed, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the user's own" not in result.stderr, result.stderr[-3000:]
    records = read_jsonl(shadowed / "out.jsonl")
    assert len(records) == 16 and all(r["caption"] and r["error"] is None for r in records)


def test_serve_answers_from_a_folder_that_shadows_the_standard_library(shadowed, tiny_qwen):
    with served("--model", f"qwen={tiny_qwen}", "--device", "cpu", cwd=shadowed) as (_, url):
        answer = chat(url, "qwen")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]


def test_a_fork_server_that_fails_at_import_fails_the_job_at_once_quoting_its_error_once(broken_env, tmp_path):
    draw_sample_images(tmp_path / "pics", 2)
    start = time.monotonic()
    result = run_caption(str(tmp_path / "pics"), "-m", "vlmux/shapes", "--device", "cpu", "-o",
                         str(tmp_path / "out.jsonl"), env=broken_env, timeout=60)
    assert time.monotonic() - start < 10  # the bound (it hung before); the job takes ~2 s
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("Traceback") == 1, result.stderr  # the server's, printed once; no thread's
    assert "Exception in thread" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert BROKEN in last and "fork server failed as it started" in last, result.stderr


def test_serve_answers_503_quoting_a_fork_server_that_fails_at_import(broken_env, tmp_path):
    log = tmp_path / "serve.log"
    with served("--model", "shapes=vlmux/shapes", "--device", "cpu", env=broken_env, log=str(log)) as (_, url):
        first, second = chat(url), chat(url)
    for answer in (first, second):
        assert answer.status_code == 503, answer.text
        assert BROKEN in answer.json()["error"]["message"]
    assert log.read_text().count("Traceback") == 1, log.read_text()


def test_a_fork_server_that_exits_as_it_starts_fails_the_next_workers_at_once(monkeypatch):
    """Each start imports torch (seconds); one that failed must not be paid again for every worker of a burst of
    loads: the next forks fail at once with the same message."""
    server = ForkServer()
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a server that exits with code 1 as it starts
    with pytest.raises(RuntimeError, match="exited with code 1 as it started") as first:
        server.fork()
    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: pytest.fail("the server was started again"))
    with pytest.raises(RuntimeError) as second:
        server.fork()
    assert str(second.value) == str(first.value)


@pytest.mark.parametrize("given, expected", [
    (None, []), ("", []), (":/opt/lib", ["/opt/lib"]), ("/opt/lib::rel", ["/opt/lib", "{cwd}/rel"]),
])
def test_the_servers_pythonpath_never_names_the_current_folder(monkeypatch, given, expected):
    """An empty PYTHONPATH entry means the current folder to Python (`PYTHONPATH=$PYTHONPATH:/x`); it goes, and a
    relative one is made absolute as the parent reads it."""
    monkeypatch.setattr(forks, "PACKAGE_ROOT", forks.site.getsitepackages()[0])  # an installed vlmux adds nothing
    if given is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", given)
    entries = forks._server_env().get("PYTHONPATH")
    assert (entries.split(os.pathsep) if entries is not None else []) == [e.format(cwd=os.getcwd()) for e in expected]
