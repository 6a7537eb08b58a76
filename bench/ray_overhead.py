"""What Ray costs: the same two-model caption job on the CPU with vlmux's tiny models, wall seconds, repeated and
alternated, two ways:
  in_process   run_job vs run_ray_job called from this process (one actor per model); run_job's fork server is
               warm after its first run, while every Ray actor starts its own (imports torch + transformers)
  cli          `vlmux caption` vs `vlmux caption --ray ADDRESS`, a fresh command each time, as a user runs them
The tiny models make the captioning itself short, so this shows Ray's fixed cost (actor and fork-server start-up,
scheduling, moving results back to the driver), not how a real model would scale.

Usage: PYTHONPATH=$PWD/src python3 bench/ray_overhead.py [--images 48] [--repeats 3] [--out bench/results/x.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the local cluster listens on loopback only
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, summarise, write_result  # noqa: E402

from vlmux.caption.job import CaptionJob, run_job  # noqa: E402
from vlmux.caption.plan import ModelPlan  # noqa: E402
from vlmux.caption.sinks import JsonlSink  # noqa: E402
from vlmux.caption.sources import collect_images  # noqa: E402
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import ray

    from vlmux.distributed.ray import run_ray_job
    from vlmux.tiny import build_tiny, draw_sample_images

    scratch = Path(tempfile.mkdtemp(prefix="vlmux-ray-bench-"))
    models = [build_tiny(scratch / arch, arch, seed=0) for arch in ("llava", "qwen2_vl")]
    draw_sample_images(scratch / "images", count=args.images, seed=3)
    generation = GenerationSpec(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    plans = [ModelPlan(ModelSpec(str(model), device="cpu"), generation, args.batch_size) for model in models]
    config = PoolConfig(max_batch_size=args.batch_size)

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    cluster_seconds = time.perf_counter() - start

    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "vlmux.cli", "caption", str(scratch / "images"), "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(args.max_new_tokens), "-m", str(models[0]), "-m", str(models[1]),
               "--device", "cpu", "--no-progress"]

    def once(method: str, repeat: int) -> tuple[float, set]:
        out = scratch / f"{method}-{repeat}.jsonl"
        begin = time.perf_counter()
        if method.startswith("cli"):
            ray_args = ["--ray", address] if method == "cli_ray" else []
            subprocess.run([*command, "-o", str(out), *ray_args], check=True, capture_output=True)
            seconds = time.perf_counter() - begin
            sink = JsonlSink(out)
        else:
            sink = JsonlSink(out)
            job = CaptionJob(collect_images([str(scratch / "images")]), plans, generation, [sink], batch_size=args.batch_size)
            if method == "in_process_single":
                run_job(job, config, progress=False)
            else:
                run_ray_job(job, config, None, progress=False)
            seconds = time.perf_counter() - begin
        sink.close()
        return seconds, {(r.file, r.model, r.caption) for r in sink.records()}

    runs: dict[str, list[float]] = {"in_process_single": [], "in_process_ray": [], "cli_single": [], "cli_ray": []}
    outputs: dict[str, set] = {}
    for repeat in range(args.repeats):
        for method in runs:  # alternated, so drift in the machine's load hits both alike
            seconds, records = once(method, repeat)
            runs[method].append(seconds)
            outputs.setdefault(method, records)
            print(f"{method} #{repeat}: {seconds:.2f} s", file=sys.stderr)
    ray.shutdown()
    medians = {method: summarise(values)["median"] for method, values in runs.items()}
    warm_single = summarise(runs["in_process_single"][1:])["median"]  # its first run starts the fork server
    result = {
        "benchmark": "ray_overhead", "environment": environment(), "ray": ray.__version__,
        "workload": {"images": args.images, "models": ["tiny llava", "tiny qwen2_vl"], "device": "cpu",
                     "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "actors_per_model": 1,
                     "ignore_eos": "in_process runs only; the CLI has no such option (both CLI runs decode alike)"},
        "cluster_start_seconds": cluster_seconds,
        "seconds": {method: summarise(values) for method, values in runs.items()},
        "raw_seconds": runs,
        "in_process_single_warm_median": warm_single,
        "overhead_seconds": {"in_process_vs_warm": medians["in_process_ray"] - warm_single,
                             "cli": medians["cli_ray"] - medians["cli_single"]},
        "ratio": {"in_process_vs_warm": medians["in_process_ray"] / warm_single,
                  "cli": medians["cli_ray"] / medians["cli_single"]},
        "outputs_equal": {"in_process": outputs["in_process_ray"] == outputs["in_process_single"],
                          "cli": outputs["cli_ray"] == outputs["cli_single"]},
    }
    print(json.dumps({k: result[k] for k in ("seconds", "overhead_seconds", "ratio", "outputs_equal")}, indent=1),
          file=sys.stderr)
    write_result("ray_overhead", result, args.out)


if __name__ == "__main__":
    main()
