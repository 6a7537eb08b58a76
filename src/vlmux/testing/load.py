"""A load generator for `vlmux serve` on loopback (tests and bench/stress.py): chat requests at a fixed concurrency,
a 429 retried after its Retry-After, each request's latency and final status; and a server over three tiny models on
fake GPUs whose budget holds two."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ("Describe it.", "What colour is it?", "Name the shape.", "Is it large?", "Say one word.")


def picture(colour: str, size=(40, 32)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(model: str, prompt: str, image: str, max_tokens: int = 6) -> dict:
    return {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}]}]}


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds from the first send (429s included) to the answer
    statuses: Counter = field(default_factory=Counter)  # final status per request
    retried: int = 0  # 429 answers that were sent again
    answers: list[tuple[dict, str | None]] = field(default_factory=list)  # (request, its text or None)
    seconds: float = 0.0

    def summary(self) -> dict:
        ordered = sorted(self.latencies)
        failed = sum(count for status, count in self.statuses.items() if status != 200)
        return {"requests": len(self.answers), "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "error_rate": failed / max(1, len(self.answers)), "retried_429": self.retried,
                "p50_s": statistics.median(ordered) if ordered else None,
                "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
                "wall_s": self.seconds, "requests_per_s": len(self.answers) / self.seconds if self.seconds else None}


def drive(url: str, requests: list[dict], concurrency: int, timeout: float = 600) -> LoadResult:
    """Send `requests` with at most `concurrency` in flight; a 429 waits its Retry-After and goes again."""
    result = LoadResult()

    async def run() -> None:
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)  # no reuse of a closing one
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            async def one(request: dict) -> None:
                async with gate:
                    started = time.perf_counter()  # from its turn: the wait for a free slot is the client's own
                    while True:
                        answer = await client.post(url + "/v1/chat/completions", json=request)
                        if answer.status_code != 429:
                            break
                        result.retried += 1
                        await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
                result.latencies.append(time.perf_counter() - started)
                result.statuses[answer.status_code] += 1
                text = answer.json()["choices"][0]["message"]["content"] if answer.status_code == 200 else None
                result.answers.append((request, text))

            await asyncio.gather(*(one(request) for request in requests))

    started = time.perf_counter()
    asyncio.run(run())
    result.seconds = time.perf_counter() - started
    return result


def mixed_requests(count: int, models: list[str], image: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [chat_body(rng.choice(models), rng.choice(PROMPTS), image) for _ in range(count)]


@contextlib.contextmanager
def fake_gpu_server(models: dict[str, Path], max_queue: int = 100, holds: int = 2, min_residency: float | None = None
                    ) -> Iterator[tuple[str, object, object]]:
    """`vlmux serve`'s app in a thread over `models` (name -> tiny model folder) on one fake GPU whose budget holds
    the `holds` largest together, never one more; yields (url, FakeGpus, FakeGpuWorkers). `min_residency`: as
    `--min-residency` (None: auto)."""
    from vlmux import ModelPool, PoolConfig
    from vlmux.config import GenerationSpec
    from vlmux.estimate import estimate
    from vlmux.serve.app import create_app
    from vlmux.serve.service import Service
    from vlmux.serve.settings import ModelEntry, ServeConfig
    from vlmux.testing.fakes import FakeGpus, FakeGpuWorkers
    from vlmux.testing.server import in_thread

    charges = sorted(estimate(path, "auto", 1, GenerationSpec.max_new_tokens, on_gpu=True).total for path in models.values())
    budget = sum(charges[-holds:]) + 1
    gpus = FakeGpus()
    workers = FakeGpuWorkers(gpus)
    config = ServeConfig(device="cuda", vram_budget=budget, max_queue=max_queue, keep_alive=300,
                         min_residency=min_residency,
                         models=tuple(ModelEntry(name, str(path)) for name, path in models.items()))
    pool = ModelPool(PoolConfig(vram_budget=budget, max_batch_size=1, keep_alive=config.keep_alive,
                                min_residency=config.min_residency), inventory=gpus, workers=workers)
    with in_thread(create_app(Service(config, pool, gpus))) as url:
        yield url, gpus, workers


def host_figures() -> dict:
    """This process's resident memory, open files and threads, and the shared-memory segments in /dev/shm."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    shm = Path("/dev/shm")
    return {"rss_bytes": int(status["VmRSS"].split()[0]) * 1024, "threads": int(status["Threads"]),
            "fds": len(os.listdir("/proc/self/fd")), "shm_segments": len(list(shm.iterdir())) if shm.exists() else 0}
