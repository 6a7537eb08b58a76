"""Getting a spare worker ready before it is given a model: the CUDA context, pinned staging memory, the models'
kernels run once on one-layer copies, their structure prebuilt, their checkpoints pinned where host memory allows."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

from vlmux.backends.loader import StreamConfig, prebuild, staging_buffers
from vlmux.backends.pinned import PinFailed, pin_checkpoint
from vlmux.backends.transformers import WARM_UP, TransformersBackend, resolve_device, resolve_dtype
from vlmux.config import ModelSpec


def warm_up(spec: ModelSpec, path: str, pin_weights: bool = False) -> dict[str, float]:
    """Make this process ready to load `path` fast: create the CUDA context, pin the loader's staging memory, and
    caption once with a one-layer copy of the model (uninitialised weights) so that its kernels, library handles
    and first-call Python paths are loaded. Everything but the context, the staging memory and the loaded kernels
    is freed again. A fresh worker otherwise spends most of its first answer on this (docs/BENCHMARKS.md).
    pin_weights: also pin the checkpoint's page-cache pages (`backends.pinned`), where host memory allows."""
    start = time.perf_counter()
    device = resolve_device(spec.device)
    if not device.startswith("cuda"):
        return {}
    torch.empty(1, device=device)
    timings = {"cuda_init": time.perf_counter() - start}
    staging_buffers(StreamConfig())
    try:
        shallow = TransformersBackend(spec, path, shallow=True)
    except Exception:  # noqa: BLE001 - remote code, quantised: the context and staging memory still help
        return timings
    try:
        shallow.caption([Image.new("RGB", (448, 448), (128, 128, 128))], ["Describe the image."], WARM_UP)
    finally:
        shallow.close()
    timings["kernels"] = time.perf_counter() - start - timings["cuda_init"]
    try:
        prebuild(Path(path), resolve_dtype(spec.dtype, device), spec.trust_remote_code)
    except Exception:  # noqa: BLE001 - remote code, quantised, anything else: the load builds it itself
        pass
    if pin_weights:
        begin = time.perf_counter()
        try:
            timings["pinned_gb"] = pin_checkpoint(Path(path)) / 1e9
        except PinFailed:  # the load streams through staging buffers instead
            timings["pinned_gb"] = 0.0
        timings["pin"] = time.perf_counter() - begin
    return timings
