"""`vlmux review` at dataset scale (issue 36): N synthetic images with two models' captions each (JSONL, the records
`vlmux caption` writes) and a journal of decisions on a tenth of them; then, through the real command and its HTTP API:
  open         the command's start until its address is printed (output read, journal replayed, lock taken)
  first_page   from the command's start until the page's HTML and its first /api/view page (50 items) are answered
  next_page    one more /api/view page (offset 50), and a page deep in the set (offset N - 50)
  disagreement the first page ordered by strongest disagreement (scores computed for every image on first use),
               then the same again (cached)
  search       the first page of a text search over every caption, and `unreviewed` with fresh membership
  decide       one decision (written and fsynced) through /api/decide
Medians of --runs; the browser holds one page of 50 items at a time whatever N is.

Usage: python3 bench/review_scale.py [--images 100000] [--runs 3] [--out bench/results/review-DATE-cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, summarise, write_result  # noqa: E402

WORDS = "a small large red green blue purple yellow black white circle square triangle above below beside and".split()
LISTENING = re.compile(r"listening on (http://\S+) ")


def synthetic(folder: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    output = folder / "captions.jsonl"
    with open(output, "w", encoding="utf-8") as out:
        for number in range(count):
            base = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            other = [word if rng.random() < 0.8 else rng.choice(WORDS) for word in base]
            key = f"part{number // 10_000:02d}/image_{number:06d}.jpg"
            for model, words in (("org/model-a", base), ("org/model-b", other)):
                out.write(json.dumps({"file": key, "model": model, "caption": " ".join(words), "error": None}) + "\n")
    with open(folder / f".{output.name}.review.jsonl", "w", encoding="utf-8") as journal:
        for number in range(0, count, 10):
            journal.write(json.dumps({"key": f"part{number // 10_000:02d}/image_{number:06d}.jpg", "action": "choose",
                                      "model": "org/model-a", "text": "replayed", "at": time.time()}) + "\n")
    return output


def one_run(output: Path, count: int) -> dict:
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "vlmux.cli", "review", str(output), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in server.stdout:
            if found := LISTENING.search(line):
                url = found.group(1)
                break
        else:
            raise RuntimeError("vlmux review did not start")
        times = {"open": time.perf_counter() - started}
        with httpx.Client(base_url=url, timeout=120) as client:
            def timed(name: str, path: str, **params) -> dict:
                begin = time.perf_counter()
                answer = client.get(path, params=params)
                answer.raise_for_status()
                times[name] = time.perf_counter() - begin
                return answer.json() if path.startswith("/api") else {}

            timed("html", "/")
            first = timed("first_view", "/api/view", limit=50, fresh=True)
            times["first_page"] = time.perf_counter() - started
            assert first["total"] == count and len(first["items"]) == 50
            timed("next_page", "/api/view", offset=50, limit=50)
            timed("deep_page", "/api/view", offset=count - 50, limit=50)
            timed("disagreement_first", "/api/view", order="disagreement", limit=50, fresh=True)
            timed("disagreement_again", "/api/view", order="disagreement", offset=50, limit=50)
            timed("search", "/api/view", q="purple circle above", limit=50, fresh=True)
            timed("unreviewed_fresh", "/api/view", filter="unreviewed", limit=50, fresh=True)
            begin = time.perf_counter()
            client.post("/api/decide", json={"key": first["items"][1]["key"], "action": "reject"}).raise_for_status()
            times["decide"] = time.perf_counter() - begin
            times["page_bytes"] = len(client.get("/api/view", params={"limit": 50}).content)
        return times
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlmux-review-bench-") as folder:
        output = synthetic(Path(folder), args.images)
        size = output.stat().st_size
        runs = []
        for _ in range(args.runs):
            journal = Path(folder) / f".{output.name}.review.jsonl"
            kept = journal.read_bytes()
            runs.append(one_run(output, args.images))
            journal.write_bytes(kept)  # each run replays the same journal
    result = {"environment": environment(), "images": args.images, "records": 2 * args.images,
              "jsonl_bytes": size, "journal_decisions": len(range(0, args.images, 10)), "runs": runs,
              "summary": {name: summarise([run[name] for run in runs]) for name in runs[0]}}
    print(json.dumps(result["summary"], indent=2))
    write_result("review", result, args.out)


if __name__ == "__main__":
    main()
