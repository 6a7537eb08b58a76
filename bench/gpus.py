"""Data-parallel captioning over a host's GPUs (issue 8): the Qwen2-VL 2B benchmark shape on real JPEG files, one
worker (the single-process default) against `--gpus all` (a replica per GPU) and two replicas per GPU, images/s
end to end (files in, JSONL written), each run's placement and its verified release. Greedy, 64 new tokens, eos
disabled so random weights cannot stop early; the outputs of every variant must equal the single worker's.

Usage (on a GPU machine): PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 python3 bench/gpus.py --out $OUT/gpus.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from vlmux.pool import vram  # noqa: E402
from vlmux.caption.job import CaptionJob, run_job  # noqa: E402
from vlmux.caption.plan import ModelPlan  # noqa: E402
from vlmux.caption.sinks import JsonlSink  # noqa: E402
from vlmux.caption.sources import collect_images  # noqa: E402
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig  # noqa: E402

PROMPT = "Describe this image in one short sentence for a caption dataset, please."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/vlmux-bench"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not vram.available():
        sys.exit(f"bench/gpus.py needs NVIDIA GPUs: {vram.nvml_status()}")
    start = time.perf_counter()
    # Built in a child process so this one never creates a CUDA context.
    subprocess.run([sys.executable, str(Path(__file__).parent / "shapes.py"), str(args.models), "2b"], check=True)
    build_seconds = time.perf_counter() - start
    from shapes import write_jpegs

    model = args.models / "qwen2-vl-2b"
    folder = args.models / f"jpegs-{args.images}"
    write_jpegs(folder, args.images)
    for file in model.glob("*.safetensors"):  # page cache warm: this measures captioning, not the disk
        file.read_bytes()
    gpus = len(vram.gpus())
    plan = ModelPlan(ModelSpec(str(model), device="cuda"),
                     GenerationSpec(PROMPT, max_new_tokens=args.max_new_tokens, ignore_eos=True), args.batch_size)
    # The single worker twice: on the GPU, bf16 captions of a random-weight model can differ between two runs of the
    # same job (near-tied logits), which is the yardstick for the others' differences.
    variants = {"single_worker": (None, None), "single_worker_again": (None, None), "gpus_all": ("all", None),
                "gpus_all_two_per_gpu": ("all", 2 * gpus)}
    result = {"benchmark": "gpus", "environment": environment(), "gpus": [asdict(g) for g in vram.gpus()],
              "images": args.images, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "build_seconds": build_seconds, "runs": {}}
    outputs = {}
    for name, (which, replicas) in variants.items():
        out = args.models / f"gpus-{name}.jsonl"
        out.unlink(missing_ok=True)
        sink = JsonlSink(out)
        job = CaptionJob(collect_images([str(folder)]), [plan], plan.generation, [sink], gpus=which, replicas=replicas)
        start = time.perf_counter()
        [report] = run_job(job, PoolConfig(max_batch_size=args.batch_size), progress=False)
        seconds = time.perf_counter() - start
        sink.close()
        outputs[name] = {r.file: r.caption for r in sink.records()}
        result["runs"][name] = {
            "gpus": which, "replicas": replicas, "workers": report.workers, "wall_seconds": seconds,
            "images_per_second_wall": args.images / seconds, "load_seconds": report.load_seconds,
            "caption_seconds": report.caption_seconds, "images_per_second_captioning": report.images_per_second,
            "tokens_per_second": report.tokens_per_second, "errors": report.errors, "release": str(report.release),
            "release_verified": None if report.release is None else report.release.verified,
        }
        print(f"{name}: {report.workers} worker(s), {report.images_per_second:.1f} images/s captioning, "
              f"{args.images / seconds:.1f} images/s wall, {report.release}", file=sys.stderr)
    result["outputs_equal_single_worker"] = {name: outputs[name] == outputs["single_worker"] for name in outputs}
    result["captions_differing_from_single_worker"] = {
        name: sum(outputs[name].get(file) != caption for file, caption in outputs["single_worker"].items())
        for name in outputs}
    path = write_result("gpus", result, args.out)
    print(json.dumps({name: run["images_per_second_captioning"] for name, run in result["runs"].items()}))
    print(path)


if __name__ == "__main__":
    main()
