"""`vlmux serve` under load (issue 18): two models behind one server whose VRAM budget holds one at a time (the
Qwen2-VL 2B and 7B shapes on a GPU), a load generator on loopback sending mixed chat requests through the OpenAI API
(most to one model), then switches by hand, each unload's residue read from /api/unload and /api/ps.

Writes JSON: latency and time-to-first-token percentiles (streamed: the first token is the first content chunk after
the loading notice), answers by status, switches (loads on demand) and their seconds, and the residue after each unload.

Usage: python bench/serve_load.py [--requests 500] [--concurrency 32] [--share 0.8] [--out FILE]   (on a GPU)
       python bench/serve_load.py --tiny --requests 60                                           (CPU, tiny models)
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from vlmux.testing.server import served  # noqa: E402

PROMPT = "Describe this image in one short sentence."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--share", type=float, default=0.8, help="share of the requests to the first model")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--switches", type=int, default=4, help="unload-then-ask rounds after the load, for residue")
    parser.add_argument("--minutes", type=float, help="send no request after this (a device call's limit): rows cut")
    parser.add_argument("--tiny", action="store_true", help="two tiny models on the CPU (no budget to hold)")
    parser.add_argument("--models", type=Path, default=Path("/tmp/vlmux-bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        models, options = _models(args, Path(scratch))
        with served(*[f"--model={name}={path}" for name, path in models.items()], "--max-queue", "100000",
                    "--keep-alive", "-1", *options, timeout=600,
                    log=str(args.out.with_suffix(".log")) if args.out else None) as (_, url):
            result = asyncio.run(_run(url, list(models), args))
    result.update(environment=environment(), models={k: str(v) for k, v in models.items()}, server_options=options,
                  requests=args.requests, concurrency=args.concurrency, share=args.share, max_tokens=args.max_tokens)
    if args.out:
        result["loads"] = _loads_from_log(args.out.with_suffix(".log"))
    print(_summary(result))
    write_result("serve_load", result, args.out)


def _models(args, scratch: Path) -> tuple[dict[str, Path], list[str]]:
    if args.tiny:
        from vlmux.tiny import build_tiny

        return ({"a": build_tiny(scratch / "a", "qwen2_vl", seed=0), "b": build_tiny(scratch / "b", "llava", seed=1)},
                ["--device", "cpu"])
    from shapes import build_shape

    from vlmux.estimate import estimate

    models = {f"qwen2-vl-{s}": build_shape(args.models / f"qwen2-vl-{s}", s) for s in ("2b", "7b")}
    smallest = sorted(estimate(path, "auto", 1, 64, on_gpu=True).total for path in models.values())
    budget = smallest[1] + smallest[0] // 2  # the larger alone fits, both together never do
    return models, ["--device", "cuda", "--vram-budget", f"{budget // 2**20}MiB"]


def _image(seed: int) -> str:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (448, 448), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


async def _run(url: str, names: list[str], args) -> dict:
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    rng = random.Random(0)
    images = [_image(i) for i in range(8)]
    plan = [(names[0] if rng.random() < args.share else names[1], images[i % len(images)]) for i in range(args.requests)]
    gate = asyncio.Semaphore(args.concurrency)
    records = []

    cutoff = time.perf_counter() + args.minutes * 60 if args.minutes else float("inf")

    async def one(model: str, image: str) -> None:
        async with gate:
            started = time.perf_counter()
            if started > cutoff:
                records.append({"model": model, "status": "not_sent", "seconds": 0.0, "first_token": None,
                                "tokens": 0, "message": f"after --minutes {args.minutes}"})
                return
            first, status, tokens, message = None, 200, 0, None
            try:
                stream = await client.chat.completions.create(
                    model=model, max_tokens=args.max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                           {"type": "text", "text": PROMPT}]}])
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter() - started
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
            except openai.APIStatusError as e:
                status, message = e.status_code, str(e)
            except openai.APIError as e:  # an error event inside the stream
                status, message = getattr(e, "code", None) or 500, str(e)
            records.append({"model": model, "status": status, "seconds": time.perf_counter() - started,
                            "first_token": first, "tokens": tokens, "message": message})

    async def progress() -> None:  # to a file too: a device call cut by its time limit loses the pipe's tail
        log = args.out.with_suffix(".progress") if args.out else None
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while True:
                await asyncio.sleep(15)
                try:
                    states = {m["name"]: m["state"] for m in (await http.get("/api/ps")).json()["models"]}
                except (httpx.HTTPError, KeyError, ValueError) as e:
                    states = repr(e)
                line = (f"{time.perf_counter() - started:.0f} s: {len(records)} answered, by status "
                        f"{_count(r['status'] for r in records)}; models {states}")
                print(line, file=sys.stderr, flush=True)
                if log is not None:
                    with open(log, "a") as f:
                        print(line, file=f)

    started = time.perf_counter()
    reporter = asyncio.create_task(progress())
    await asyncio.gather(*(one(model, image) for model, image in plan))
    reporter.cancel()
    wall = time.perf_counter() - started
    ok = [r for r in records if r["status"] == 200]  # the switch rounds below add theirs after this
    by_status = _count(r["status"] for r in records)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        metrics = (await http.get("/metrics")).text
        unloads = []
        for round_ in range(args.switches):  # unload what is loaded, ask the other model: its load is a switch
            released = (await http.post("/api/unload", json={})).json()["unloaded"]
            ps = (await http.get("/api/ps")).json()
            unloads += [{**r, "gpu_used_mib_after": [g["used"] / 2**20 for g in ps["gpus"]]} for r in released]
            await one(names[round_ % 2], images[0])
        unloads += (await http.post("/api/unload", json={})).json()["unloaded"]
    first_errors = {str(r["status"]): r["message"] for r in reversed(records) if r["status"] != 200}
    return {"wall_seconds": wall, "answers_by_status": by_status, "first_errors": first_errors,
            "latency": _percentiles([r["seconds"] for r in ok]),
            "time_to_first_token": _percentiles([r["first_token"] for r in ok if r["first_token"] is not None]),
            "per_model": {name: _percentiles([r["seconds"] for r in ok if r["model"] == name]) for name in names},
            "completion_tokens": sum(r["tokens"] for r in ok),
            "loads_during_run": {name: _metric(metrics, f'vlmux_loads_total{{model="{name}"}}') for name in names},
            "waited_for_load": {name: {"count": _metric(metrics, f'vlmux_switch_seconds_count{{model="{name}"}}'),
                                      "sum": _metric(metrics, f'vlmux_switch_seconds_sum{{model="{name}"}}')}
                               for name in names},
            "unloads": unloads,
            "max_residue_mib": max((u["residue_mib"] for u in unloads if u["residue_mib"] is not None), default=None)}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "mean": statistics.fmean(ordered), "n": len(ordered)}


def _count(values) -> dict:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts


def _metric(text: str, series: str) -> float:
    found = re.search(re.escape(series) + r" (\S+)", text)
    return float(found.group(1)) if found else 0.0


def _loads_from_log(log: Path) -> dict:
    """Each load's seconds from the server's log: from asked for to ready (room, spare, load), and in the worker."""
    found = re.findall(r"ready ([\d.]+) s after its load was asked for; the worker's load took ([\d.]+) s"
                       r"(?:; batches of up to (\d+))?", log.read_text() if log.exists() else "")
    asked, worker = [float(a) for a, _, _ in found], [float(w) for _, w, _ in found]
    return {"count": len(found), "asked_to_ready": asked, "worker": worker,
            "batch_size": [int(b) for _, _, b in found if b],
            "asked_to_ready_median": statistics.median(asked) if asked else None,
            "worker_median": statistics.median(worker) if worker else None}


def _summary(result: dict) -> str:
    latency, first = result["latency"], result["time_to_first_token"]
    return (f"{result['requests']} requests in {result['wall_seconds']:.1f} s, by status {result['answers_by_status']}; "
            f"latency p50 {latency.get('p50', 0):.3f} s p99 {latency.get('p99', 0):.3f} s; first token p50 "
            f"{first.get('p50', 0):.3f} s; loads {result['loads_during_run']}; max residue {result['max_residue_mib']} MiB")


if __name__ == "__main__":
    main()
