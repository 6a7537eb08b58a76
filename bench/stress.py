"""Load on `vlmux serve` (issue 22): 2000 chat requests at concurrency 64 over three tiny models on a fake GPU whose
budget holds two, from a load generator on loopback (vlmux.testing.load). Every answer is checked against the one a
lone request gets; after the run every model is unloaded. Writes JSON: answers by status, error rate, wrong answers,
429s retried, p50 / p99 latency, loads (the models took turns), workers left, and this process's RSS, threads, file
descriptors and /dev/shm segments before and after. The device run is bench/serve_load.py (2B / 7B shapes).

Usage: python3 bench/stress.py [--requests 2000] [--concurrency 64] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

import httpx  # noqa: E402

from vlmux.testing.load import PROMPTS, chat_body, drive, fake_gpu_server, host_figures, mixed_requests, picture  # noqa: E402
from vlmux.testing.processes import process_gone  # noqa: E402
from vlmux.tiny import build_tiny  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        models = {name: build_tiny(Path(scratch) / arch, arch, seed=0)
                  for name, arch in (("a", "llava"), ("b", "qwen2_vl"), ("c", "idefics3"))}
        before = host_figures()
        with fake_gpu_server(models) as (url, gpus, workers):
            image = picture("teal")
            with httpx.Client(timeout=300) as client:
                lone = {(m, p): client.post(url + "/v1/chat/completions", json=chat_body(m, p, image)).json()
                        ["choices"][0]["message"]["content"] for m in models for p in PROMPTS}
            result = drive(url, mixed_requests(args.requests, list(models), image, args.seed), args.concurrency)
            wrong = sum(1 for request, text in result.answers if text is not None
                        and text != lone[request["model"], request["messages"][0]["content"][1]["text"]])
            with httpx.Client(timeout=300) as client:
                unloaded = client.post(url + "/api/unload", json={}).json()["unloaded"]
            pids = {event.pid for event in workers.events if event.what == "loaded"}
            left = sorted(pid for pid in pids if not process_gone(pid))
            loads = sum(1 for event in workers.events if event.what == "loaded")
            device_left = gpus.process_memory(0)
        after = host_figures()
    data = {"environment": environment(), "requests": args.requests, "concurrency": args.concurrency,
            "models": 3, "budget_holds": 2, **result.summary(), "wrong_answers": wrong, "loads": loads,
            "unloads_verified": all(u["verified"] and u["process_gone"] for u in unloaded),
            "workers_left": left, "fake_gpu_bytes_left": sum(device_left.values()), "host_before": before,
            "host_after": after}
    path = write_result("stress", data, args.out)
    print(json.dumps({k: v for k, v in data.items() if k != "environment"}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
