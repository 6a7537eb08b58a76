"""The review page in headless Chromium (Debian's, through Playwright), over a real `vlmux caption` JSONL of two
tiny models (the bundled shapes captioner and a tiny llava) on the shapes pictures: ten images reviewed by keyboard
(choose, edit, reject, undo, ask a served model for a third column), filters and search, the server killed and restarted with every decision found, and
the export equal to the decisions. Screenshots are kept as artifacts (VLMUX_REVIEW_PNG copies one for the docs)."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from vlmux import shapes
from vlmux.testing.cli import read_jsonl, run_caption
from vlmux.testing.server import served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LISTENING = re.compile(r"listening on (http://\S+) ")


def start_review(output: Path, images: Path, cache: Path, *more: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "vlmux.cli", "review", str(output), "--images", str(images),
                                "--port", "0", *more],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(cache)})
    said = []
    for line in process.stdout:
        said.append(line)
        if found := LISTENING.search(line):
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe drained
            return process, found.group(1)
    raise AssertionError("vlmux review did not start:\n" + "".join(said))


def test_reviewing_by_keyboard_survives_a_killed_server_and_exports_exactly(tiny_llava, tmp_path):
    assert CHROMIUM, "chromium is needed for the review page test (install.sh installs it)"
    from playwright.sync_api import expect, sync_playwright

    images = tmp_path / "images"
    shapes.write_dataset(images, 12, seed=5)
    (images / "zz-broken.png").write_bytes(b"not a picture at all")
    output = tmp_path / "captions.jsonl"
    job = run_caption(str(images), "-m", "vlmux/shapes", "-m", str(tiny_llava), "-o", str(output), "--device", "cpu")
    assert job.returncode == 0, job.stderr
    models = ["vlmux/shapes", str(tiny_llava)]
    captions = {(r["file"], r["model"]): r["caption"] for r in read_jsonl(output)}
    total = 13
    serving = contextlib.ExitStack()
    _, served_url = serving.enter_context(served("--model", "shapes=vlmux/shapes", "--device", "cpu"))  # to ask
    server, url = start_review(output, images, tmp_path / "cache", "--server", served_url)
    expected: dict[str, tuple] = {}  # key -> (action, model, text), as the journal must hold it
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.goto(url + "/")
                position, status = page.locator("#position"), page.locator("#status")
                expect(position).to_have_text(f"1 of {total}")

                def at(n: int) -> str:
                    expect(position).to_have_text(f"{n + 1} of {total}")
                    return page.locator("#key").inner_text()

                def choose(n: int, model: int) -> None:
                    key = at(n)
                    page.keyboard.press(str(model + 1))
                    expected[key] = ("choose", models[model], captions[(key, models[model])])
                    at(n + 1)

                def edit(n: int, text: str) -> None:
                    key = at(n)
                    page.keyboard.press("e")
                    expect(page.locator("#text")).to_be_focused()
                    page.locator("#text").fill(text)
                    page.keyboard.press("Control+Enter")
                    expected[key] = ("edit", models[0], text)
                    at(n + 1)

                def reject(n: int) -> None:
                    key = at(n)
                    page.keyboard.press("x")
                    expected[key] = ("reject", None, None)
                    at(n + 1)

                first = at(0)
                assert page.locator(f'.candidate[data-model="{models[1]}"] mark').count() > 0  # the models disagree
                expect(page.locator("#thumb")).to_have_js_property("complete", True)
                assert page.locator("#thumb").evaluate("img => img.naturalWidth") > 0
                choose(0, 0)
                choose(1, 1)
                reject(2)
                edit(3, "a hand-written caption, with a comma")
                choose(4, 0)
                key = at(5)
                page.keyboard.press("2")
                at(6)
                page.keyboard.press("u")  # back to the image just decided, undecided again
                expect(status).to_have_text("not reviewed")
                assert at(5) == key
                choose(5, 0)
                page.keyboard.press("j")  # image 6 skipped
                reject(7)
                choose(8, 1)
                key = at(9)
                expect(page.locator("#ask-model option")).to_have_count(1)
                page.keyboard.press("a")  # ask the served shapes model: a third column
                asked = page.locator('.candidate[data-model="serve:shapes"] .caption')
                expect(asked).to_have_count(1, timeout=120_000)
                expected[key] = ("choose", "serve:shapes", asked.inner_text())
                assert set(asked.inner_text().split()) <= set(shapes.WORDS)  # the shapes grammar, from the server
                assert httpx.get(url + "/api/ask").json() == {"models": ["shapes"]}
                refused = httpx.post(url + "/api/ask", json={"key": key, "model": "nobody"}, timeout=60)
                assert refused.status_code == 404 and "nobody" in refused.json()["error"]["message"]  # the server's
                page.keyboard.press("3")
                at(10)
                page.keyboard.press("k")
                page.keyboard.press("k")
                assert at(8) in expected
                expect(status).to_have_text(f"chosen: {models[1]}")
                page.keyboard.press("j")
                page.keyboard.press("j")
                edit(10, "another edit")
                assert len(expected) == 10
                expect(page.locator("#progress")).to_contain_text(f"10 / {total} reviewed, 2 rejected")
                page.keyboard.press("k")
                page.keyboard.press("k")
                at(9)  # the image with the asked column, its caption chosen: the docs' picture
                expect(page.locator(".candidate.chosen")).to_have_count(1)
                page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
                if os.environ.get("VLMUX_REVIEW_PNG"):  # refresh the docs' picture: VLMUX_REVIEW_PNG=docs/review.png
                    shutil.copy(tmp_path / "review.png", Path(os.environ["VLMUX_REVIEW_PNG"]))

                page.select_option("#filter", "errors")
                expect(position).to_have_text("1 of 1")
                assert page.locator("#key").inner_text() == "zz-broken.png"
                expect(page.locator(".candidate .error").first).to_be_visible()
                page.select_option("#filter", "unreviewed")
                expect(position).to_have_text(f"1 of {total - 10}")
                page.select_option("#filter", "all")
                page.select_option("#order", "disagreement")
                expect(position).to_have_text(f"1 of {total}")
                view = httpx.get(url + "/api/view", params={"order": "disagreement", "limit": 1}).json()
                assert page.locator("#key").inner_text() == view["items"][0]["key"]
                page.select_option("#order", "file")
                page.keyboard.press("/")
                page.keyboard.type("comma")
                page.keyboard.press("Enter")
                expect(position).to_have_text("1 of 1")  # only the first edit says "comma"
                page.screenshot(path=str(tmp_path / "review-search.png"), full_page=True)

                server.send_signal(signal.SIGKILL)  # no shutdown: only what was synced to disk survives
                server.wait(30)
                server, url = start_review(output, images, tmp_path / "cache")  # without --server: the column stays
                page.goto(url + "/")
                expect(position).to_have_text(f"12 of {total}")  # resumed after the last decision (image 10's edit)
                expect(page.locator("#progress")).to_contain_text(f"10 / {total} reviewed, 2 rejected")
                page.keyboard.press("Home")
                assert at(0) == first
                page.click("#thumb")  # full size on click
                expect(page.locator("#full")).to_have_class("open")
                expect(page.locator("#full img")).to_have_js_property("complete", True)
                assert page.locator("#full img").evaluate("img => img.naturalWidth") >= 64
                page.keyboard.press("Escape")
                expect(page.locator("#full")).not_to_have_class("open")
                for n in range(total):  # every decision shows again, page by page
                    key = at(n)
                    want = expected.get(key)
                    shown = ("not reviewed" if want is None else "rejected" if want[0] == "reject"
                             else f"edited: {want[2]}" if want[0] == "edit" else f"chosen: {want[1]}")
                    expect(status).to_have_text(shown)
                    page.keyboard.press("j")
                assert not page.locator("#error").inner_text()
                alone = httpx.post(url + "/api/ask", json={"key": first, "model": "shapes"})
                assert alone.status_code == 404 and "--server" in alone.json()["error"]["message"]
            finally:
                browser.close()
        items = httpx.get(url + "/api/view", params={"limit": 100}).json()["items"]
        held = {i["key"]: tuple(i["decision"].values()) for i in items if i["decision"]}
        assert held == expected
    finally:
        server.kill()
        server.wait(30)
        serving.close()
    curated = tmp_path / "curated.jsonl"
    exported = subprocess.run([sys.executable, "-m", "vlmux.cli", "review", str(output), "--export", str(curated)],
                              capture_output=True, text=True, timeout=60)
    assert exported.returncode == 0, exported.stderr
    assert {r["file"]: r["caption"] for r in read_jsonl(curated)} == {
        key: text for key, (action, _, text) in expected.items() if action != "reject"}
    assert json.loads(curated.read_text().splitlines()[0])["model"] == "text"
