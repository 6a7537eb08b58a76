"""Quantised loads against bf16 (issue 19): for each method, a fresh vlmux worker loads the 7B shape (or --model),
and the row records the load seconds, the worker's device memory once loaded (weights + context), the estimate
against the peak while captioning one batch, images/s on the 2B shape's caption workload (448x448, 64 new tokens),
and the residue NVML shows after the unload (the goal: 0 MiB for every method).

Device command (~8 minutes):
  PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 python3 bench/quant.py --methods none,4bit,torchao-int4,torchao-fp8 --out $OUT/quant.json
CPU check with a tiny model (no NVML: memory columns are empty):
  PYTHONPATH=$PWD/src python3 bench/quant.py --tiny --methods none,torchao-int8 --images 4
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402
from memory import PeakWatcher  # noqa: E402
from throughput import PROMPT, bench_copy  # noqa: E402

from vlmux.config import GenerationSpec, ModelSpec, PoolConfig  # noqa: E402
from vlmux.estimate import estimate  # noqa: E402
from vlmux.pool import ModelPool, vram  # noqa: E402


def models(args: argparse.Namespace) -> tuple[Path, Path]:
    """(the model whose load and memory are measured, the model whose throughput is measured)."""
    if args.tiny:
        from vlmux.tiny import build_tiny

        tiny = build_tiny(args.work / "tiny-qwen2_vl", "qwen2_vl")
        return tiny, tiny
    for shape in ("2b", "7b"):
        subprocess.run([sys.executable, str(Path(__file__).parent / "shapes.py"), str(args.work), shape], check=True)
    return (bench_copy(args.work / "qwen2-vl-7b", args.work / "qwen2-vl-7b-caption-noeos", 448 * 448),
            bench_copy(args.work / "qwen2-vl-2b", args.work / "qwen2-vl-2b-caption-noeos", 448 * 448))


def row(model: Path, method: str | None, device: str, files: list[str], gen: GenerationSpec, batch: int,
        timed: bool) -> dict:
    on_gpu = device != "cpu"
    need = estimate(model, "bfloat16" if on_gpu else "float32", batch, gen.max_new_tokens, on_gpu, method)
    spec = ModelSpec(str(model), device=device, decode="dynamic", quantize=method)
    result: dict = {"model": model.name, "method": method or "none", "estimate": vars(need) | {"total": need.total}}
    with ModelPool(PoolConfig(max_batch_size=batch, spare_worker=False)) as pool:
        start = time.perf_counter()
        name = pool.load(spec)
        result["load_seconds"] = round(time.perf_counter() - start, 2)
        pid = pool.status()[0].pid
        result["loaded_bytes"] = vram.process_memory(0).get(pid, 0) if on_gpu else None
        with PeakWatcher(pid) if on_gpu else _Nothing() as watcher:
            begin = time.perf_counter()
            results = pool.caption(name, files, [PROMPT] * len(files), gen)
            seconds = time.perf_counter() - begin
        errors = [r.error for r in results if r.error is not None]
        result["errors"] = len(errors)
        if errors:  # what a method that loads but cannot caption ran into, not just how often
            result["first_error"] = errors[0]
        result["peak_bytes"] = watcher.peak if on_gpu else None
        if on_gpu and watcher.peak:
            result["estimate_over_peak"] = round(need.total / watcher.peak, 3)
        if timed:
            result["images_per_second"] = round(len(files) / seconds, 2)
        release = pool.unload(name)
    result["residue_mib"] = release.residue_mib
    result["release"] = str(release)
    return result


class _Nothing:
    peak = 0

    def __enter__(self) -> "_Nothing":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="none,4bit,torchao-int4,torchao-fp8", help="none or --quantize names")
    parser.add_argument("--images", type=int, default=1024, help="images of the throughput workload")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a tiny qwen2_vl on the CPU: checks the script runs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlmux-bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not vram.available():
        sys.exit(f"bench/quant.py needs an NVIDIA GPU (or --tiny): {vram.nvml_status()}")
    from shapes import write_jpegs

    measured, throughput_model = models(args)
    jpegs = write_jpegs(args.work / "jpegs", min(args.images, 256))
    files = [str(jpegs[i % len(jpegs)]) for i in range(args.images)]
    gen = GenerationSpec(PROMPT, max_new_tokens=8 if args.tiny else 64, ignore_eos=True)
    result = {"benchmark": "quant", "environment": environment(), "runs": []}
    for method in args.methods.split(","):
        quantize = None if method == "none" else method
        for model, images, timed in [(measured, files[: args.batch], False), (throughput_model, files, True)]:
            try:
                entry = row(model, quantize, device, images, gen, min(args.batch, len(images)), timed)
            except Exception as e:  # noqa: BLE001 - a method this host cannot run: recorded, the others go on
                entry = {"model": model.name, "method": method, "error": f"{type(e).__name__}: {e}"}
            result["runs"].append(entry)
            print(entry, file=sys.stderr, flush=True)
            write_result("quant", result, args.out)


if __name__ == "__main__":
    main()
