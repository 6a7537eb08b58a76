import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

import vlmux
from vlmux import ImageError, pipeline
from vlmux.hub import ModelNotFound
from vlmux.testing.processes import process_gone


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)


def test_images_as_paths_bytes_and_pil_give_the_same_captions(tiny_llava, image_dir):
    path = sorted(image_dir.iterdir())[0]
    with pipeline(str(tiny_llava), device="cpu", max_new_tokens=6) as pipe:
        from_path = pipe(path)
        assert pipe(str(path)) == from_path
        assert pipe(path.read_bytes()) == from_path
        assert pipe(Image.open(path)) == from_path
        assert pipe([path, path]) == [from_path, from_path]


def test_a_bad_image_raises_image_error_naming_its_position(tiny_llava, image_dir):
    good = sorted(image_dir.iterdir())[0]
    with pipeline(str(tiny_llava), device="cpu", max_new_tokens=4) as pipe:
        with pytest.raises(ImageError, match="image 1: not an image"):
            pipe([good, b"this is not a picture"])
        assert isinstance(pipe(good), str)  # the pipeline is still usable


def test_chat_answers_with_an_image(tiny_qwen, image_dir):
    def ask(image) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "What is it?"}]}]

    first, second = sorted(image_dir.iterdir())[:2]
    with pipeline(str(tiny_qwen), device="cpu", max_new_tokens=5) as pipe:
        answers = [pipe.chat(ask(first)), pipe.chat(ask(second))]
        assert answers[0] != answers[1]  # the picture is seen: another one gives another answer
        assert answers == [pipe(first, prompt="What is it?"), pipe(second, prompt="What is it?")]
        assert pipe.chat(ask(first)) == answers[0]


def test_closed_pipeline_refuses_work_and_close_is_idempotent(tiny_llava, image_dir):
    pipe = pipeline(str(tiny_llava), device="cpu")
    first = pipe.close()
    assert first is not None and pipe.close() is first
    with pytest.raises(RuntimeError, match="closed"):
        pipe(sorted(image_dir.iterdir())[0])


def test_unknown_model_raises_before_any_worker_starts():
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE"):
        pipeline("nobody/no-such-model")


def test_unknown_option_is_a_type_error(tiny_llava):
    with pytest.raises(TypeError, match="unknown options"):
        pipeline(str(tiny_llava), device="cpu", temprature=0.5)


def test_parent_never_imports_torch(tiny_llava, image_dir):
    image = sorted(image_dir.iterdir())[0]
    run = run_python(f"""
        import sys, vlmux
        with vlmux.pipeline({str(tiny_llava)!r}, device="cpu", max_new_tokens=3) as pipe:
            print(pipe({str(image)!r}))
        assert "torch" not in sys.modules, "the parent imported torch"
        print("clean")
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("clean")


def test_pipeline_left_open_is_cleaned_up_at_exit(tiny_llava):
    start = time.monotonic()
    run = run_python(f"""
        import vlmux
        pipe = vlmux.pipeline({str(tiny_llava)!r}, device="cpu")
        print(pipe.status[0].pid)
    """, timeout=60)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - start < 60
    assert process_gone(int(run.stdout.split()[-1]))


def test_isolation_none_says_what_it_could_not_give_back(tiny_llava, image_dir):
    with pipeline(str(tiny_llava), device="cpu", isolation="none", max_new_tokens=3) as pipe:
        assert pipe.status[0].pid == os.getpid()
        assert isinstance(pipe(sorted(image_dir.iterdir())[0]), str)
    assert "isolation='none'" in pipe.release.note


PUBLIC = {"pipeline", "Pipeline", "ModelPool", "PoolConfig", "ModelSpec", "GenerationSpec", "Release", "ImageError",
          "WorkerDied", "WorkerStartError", "ModelNotLoaded", "PoolClosed", "PoolFull", "ModelLoadError", "RequestFailed"}


def test_public_names():
    """What the README and the errors name comes with `from vlmux import *`, and importing vlmux loads no torch."""
    run = run_python("""
        import sys
        names = {}
        exec("from vlmux import *", names)
        print(sorted(name for name in names if not name.startswith("__")))
        print(sorted(module for module in ("torch", "transformers") if module in sys.modules))
    """, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(sorted(PUBLIC)), "[]"]


def test_relative_paths_resolve_in_the_callers_current_folder(tiny_qwen, image_dir, tmp_path, monkeypatch):
    with pipeline(str(tiny_qwen), device="cpu", max_new_tokens=4) as pipe:  # its worker runs in another folder
        image = sorted(image_dir.iterdir())[0]
        expected = pipe(image)
        (tmp_path / "x.png").write_bytes(image.read_bytes())
        monkeypatch.chdir(tmp_path)
        assert pipe("x.png") == expected
        assert pipe(Path("x.png")) == expected
        messages = [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Hi?"}]}]
        assert pipe.chat(messages) == pipe.chat([{**messages[0], "content": [
            {"type": "image", "image": str(image)}, {"type": "text", "text": "Hi?"}]}])


def test_keep_alive_zero_loads_for_each_call_and_answers_every_one(tiny_llava, image_dir):
    image = sorted(image_dir.iterdir())[0]
    with pipeline(str(tiny_llava), device="cpu", max_new_tokens=3, keep_alive=0, spare_worker=False) as pipe:
        captions = [pipe(image) for _ in range(3)]
        assert len(set(captions)) == 1 and isinstance(captions[0], str)


def test_a_bad_image_fails_alone_and_the_others_captions_come_with_the_error(tiny_llava, image_dir):
    good = sorted(image_dir.iterdir())[0]
    with pipeline(str(tiny_llava), device="cpu", max_new_tokens=4) as pipe:
        alone = pipe(good)
        with pytest.raises(ImageError, match=r"image 1: not an image.*1 of 3 images failed") as failure:
            pipe([good, b"this is not a picture", good])
        assert failure.value.captions == [alone, None, alone]
        assert list(failure.value.errors) == [1]
        assert pipe(bytearray(good.read_bytes())) == alone  # one image, not a list of byte values
        with pytest.raises(ImageError, match="a URL"):
            pipe("https://example.com/cat.png")
        for not_images in (None, {"image": str(good)}):
            with pytest.raises(TypeError, match="give an image"):
                pipe(not_images)
    with pytest.raises(vlmux.PoolClosed, match="closed"):
        pipe(good)


def test_pool_requests_are_checked_before_they_reach_a_worker(tiny_llava, image_dir):
    good = sorted(image_dir.iterdir())[0]
    gen = vlmux.GenerationSpec(max_new_tokens=3)
    with vlmux.ModelPool(vlmux.PoolConfig(spare_worker=False)) as pool:
        name = pool.load(vlmux.ModelSpec(str(tiny_llava), device="cpu"))
        same_prompt = pool.caption(name, [good, good], "Describe it.", gen)  # one prompt for all, not its letters
        assert [r.caption for r in same_prompt] == [r.caption for r in pool.caption(name, [good, good], ["Describe it."] * 2, gen)]
        with pytest.raises(ValueError, match="1 prompts for 2 images"):
            pool.caption(name, [good, good], ["Describe it."], gen)
        with pytest.raises(ValueError, match="non-empty list"):
            pool.chat(name, [], gen)
        with pytest.raises(ValueError, match=r"messages\[0\]"):
            pool.chat(name, [{"content": "hello"}], gen)
        with pytest.raises(TypeError, match="GenerationSpec"):
            pool.chat(name, [{"role": "user", "content": "hello"}], None)
        started = time.monotonic()
        with pytest.raises(ValueError, match="context of 1024 tokens"):
            pool.caption(name, [good], "Describe it.", vlmux.GenerationSpec(max_new_tokens=10**6))
        assert time.monotonic() - started < 1
        assert pool.chat(name, [{"role": "user", "content": "hello"}], gen)  # still serving


def interrupted(script: str) -> tuple[subprocess.CompletedProcess, float, list[int]]:
    """Run `script` in a child Python, SIGINT it 0.5 s after it prints "waiting" (its worker is then stopped mid-
    request by the script itself); returns the run, the seconds from the signal to its exit, and its workers."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    assert line.startswith("waiting"), (line, child.communicate(timeout=60))
    workers = [int(pid) for pid in line.split()[1:]]
    time.sleep(0.5)
    signalled = time.monotonic()
    child.send_signal(signal.SIGINT)
    try:
        stdout, stderr = child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()  # its fork server and workers follow it
        stdout, stderr = child.communicate()
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr), time.monotonic() - signalled, workers


def test_ctrl_c_during_a_load_raises_keyboard_interrupt_at_once_and_exits(tiny_llava):
    run, seconds, workers = interrupted(f"""
        import os, signal, vlmux
        from vlmux.testing.processes import children, fork_servers
        pool = vlmux.ModelPool()
        pool.wait_for_spare()
        spare = children(fork_servers(os.getpid())[0])
        for pid in spare:
            os.kill(pid, signal.SIGSTOP)  # the load it takes never ends by itself
        print("waiting", *spare, flush=True)
        pool.load(vlmux.ModelSpec({str(tiny_llava)!r}, device="cpu"))
    """)
    assert "KeyboardInterrupt" in run.stderr and run.returncode == -signal.SIGINT, run.stderr
    assert seconds < 2, f"{seconds:.1f} s from Ctrl-C to the exit"
    assert workers and all(process_gone(pid, within=1) for pid in workers)


def test_ctrl_c_during_a_caption_kills_the_worker_without_waiting_out_its_grace(tiny_llava, image_dir):
    run, seconds, workers = interrupted(f"""
        import os, signal, vlmux
        with vlmux.pipeline({str(tiny_llava)!r}, device="cpu", unload_grace=20) as pipe:
            pid = pipe.status[0].pid
            os.kill(pid, signal.SIGSTOP)
            print("waiting", pid, flush=True)
            pipe({str(sorted(image_dir.iterdir())[0])!r})
    """)
    assert "KeyboardInterrupt" in run.stderr and run.returncode == -signal.SIGINT, run.stderr
    assert seconds < 2, f"{seconds:.1f} s from Ctrl-C to the exit (unload_grace is 20 s)"
    assert all(process_gone(pid, within=1) for pid in workers)


def test_a_pipeline_dropped_without_close_stops_its_workers(tiny_llava):
    from vlmux.testing.processes import children, fork_servers

    def workers() -> set[int]:
        return {pid for server in fork_servers(os.getpid()) for pid in children(server)}

    before = workers()
    pipe = pipeline(str(tiny_llava), device="cpu")
    started = workers() - before  # the model's, and the spare if it is forked yet
    assert pipe.status[0].pid in started
    del pipe
    gc.collect()
    assert all(process_gone(pid, within=10) for pid in started)


def test_a_forked_child_gets_a_clear_error_and_its_exit_leaves_the_parents_pipeline_alone(tiny_llava, image_dir):
    image = str(sorted(image_dir.iterdir())[0])
    run = run_python(f"""
        import os, sys, vlmux
        pipe = vlmux.pipeline({str(tiny_llava)!r}, device="cpu", max_new_tokens=3)
        worker, first = pipe.status[0].pid, pipe({image!r})
        child = os.fork()
        if child == 0:
            try:
                pipe({image!r})
            except vlmux.PoolClosed as e:
                print("child:", e, flush=True)
            sys.exit(0)  # a normal exit: atexit handlers and finalisers run
        os.waitpid(child, 0)
        assert pipe({image!r}) == first and pipe.status[0].pid == worker, "the child's exit stopped the parent's worker"
        print("parent: served")
    """, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "child: this ModelPool belongs to process" in run.stdout and "create a pool in this process" in run.stdout
    assert "parent: served" in run.stdout, run.stdout


def test_the_callers_logging_settings_reach_the_worker(tiny_llava):
    loaded = f"""
        with vlmux.pipeline({str(tiny_llava)!r}, device="cpu", spare_worker=False):
            pass
    """
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import logging, sys, vlmux
        logging.getLogger("transformers").setLevel(logging.ERROR)  # what transformers.logging.set_verbosity_error() does
        {textwrap.indent(textwrap.dedent(loaded), "        ").strip()}
        print("== info", file=sys.stderr, flush=True)
        logging.getLogger("transformers").setLevel(logging.INFO)
        {textwrap.indent(textwrap.dedent(loaded), "        ").strip()}
        print("== disabled", file=sys.stderr, flush=True)
        logging.disable(logging.CRITICAL)
        {textwrap.indent(textwrap.dedent(loaded), "        ").strip()}
    """)], capture_output=True, text=True, timeout=120, env={**os.environ, "TRANSFORMERS_VERBOSITY": "info"})
    assert run.returncode == 0, run.stderr
    quiet, info, disabled = run.stderr.split("== ")
    assert "loading configuration file" not in quiet, quiet  # the fork server's own verbosity (info) is overruled
    assert "loading configuration file" in info
    assert "loading configuration file" not in disabled


def test_a_worker_death_and_its_reload_are_logged(tiny_llava, image_dir, caplog):
    image = sorted(image_dir.iterdir())[0]
    with pipeline(str(tiny_llava), device="cpu", max_new_tokens=3, spare_worker=False) as pipe:
        worker = pipe.status[0].pid
        with caplog.at_level(logging.INFO, logger="vlmux"):
            os.kill(worker, signal.SIGKILL)
            assert process_gone(worker)
            try:
                pipe(image)
            except vlmux.WorkerDied:  # a request may reach the worker before its death is noticed
                pass
            assert isinstance(pipe(image), str)
    said = [(record.name.split(".")[0], record.levelname, record.getMessage()) for record in caplog.records]
    assert ("vlmux", "WARNING", f"{tiny_llava}: worker {worker} was killed by SIGKILL (the kernel's out-of-memory killer "
            "sends SIGKILL: check host RAM); it is loaded again for its next request") in said, said
