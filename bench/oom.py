"""CUDA out of memory on purpose (issue 22, device only): the 7B shape is asked for one batch of 256 large pictures
(no pixel limit). The worker caps a batch at what its estimate says fits (`worker_batch` in the JSON); where that
still runs out of memory (on the H200 it did, 2026-12-01), the worker must split the batch on OOM down to what fits, answer every image (a caption, or an "out of device memory even alone" error), stay up for the next
request, and give its memory back at unload, verified by NVML. Writes JSON: captions and errors, batch sizes used,
the answer after the OOM, and the release. The benchmark shapes pin their processors to 448x448, so the model is read
through a copy of its folder (weights linked) whose processor takes the pictures whole.

Usage: python3 bench/oom.py [--models /tmp/vlmux-bench] [--images 256] [--side 2048] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402
from shapes import limit_pixels  # noqa: E402

from PIL import Image  # noqa: E402

from vlmux import GenerationSpec, ModelPool, ModelSpec, PoolConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/vlmux-bench"))
    parser.add_argument("--model", default="qwen2-vl-7b")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--side", type=int, default=2048, help="pixels per side of each picture")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    pictures = [Image.effect_noise((args.side, args.side), 64).convert("RGB") for _ in range(4)]
    items = [pictures[i % 4] for i in range(args.images)]
    gen = GenerationSpec(max_new_tokens=16, max_pixels=None)
    model = whole_pictures(args.models / args.model, args.side * args.side)
    with ModelPool(PoolConfig(spare_worker=False)) as pool:
        name = pool.load(ModelSpec(str(model), device="cuda"))
        worker_batch = pool.batch_size(name)  # what the worker's estimate lets a batch hold: chunks of the 256
        started = time.perf_counter()
        captions = pool.submit_caption(name, items, ["Describe."] * len(items), gen, batch_size=args.images).result()
        seconds = time.perf_counter() - started
        after = pool.caption(name, [Image.new("RGB", (448, 448), "red")], ["Describe."], GenerationSpec(max_new_tokens=8))
        release = pool.unload(name)
    results = captions.results
    data = {"environment": environment(), "model": args.model, "images": args.images, "side": args.side,
            "asked_batch": args.images, "worker_batch": worker_batch, "captioned": sum(r.error is None for r in results),
            "errors": Counter(r.error.split(":")[0] for r in results if r.error),
            "batches_used": Counter(r.batch for r in results), "seconds": seconds,
            "answer_after": after[0].caption, "release": {"verified": release.verified,
                                                          "process_gone": release.process_gone,
                                                          "residue_mib": release.residue_mib, "note": release.note}}
    path = write_result("oom", data, args.out)
    print(json.dumps({k: v for k, v in data.items() if k != "environment"}, indent=1, default=str))
    print(f"written to {path}")


def whole_pictures(model: Path, pixels: int) -> Path:
    """A folder beside `model` with its weights linked and its processor's pixel limit raised to `pixels`."""
    out = model.with_name(f"{model.name}-whole-pictures")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for file in model.iterdir():
        if file.name.endswith(".safetensors") or file.name.endswith(".index.json"):
            (out / file.name).symlink_to(file.resolve())
        elif file.is_file():
            shutil.copy(file, out / file.name)
    limit_pixels(out, pixels)
    return out


if __name__ == "__main__":
    main()
