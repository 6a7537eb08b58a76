"""The memory estimate against the measured peak (issue 7): for each shape and batch size, a fresh vlmux worker loads
the model, captions one batch of 448x448 photos (64 new tokens, decode dynamic), and a thread in this process polls
NVML for the worker's device memory. Compared: `estimate(...)` (weights from the headers, KV cache and activations
from the config and the processor's image bounds, the CUDA context) against the worker's peak; the goal is within
10 %. This process never touches CUDA.

Device command (~4 minutes): PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 python3 bench/memory.py --out $OUT/memory.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402
from throughput import PROMPT, bench_copy  # noqa: E402

from vlmux.pool import vram  # noqa: E402
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig  # noqa: E402
from vlmux.estimate import estimate, image_budget  # noqa: E402
from vlmux.pool import ModelPool  # noqa: E402


class PeakWatcher:
    """The largest device memory NVML books to `pid` while running, polled every few milliseconds."""

    def __init__(self, pid: int, gpu: int = 0, every: float = 0.003) -> None:
        self.pid, self.gpu, self.every, self.peak = pid, gpu, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, vram.process_memory(self.gpu).get(self.pid, 0))
            time.sleep(self.every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2b,7b")
    parser.add_argument("--batches", default="32,128,256")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlmux-bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not vram.available():
        sys.exit(f"bench/memory.py needs an NVIDIA GPU: {vram.nvml_status()}")
    from shapes import write_jpegs

    batches = [int(b) for b in args.batches.split(",")]
    jpegs = write_jpegs(args.work / "jpegs", max(batches))
    files = [str(jpegs[i % len(jpegs)]) for i in range(max(batches))]
    gen = GenerationSpec(PROMPT, max_new_tokens=args.new_tokens, ignore_eos=True)
    result = {"benchmark": "memory", "environment": environment(), "new_tokens": args.new_tokens, "runs": []}
    for shape in args.shapes.split(","):
        subprocess.run([sys.executable, str(Path(__file__).parent / "shapes.py"), str(args.work), shape], check=True)
        model = bench_copy(args.work / f"qwen2-vl-{shape}", args.work / f"qwen2-vl-{shape}-caption-noeos", 448 * 448)
        for batch in batches:
            need = estimate(model, "bfloat16", batch, args.new_tokens)
            with ModelPool(PoolConfig(max_batch_size=batch, spare_worker=False)) as pool:
                name = pool.load(ModelSpec(str(model), device="cuda", decode="dynamic"))
                pid = pool.status()[0].pid
                loaded = vram.process_memory(0).get(pid, 0)
                with PeakWatcher(pid) as watcher:
                    results = pool.caption(name, files[:batch], [PROMPT] * batch, gen)
                batch_seen = max(r.batch for r in results)
            row = {"shape": shape, "batch": batch, "batch_run": batch_seen, "image_budget": str(image_budget(model)),
                   "estimate": vars(need) | {"total": need.total}, "loaded_bytes": loaded, "peak_bytes": watcher.peak,
                   "estimate_over_peak": round(need.total / watcher.peak, 3) if watcher.peak else None,
                   "weights_and_context_over_loaded": round((need.weights + need.context) / loaded, 3) if loaded else None,
                   "errors": sum(r.error is not None for r in results)}
            result["runs"].append(row)
            print(f"{shape} batch {batch} (ran {batch_seen}): estimate {need.total / 2**30:.2f} GiB, peak "
                  f"{watcher.peak / 2**30:.2f} GiB, ratio {row['estimate_over_peak']}", file=sys.stderr, flush=True)
            write_result("memory", result, args.out)


if __name__ == "__main__":
    main()
