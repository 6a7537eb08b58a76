"""The fast caption path: transformers' static KV cache and compiled decode step, fixed batch shapes so the compile
is paid once per worker, the largest batch the memory budget holds, and host-side inputs made ready off the GPU's
path.

What transformers offers and why this uses it as it does:
- `cache_implementation="static"` + `compile_config`: `generate` then compiles the decode step (CUDA graphs with
  mode "reduce-overhead") and keeps the prefill eager. Every new batch size or cache length is a new graph, so
  batches are padded to one size and the cache length is rounded up to a bucket (`max_cache_len`, which also
  makes later calls with shorter prompts reuse the graph).
- Continuous batching (`generate_batch`, `init_continuous_batching`) takes token ids only, with 1-D positions:
  no `pixel_values`, no M-RoPE, so it cannot caption with a VLM (checked in transformers 5.17 and 5.24).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")

CACHE_BUCKET = 64  # tokens: a prompt a few tokens longer than the last must not cost a recompile
MEMORY_SHARE = 0.8  # of the free memory after loading, the rest for the allocator's fragmentation and spikes


@dataclass(frozen=True)
class FastConfig:
    static_cache: bool
    compile: bool
    engine: bool = False  # vlmux's own runner (backends/engine/) instead of generate, for captions
    vision_compiled: bool = False  # the vision tower's blocks compiled, their attention packed (compile_vision_blocks)

    @classmethod
    def for_device(cls, mode: str, device: str) -> "FastConfig":
        if mode == "auto":
            # A compile or a graph capture stalls a worker's first batch far longer than an answer takes: a model
            # switch's first answer must not pay it. Caption jobs ask for "engine" or "compiled"
            # (caption.plan.job_decode).
            mode = "dynamic"
        # The engine compiles the vision tower on a GPU only: on the CPU (the tests) the compile would cost more
        # than the tower's time it saves.
        vision = mode == "compiled" or (mode == "engine" and device.startswith("cuda"))
        return cls(static_cache=mode in ("static", "compiled"), compile=mode == "compiled", engine=mode == "engine",
                   vision_compiled=vision)

    @property
    def pads_batches(self) -> bool:
        return self.compile  # eager code runs any batch size at no extra cost


def cache_length(prompt_length: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    need = prompt_length + max_new_tokens
    return -(-need // bucket) * bucket


def generate_options(config: FastConfig, prompt_length: int, max_new_tokens: int) -> dict[str, Any]:
    """Keyword arguments for `generate` that select the static cache and the compiled decode step."""
    if not config.static_cache:
        return {}
    options: dict[str, Any] = {
        "cache_implementation": "static",
        "max_cache_len": cache_length(prompt_length, max_new_tokens),
    }
    if config.compile:
        from transformers import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # CPU too when asked: how the tests check the compiled path
        options["compile_config"] = compile_config
    else:
        options["disable_compile"] = True  # generate would otherwise compile a static cache on CUDA by itself
    return options


def pad_rows(items: Sequence[T], size: int) -> list[T]:
    """`items` repeated at the end up to `size` rows, so a short last batch reuses the compiled graph."""
    return list(items) + [items[-1]] * max(0, size - len(items))


def fitting_batch(image_bytes: int, free_bytes: int, budget: int | None) -> int:
    """The most images of `image_bytes` each that the budget holds, within MEMORY_SHARE of the free device memory;
    budget None: free memory alone bounds it. 0 when not even one image fits."""
    room = int(free_bytes * MEMORY_SHARE) if budget is None else min(budget, int(free_bytes * MEMORY_SHARE))
    return max(0, room) // max(1, image_bytes)


def compile_vision_blocks(model: torch.nn.Module) -> int:
    """torch.compile each block of the vision tower, fusing its elementwise work (rotary embedding in float32, casts,
    activations), where the eager tower spends its time. The blocks share one compiled graph, so the compile (once per
    worker and batch shape) costs one block's. Returns how many."""
    tower = next((getattr(holder, name) for holder in (getattr(model, "model", None), model) if holder is not None
                  for name in ("visual", "vision_tower", "vision_model") if hasattr(holder, name)), None)
    if tower is None:
        return 0
    blocks = next((m for m in tower.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1), None)
    if blocks is None:
        return 0
    for block in blocks:
        block.compile()
    return len(blocks)


def prepare_compile() -> None:
    """Before the first compile in this worker. Inductor's on-disk caches go under the user's cache folder, so a new
    worker for the same model and batch shape reuses the kernels an earlier one compiled instead of compiling again
    (/tmp may be wiped between boots). A compile that fails (no C++ compiler, an unsupported op) runs that code
    eagerly instead, with dynamo's warning: captions come out either way, as with decode "dynamic"."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmux" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True


def to_device(inputs: Any, device: str, dtype: torch.dtype) -> Any:
    """Host inputs in the model's dtype and pinned, so the copy to the GPU is one fast asynchronous transfer; run on
    the preparing thread, it costs the GPU nothing."""
    inputs = inputs.to(dtype=dtype)  # BatchFeature casts floating tensors only
    if device.startswith("cuda"):
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                inputs[key] = value.pin_memory()
    return inputs
