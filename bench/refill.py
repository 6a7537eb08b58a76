"""Continuous refill (issue 17): captions of real, varying length, through decode `engine` (rows that end leave and
waiting rows take their slots) against `dynamic` (transformers' `generate`: a batch decodes until its longest caption
ends). The bundled `vlmux/shapes` captioner (eos enabled, captions of 4 to ~25 tokens) on fresh shapes pictures,
through `vlmux.pipeline` as a user calls it.

Writes JSON: per mode images/s, exact-match accuracy, and the decode work: the tokens a batch decodes, counted from
the captions themselves (each caption's tokens plus its end-of-sequence token): `generate` decodes every row of a
batch as long as its longest (batches taken as the input's consecutive chunks of --batch), the engine each row only as
long as its own.

Usage: python3 bench/refill.py [--device cpu|cuda] [--images 256] [--batch 32] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

import vlmux  # noqa: E402
from vlmux.hub import resolve_model  # noqa: E402
from vlmux.shapes import write_dataset  # noqa: E402

MODEL = "vlmux/shapes"
MODES = ("dynamic", "engine")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=20_261_201, help="pictures none of training and evaluation used")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        samples = write_dataset(folder, args.images, seed=args.seed)
        paths = [str(path) for path, _ in samples]
        truths = [caption for _, caption in samples]
        rows = {mode: run(mode, paths, truths, args) for mode in MODES}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    lengths = [len(tokenizer(caption, add_special_tokens=False).input_ids) + 1 for caption in rows["engine"]["captions"]]
    chunks = [lengths[i:i + args.batch] for i in range(0, len(lengths), args.batch)]
    padded = sum(len(chunk) * max(chunk) for chunk in chunks)
    work = {"answer_tokens_min_mean_max": [min(lengths), round(sum(lengths) / len(lengths), 1), max(lengths)],
            "generate_decodes": padded, "engine_decodes": sum(lengths),
            "engine_share_of_generate": round(sum(lengths) / padded, 3)}
    same = rows["engine"]["captions"] == rows["dynamic"]["captions"]
    for row in rows.values():
        del row["captions"]
    result = {"model": MODEL, "device": args.device, "images": args.images, "batch": args.batch, "seed": args.seed,
              "rows": rows, "decode_work": work, "engine_captions_equal_dynamic": same, "environment": environment()}
    print(rows, work, f"captions equal: {same}")
    write_result("refill", result, args.out)


def run(mode: str, paths: list[str], truths: list[str], args) -> dict:
    with vlmux.pipeline(MODEL, device=args.device, decode=mode, batch_size=args.batch) as pipe:
        pipe(paths[:args.batch])  # the first batch's one-time costs (a graph capture, kernels) apart
        start = time.perf_counter()
        captions = pipe(paths)
        seconds = time.perf_counter() - start
    right = sum(got == want for got, want in zip(captions, truths))
    return {"images_per_s": round(len(paths) / seconds, 1), "seconds": round(seconds, 2),
            "exact_match": round(right / len(truths), 3), "captions": captions}


if __name__ == "__main__":
    main()
