"""Weight loading throughput from a warm page cache (run on a GPU): from_pretrained, safetensors' load_file and
fastsafetensors (when installed) against vlmux's streaming loader at a few reader settings, each in a fresh process
so no run inherits another's warm allocator.

Usage: python bench/load.py [--methods stream,fastsafetensors] [--cold] MODEL_DIR [MODEL_DIR ...]   (a JSON line per
run; --cold evicts the checkpoint from the page cache before each row: the disk's figure)
fastsafetensors on the device (no network there): carry its wheel, e.g. `pip download fastsafetensors --no-deps
--python-version 312 --only-binary=:all: -d .wheels` here, then `pip install --no-deps .wheels/*.whl` there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time, torch
from pathlib import Path
path, method, readers, chunk = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from transformers import AutoModelForImageTextToText
from vlmux.backends.loader import StreamConfig, empty_model, stream_weights
torch.empty(1, device="cuda"); torch.cuda.synchronize()
start = time.perf_counter()  # imports and the CUDA context stay outside the timed region
if method == "from_pretrained":
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda:0")
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
elif method == "safetensors_load_file":
    from safetensors.torch import load_file
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file, device="cuda:0"))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
elif method == "fastsafetensors":  # its defaults, then 16 threads of 64 MiB bounce buffers (bbuf_size_kb)
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup
    options = {"max_threads": readers, "bbuf_size_kb": chunk << 10} if readers else {}
    loader = SafeTensorsFileLoader(SingleGroup(), "cuda:0", nogds=True, **options)
    loader.add_filenames({0: [str(f) for f in sorted(path.glob("*.safetensors"))]})
    buffer = loader.copy_files_to_device()
    tensors = {name: buffer.get_tensor(name) for name in buffer.key_to_rank_lidx}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
else:
    model = empty_model(path, torch.bfloat16, "cuda:0", False)
    built = time.perf_counter()
    phases = {}
    size = stream_weights(model, path, StreamConfig(readers, chunk << 20), timings=phases)
    streamed = time.perf_counter() - built
    extra = {"empty_model_s": round(built - start, 3), "stream_s": round(streamed, 3),
             "stream_gb_per_s": round(size / 1e9 / streamed, 1), **{k: round(v, 3) for k, v in phases.items()}}
torch.cuda.synchronize()
seconds = time.perf_counter() - start
print(json.dumps({"model": path.name, "method": method, "readers": readers, "chunk_mib": chunk,
                  "seconds": round(seconds, 3), "gb": round(size / 1e9, 2), "gb_per_s": round(size / 1e9 / seconds, 1),
                  **(extra if method == "stream" else {})}))
"""

VARIANTS = [("from_pretrained", 0, 0), ("safetensors_load_file", 0, 0), ("fastsafetensors", 0, 0),
            ("fastsafetensors", 16, 64), ("stream", 16, 16), ("stream", 16, 32), ("stream", 16, 64)]


def main(models: list[str], methods: set[str] | None = None, cold: bool = False) -> list[dict]:
    results = []
    for model in models:
        files = sorted(Path(model).glob("*.safetensors"))
        if not cold:
            for file in files:  # warm the page cache
                with open(file, "rb") as f:
                    while f.read(64 << 20):
                        pass
        for method, readers, chunk in VARIANTS:
            if methods and method not in methods:
                continue
            if cold:
                evict(files)
            out = subprocess.run([sys.executable, "-c", CHILD, model, method, str(readers), str(chunk)],
                                 capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else json.dumps({"model": model, "method": method, "error": out.stderr[-500:]})
            row = {**json.loads(line), "page_cache": "cold" if cold else "warm"}
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (no root needed): the next read comes from the disk."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped: write them first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--methods", help="comma-separated: from_pretrained, safetensors_load_file, fastsafetensors, stream")
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each row")
    args = parser.parse_args()
    main(args.models, set(args.methods.split(",")) if args.methods else None, args.cold)
