import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vlmux.testing.processes import fork_servers


def vlmux(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmux.cli", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})}, cwd=cwd,
    )


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_tiny_then_caption_writes_one_record_per_image(tmp_path, image_dir):
    model = tmp_path / "tiny"
    made = vlmux("make-tiny", str(model), "--arch", "llava")
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out.jsonl"
    run = vlmux("caption", str(image_dir), "-m", str(model), "-o", str(out), "--max-new-tokens", "6", "--no-progress")
    assert run.returncode == 0, run.stderr
    rows = records(out)
    assert sorted(row["file"] for row in rows) == sorted(p.name for p in image_dir.iterdir())
    for row in rows:
        assert set(row) >= {"file", "model", "caption", "error"}
        assert row["model"] == str(model)
        assert isinstance(row["caption"], str) and row["caption"]
        assert row["error"] is None
    assert "5 captioned, 0 errors" in run.stdout


def test_rerun_skips_done_images_and_overwrite_redoes_them(tmp_path, image_dir, tiny_llava):
    out = tmp_path / "out.jsonl"
    args = ["caption", str(image_dir), "-m", str(tiny_llava), "-o", str(out), "--max-new-tokens", "4", "--no-progress"]
    assert vlmux(*args).returncode == 0
    first = records(out)
    rerun = vlmux(*args)
    assert rerun.returncode == 0 and "0 captioned, 0 errors, 5 already done" in rerun.stdout
    assert records(out) == first
    redo = vlmux(*args, "--overwrite")
    assert redo.returncode == 0 and "5 captioned" in redo.stdout
    assert sorted(map(json.dumps, records(out))) == sorted(map(json.dumps, first))  # greedy: the same captions


def test_recursive_folders_give_relative_posix_paths_and_sidecars(tmp_path, tiny_llava):
    from vlmux.tiny import draw_sample_images

    root = tmp_path / "data"
    draw_sample_images(root / "a" / "b", count=2, seed=3)
    run = vlmux("caption", str(root), "-r", "-m", str(tiny_llava), "--sidecar", "txt", "--prefix", "photo, ",
                "--max-new-tokens", "4", "--no-progress")
    assert run.returncode == 0, run.stderr
    sidecars = sorted((root / "a" / "b").glob("*.txt"))
    assert len(sidecars) == 2
    assert all(path.read_text().startswith("photo, ") for path in sidecars)
    missing_r = vlmux("caption", str(root), "-m", str(tiny_llava), "--no-progress")
    assert missing_r.returncode == 2 and "-r" in missing_r.stderr


def test_batched_one_by_one_and_auto_give_the_same_captions(tmp_path, image_dir, tiny_qwen):
    outputs, summaries = {}, {}
    for batch in ("1", "4", "auto", None):  # None: no --batch-size, which is auto
        out = tmp_path / f"b{batch}.jsonl"
        run = vlmux("caption", str(image_dir), "-m", str(tiny_qwen), "-o", str(out),
                    *(["--batch-size", batch] if batch else []), "--max-new-tokens", "8", "--no-progress")
        assert run.returncode == 0, run.stderr
        outputs[batch] = {row["file"]: row["caption"] for row in records(out)}
        summaries[batch] = run.stdout
    assert outputs["1"] == outputs["4"] == outputs["auto"] == outputs[None]
    # 5 images; 4 model batches go in one request: 1 image per batch makes 2 requests, auto (8 on the CPU) one.
    assert "5 batches of up to 1 images in 2 requests" in summaries["1"]
    assert "2 batches of up to 4 images in 1 request" in summaries["4"]
    assert "1 batch of up to 5 images in 1 request" in summaries["auto"]
    assert "1 batch of up to 5 images in 1 request" in summaries[None]


def test_a_bad_batch_size_is_a_usage_error(image_dir, tiny_llava):
    for value in ("0", "-2", "big"):
        run = vlmux("caption", str(image_dir), "-m", str(tiny_llava), "--batch-size", value)
        assert run.returncode == 2 and "--batch-size" in run.stderr and "auto" in run.stderr, (value, run.stderr)


def assert_usage_error(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr
    for needle in needles:
        assert needle in lines[0]


def test_unknown_model_offline_is_a_usage_error(image_dir, tmp_path):
    run = vlmux("caption", str(image_dir), "-m", "nobody/no-such-model", "-o", str(tmp_path / "o.jsonl"))
    assert_usage_error(run, "nobody/no-such-model", "HF_HUB_OFFLINE")


class _NoModelsHub(BaseHTTPRequestHandler):
    """A loopback stand-in for the hub that knows no models, so the online error path is exercised."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_unknown_model_online_is_a_usage_error(image_dir, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoModelsHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf")}
        run = vlmux("caption", str(image_dir), "-m", "nobody/no-such-model", env=env)
    finally:
        server.shutdown()
    assert_usage_error(run, "nobody/no-such-model", "no such model")


def test_folder_without_images_is_a_usage_error(tmp_path, tiny_llava):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no pictures here")
    assert_usage_error(vlmux("caption", str(empty), "-m", str(tiny_llava)), "no images found")


def test_a_usage_error_found_after_the_fork_server_started_leaves_no_server_behind(tmp_path):
    """The server starts before the inputs are scanned; a job with nothing to caption stops it, not its import."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with (tmp_path / "stderr").open("w") as stderr:  # not a pipe: the server would hold it open while it imports
        command = subprocess.Popen([sys.executable, "-m", "vlmux.cli", "caption", str(empty), "-m", "vlmux/shapes"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        assert command.wait(timeout=300) == 2
    assert "no images found" in (tmp_path / "stderr").read_text()
    assert fork_servers(command.pid) == []


def test_missing_path_is_a_usage_error(tmp_path, tiny_llava):
    assert_usage_error(vlmux("caption", str(tmp_path / "nope"), "-m", str(tiny_llava)), "no such file or folder")


def test_output_in_missing_folder_is_a_usage_error(image_dir, tmp_path, tiny_llava):
    out = tmp_path / "missing" / "out.jsonl"
    assert_usage_error(vlmux("caption", str(image_dir), "-m", str(tiny_llava), "-o", str(out)), "does not exist")


def test_model_folder_without_config_is_a_usage_error(image_dir, tmp_path):
    assert_usage_error(vlmux("caption", str(image_dir), "-m", str(tmp_path)), "config.json")


def test_demo_runs_two_models_and_reports_release(tmp_path):
    run = vlmux("demo", "--out", str(tmp_path / "demo"))
    assert run.returncode == 0, run.stderr
    rows = records(tmp_path / "demo" / "captions.jsonl")
    models = {row["model"] for row in rows}
    assert len(models) == 2
    assert all(row["caption"] for row in rows)
    assert run.stdout.count("released") + run.stdout.count("release verified") == 2
    assert not list((tmp_path / "demo").glob(".*.lock"))  # its output's lock goes with the job
    assert "100%" not in run.stderr  # no bar redrawn line by line off a terminal; the summary says it
    assert "('right': the same words)" in run.stdout  # what each shapes caption's verdict means


def test_a_truncated_checkpoint_is_named_with_what_to_do_and_no_traceback(tiny_qwen, image_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen, broken)
    weights = sorted(broken.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:5])
    run = vlmux("caption", str(image_dir), "-m", str(broken), "-o", str(tmp_path / "out.jsonl"), "--device", "cpu",
                "--no-progress")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"{weights} is not a readable safetensors file" in run.stderr and "download or copy it again" in run.stderr
