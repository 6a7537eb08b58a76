"""How much device memory a model will take, from its safetensors headers and config, before loading it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlmux.checkpoint import read_index

TARGET_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
CONTEXT_BYTES = 620 * 1024 * 1024  # a CUDA context with torch's kernels loaded, measured on the H200
IMAGE_TOKENS = 1024  # visual tokens per image budgeted for (896x896 on Qwen2-VL; most models use fewer)
PROMPT_TOKENS = 64


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    activations: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.context


def count_parameters(model_dir: Path) -> tuple[int, int]:
    """(parameters, bytes on disk) from the safetensors headers."""
    entries = read_index(model_dir).values()
    return sum(e.numel for e in entries), sum(e.end - e.start for e in entries)


def estimate(model_dir: Path, dtype: str, batch_size: int, max_new_tokens: int, on_gpu: bool = True) -> Estimate:
    parameters, stored = count_parameters(model_dir)
    element = TARGET_BYTES.get(dtype, 2)
    weights = parameters * element if parameters else stored
    text = _text_config(model_dir)
    layers = text.get("num_hidden_layers", 0)
    hidden = text.get("hidden_size", 0)
    heads = text.get("num_attention_heads", 1) or 1
    kv_heads = text.get("num_key_value_heads", heads) or heads
    head_dim = text.get("head_dim") or hidden // heads
    sequence = IMAGE_TOKENS + PROMPT_TOKENS + max_new_tokens
    kv_cache = 2 * layers * kv_heads * head_dim * sequence * batch_size * element
    # Prefill holds a few hidden-sized and one MLP-sized activation per token at a time.
    intermediate = text.get("intermediate_size", 4 * hidden)
    activations = batch_size * sequence * (4 * hidden + 2 * intermediate) * element
    return Estimate(weights, kv_cache, activations, CONTEXT_BYTES if on_gpu else 0)


def _text_config(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config.get("text_config") or config.get("llm_config") or config
