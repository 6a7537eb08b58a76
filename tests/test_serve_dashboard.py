"""The dashboard in headless Chromium (Debian's, through Playwright): the served models appear, its load and unload
buttons change /api/ps, the memory chart and the request list fill in, and a screenshot is kept as an artifact."""
import os
import shutil
import signal
from pathlib import Path

import httpx

from vlmux.testing.server import served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "dash-key"


def ps(url: str) -> list[dict]:
    return httpx.get(url + "/api/ps", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()["models"]


def test_the_dashboard_loads_and_unloads_models_from_its_buttons(tiny_llava, tiny_qwen, tmp_path):
    assert CHROMIUM, "chromium is needed for the dashboard test (install.sh installs it)"
    from playwright.sync_api import expect, sync_playwright

    with served("--model", f"llava={tiny_llava}", "--model", f"qwen={tiny_qwen}", "--device", "cpu",
                "--api-key", KEY) as (_, url), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000},
                                    http_credentials={"username": "vlmux", "password": KEY})
            page.goto(url + "/")
            for name in ("llava", "qwen"):
                expect(page.locator(f'tr[data-model="{name}"] .state')).to_have_text("unloaded", timeout=15_000)
            page.click('tr[data-model="llava"] button[data-action="load"]')
            expect(page.locator('tr[data-model="llava"] .state')).to_have_text("ready", timeout=60_000)
            assert [(m["name"], m["state"]) for m in ps(url)] == [("llava", "ready")]
            answer = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                json={"model": "llava", "messages": [{"role": "user", "content": "Hello"}],
                                      "max_tokens": 4})
            assert answer.status_code == 200
            page.click('tr[data-model="qwen"] button[data-action="load"]')
            expect(page.locator('tr[data-model="qwen"] .state')).to_have_text("ready", timeout=60_000)
            expect(page.locator("#requests tbody tr")).to_have_count(1, timeout=10_000)
            expect(page.locator("#chart svg polyline")).to_have_count(1, timeout=10_000)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            if os.environ.get("VLMUX_DASHBOARD_PNG"):  # refresh the docs' picture: VLMUX_DASHBOARD_PNG=docs/dashboard.png
                shutil.copy(shot, Path(os.environ["VLMUX_DASHBOARD_PNG"]))
            page.click('tr[data-model="llava"] button[data-action="unload"]')
            expect(page.locator('tr[data-model="llava"] .state')).to_have_text("unloaded", timeout=60_000)
            assert [(m["name"], m["state"]) for m in ps(url)] == [("qwen", "ready")]
            assert page.locator("#chart svg .mark").count() >= 3  # two loads and an unload marked
            assert not page.locator("#error").inner_text()
            # a worker killed: marked on the chart, and the request it failed listed with its status
            pid = next(m["pid"] for m in ps(url) if m["name"] == "qwen")
            os.kill(pid, signal.SIGKILL)
            expect(page.locator("#chart svg .mark title", has_text="qwen worker exit")).to_have_count(1, timeout=15_000)
            refused = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                 json={"model": "qwen", "messages": [{"role": "user", "content": "Hi"}], "stop": 5})
            assert refused.status_code == 400
            expect(page.locator("#requests tbody tr", has_text="400")).to_have_count(1, timeout=10_000)
            artifacts = Path(os.environ.get("VLMUX_ARTIFACTS", tmp_path))  # CI keeps this folder
            artifacts.mkdir(parents=True, exist_ok=True)
            killed = artifacts / "dashboard-after-worker-kill.png"
            page.screenshot(path=str(killed), full_page=True)
            assert killed.stat().st_size > 20_000
        finally:
            browser.close()


def test_the_dashboard_needs_the_key_too(tiny_llava):
    with served("--model", f"llava={tiny_llava}", "--device", "cpu", "--api-key", KEY) as (_, url):
        for path in ("/", "/api/dashboard"):
            refused = httpx.get(url + path)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == ('Basic realm="vlmux"' if path == "/" else "Bearer")
            assert httpx.get(url + path, auth=("anyone", KEY)).status_code == 200
            assert httpx.get(url + path, auth=("anyone", "wrong")).status_code == 401
