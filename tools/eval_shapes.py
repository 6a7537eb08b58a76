"""Judge the bundled `vlmux/shapes` captioner on pictures it never saw, through the real worker path.

    python tools/eval_shapes.py                 # 500 fresh pictures, CPU, batches of 32

Writes the pictures as PNG and JPEG files, captions the files with vlmux.pipeline (a worker process that
decodes them and runs the model), and prints the exact-match accuracy and the captioning speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import vlmux  # noqa: E402
from vlmux.shapes import write_dataset  # noqa: E402

# Training draws from seed 0 and checks itself on seed 1_000_003; this seed is neither.
EVAL_SEED = 20_250_417


def evaluate(model: str, count: int, seed: int, batch_size: int, device: str,
             dtype: str = "auto") -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        samples = write_dataset(folder, count, seed)
        paths = [str(path) for path, _ in samples]
        with vlmux.pipeline(model, device=device, dtype=dtype, batch_size=batch_size) as captioner:
            captioner(paths[:batch_size])  # the first batch pays for one-off setup inside the worker
            start = time.perf_counter()
            captions = captioner(paths)
            seconds = time.perf_counter() - start
    wrong = [(want, got) for (_, want), got in zip(samples, captions) if got != want]
    accuracy = 1 - len(wrong) / count
    formats = Counter(Path(path).suffix for path in paths)
    print(f"{model}: {count} pictures (seed {seed}, {formats['.png']} PNG, {formats['.jpg']} JPEG) "
          f"on {device}, dtype {dtype}")
    print(f"exact match: {count - len(wrong)}/{count} = {accuracy:.1%}")
    print(f"speed: {count / seconds:.1f} images/s ({seconds:.1f} s, batches of {batch_size})")
    for want, got in wrong[:10]:
        print(f"  wanted {want!r}, got {got!r}")
    return accuracy, count / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlmux/shapes")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on the CPU, bfloat16 on a GPU")
    args = parser.parse_args(argv)
    evaluate(args.model, args.count, args.seed, args.batch_size, args.device, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
