"""Ways to move a checkpoint's bytes from a warm page cache to the GPU, without a model (run on a GPU): what bounds
the streaming loader, and whether registering the page cache itself for DMA beats copying through staging buffers.

Rows (each GB/s over all the checkpoint's safetensors bytes, page cache warm):
- host_pread: reader threads pread into pinned buffers, nothing goes to the GPU (the host's own ceiling);
- pinned_to_gpu: one pinned buffer copied to the GPU until as many bytes moved (the PCIe ceiling);
- staged: the streaming loader's transport (threads pread into two pinned chunks each, async copy out);
- registered: mmap each file, cudaHostRegister(read-only) slices on threads, copy each slice as it is pinned,
  unregister (registration and unregistration timed apart);
- stream_weights: the loader itself into an empty model (empty model built apart, timed apart).

Usage: python bench/load_paths.py MODEL_DIR [MODEL_DIR ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vlmux.backends.loader import StreamConfig, _pread_into, empty_model, stream_weights

REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: file-backed read-only mappings can be pinned without copy-on-write


def files_of(model: Path) -> list[tuple[Path, int]]:
    return [(f, f.stat().st_size) for f in sorted(model.glob("*.safetensors"))]


def warm(model: Path) -> None:
    for file, _ in files_of(model):
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def host_pread(model: Path, threads: int, chunk: int) -> float:
    pieces = [(f, off, min(chunk, size - off)) for f, size in files_of(model) for off in range(0, size, chunk)]
    buffers = torch.empty(threads, chunk, dtype=torch.uint8, pin_memory=True)

    def read(i: int) -> None:
        fds: dict[Path, int] = {}
        view = memoryview(buffers[i].numpy())
        for f, off, n in pieces[i::threads]:
            if f not in fds:
                fds[f] = os.open(f, os.O_RDONLY)
            _pread_into(fds[f], view[:n], off)
        for fd in fds.values():
            os.close(fd)

    start = time.perf_counter()
    workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def pinned_to_gpu(total: int, target: torch.Tensor) -> float:
    block = 1 << 30
    source = torch.empty(block, dtype=torch.uint8, pin_memory=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for off in range(0, total, block):
        n = min(block, total - off)
        target[off : off + n].copy_(source[:n], non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def staged(model: Path, target: torch.Tensor, readers: int, chunk: int) -> float:
    """The loader's transport over raw file bytes into one flat GPU buffer."""
    from vlmux.backends.loader import _read, staging_buffers

    config = StreamConfig(readers, chunk)
    pieces, base = [], 0
    for f, size in files_of(model):
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            pieces.append((f, off, target[base + off : base + off + n]))
        base += size
    buffers = staging_buffers(config)
    errors: list[BaseException] = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    workers = [threading.Thread(target=_read, args=(pieces[i::readers], target.device, buffers[2 * i : 2 * i + 2], errors))
               for i in range(readers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    torch.cuda.synchronize()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def registered(model: Path, target: torch.Tensor, threads: int, slice_bytes: int) -> dict:
    cudart = torch.cuda.cudart()
    maps, slices, base = [], [], 0
    start = time.perf_counter()
    for f, size in files_of(model):
        with open(f, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        view = torch.frombuffer(mapped, dtype=torch.uint8)
        address = view.data_ptr()
        maps.append((mapped, view))
        for off in range(0, size, slice_bytes):
            n = min(slice_bytes, size - off)
            slices.append((address + off, view[off : off + n], target[base + off : base + off + n]))
        base += size
    register_seconds = [0.0] * threads
    streams = [torch.cuda.Stream() for _ in range(threads)]

    def move(i: int) -> None:
        with torch.cuda.stream(streams[i]):
            for address, host, device in slices[i::threads]:
                t0 = time.perf_counter()
                status = cudart.cudaHostRegister(address, host.numel(), REGISTER_READ_ONLY)
                register_seconds[i] += time.perf_counter() - t0
                if int(status) != 0:
                    raise RuntimeError(f"cudaHostRegister failed: {status}")
                device.copy_(host, non_blocking=True)
        streams[i].synchronize()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(move, range(threads)))
    torch.cuda.synchronize()
    moved = time.perf_counter() - start
    t0 = time.perf_counter()
    for address, host, _ in slices:
        cudart.cudaHostUnregister(address)
    unregister = time.perf_counter() - t0
    maps.clear()
    return {"seconds_to_gpu": moved, "register_thread_seconds_max": max(register_seconds), "unregister": unregister}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.empty(1, device="cuda")
    rows = []

    def row(model: Path, method: str, seconds: float, total: int, **extra) -> None:
        rows.append({"model": model.name, "method": method, "seconds": round(seconds, 3),
                     "gb_per_s": round(total / 1e9 / seconds, 1), **extra})
        print(json.dumps(rows[-1]), flush=True)

    for model in args.models:
        warm(model)
        total = sum(size for _, size in files_of(model))
        target = torch.empty(total, dtype=torch.uint8, device="cuda")
        row(model, "pinned_to_gpu", pinned_to_gpu(total, target), total)
        for threads, chunk in ((8, 16 << 20), (16, 16 << 20), (16, 64 << 20)):
            row(model, "host_pread", host_pread(model, threads, chunk), total, threads=threads, chunk_mib=chunk >> 20)
        for readers, chunk in ((16, 16 << 20), (16, 32 << 20), (16, 64 << 20), (12, 32 << 20)):
            staged(model, target, readers, chunk)  # pins its staging memory outside the timed run
            row(model, "staged", staged(model, target, readers, chunk), total, readers=readers, chunk_mib=chunk >> 20)
        for threads, slice_bytes in ((16, 64 << 20),):
            try:
                parts = registered(model, target, threads, slice_bytes)
                row(model, "registered", parts.pop("seconds_to_gpu"), total, threads=threads,
                    slice_mib=slice_bytes >> 20, **{k: round(v, 3) for k, v in parts.items()})
            except Exception as e:  # noqa: BLE001 - a row that failed says why
                rows.append({"model": model.name, "method": "registered", "error": repr(e)[:300]})
                print(json.dumps(rows[-1]), flush=True)
        del target
        torch.cuda.empty_cache()
        for attempt in range(2):
            t0 = time.perf_counter()
            built = empty_model(model, torch.bfloat16, "cuda", False)
            torch.cuda.synchronize()
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            phases: dict[str, float] = {}
            size = stream_weights(built, model, timings=phases)
            row(model, "stream_weights", time.perf_counter() - t0, size, empty_model=round(build, 3), attempt=attempt,
                **{k: round(v, 3) for k, v in phases.items()})
            del built
            torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
