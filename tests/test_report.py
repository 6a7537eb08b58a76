import json
import shutil
import subprocess
import sys

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(*args: str, profile) -> subprocess.CompletedProcess:
    assert CHROMIUM, "chromium is needed to look at the report (.ci/run installs it)"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_llava, tiny_qwen):
    from vlmux.tiny import draw_sample_images

    root = tmp_path_factory.mktemp("report")
    draw_sample_images(root / "images", count=6, seed=4)
    html = root / "report.html"
    result = subprocess.run([sys.executable, "-m", "vlmux.cli", "caption", str(root / "images"), "-m", str(tiny_llava),
                             "-m", str(tiny_qwen), "-o", str(root / "out.jsonl"), "--report", str(html), "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"report: {html}" in result.stdout
    return root, html


def test_the_report_json_has_rates_timings_and_each_model_marked(report, tiny_llava, tiny_qwen):
    _, html = report
    data = json.loads(html.with_suffix(".json").read_text())
    assert [m["model"] for m in data["models"]] == [str(tiny_llava), str(tiny_qwen)]
    for model in data["models"]:
        assert model["captioned"] == 6 and model["errors"] == 0
        assert model["images_per_second"] > 0 and model["tokens_per_second"] > 0
        assert model["load_seconds"] > 0 and model["unload_seconds"] > 0 and model["release"]
        assert model["load_timings"]["total"] > 0 and model["load_timings"]["weights"] > 0
        assert 0 < model["input_wait_seconds"] < model["caption_seconds"]  # its one batch waited for its decoding
    # The fork server starts as the job scans its inputs (milliseconds); its imports take seconds, all the first
    # load's to wait for, and the second load finds it ready.
    first, second = data["models"]
    assert 0 < first["server_wait_seconds"] <= first["load_seconds"] and second["server_wait_seconds"] == 0
    events = [(e["model"], e["event"]) for e in data["events"]]
    steps = ["load_start", "loaded", "unload_start", "unloaded"]
    assert events == [(str(tiny_llava), step) for step in steps] + [(str(tiny_qwen), step) for step in steps]
    times = [e["seconds"] for e in data["events"]]
    assert times == sorted(times)
    assert len(data["samples"]) >= 5 and data["memory_source"]


def test_the_report_page_renders_in_headless_chromium(report, tmp_path):
    root, html = report
    dom = chromium("--dump-dom", html.as_uri(), profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "vlmux run report" in dom.stdout and "<polyline" in dom.stdout
    assert dom.stdout.count("<tr>") == 3  # the header and one row per model
    shot = root / "report.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1000,900", html.as_uri(), profile=tmp_path / "profile-shot")
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
