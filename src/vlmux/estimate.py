"""How much device memory a model will take, from its safetensors headers, config and processor config, before
loading it: the pool's placement and budget use it, and a worker picks its batch size from the same per-image cost.
bench/memory.py checks it against the measured peak on a GPU."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from vlmux.checkpoint import read_index
from vlmux.quantization import METHODS, Method, weight_bytes

TARGET_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
CONTEXT_BYTES = 620 * 1024 * 1024  # a CUDA context with torch's kernels loaded, as measured (docs/BENCHMARKS.md)
IMAGE_TOKENS = 1024  # visual tokens per image where the processor does not bound them (896x896 on Qwen2-VL)
PROMPT_TOKENS = 64
MAX_AUTO_BATCH = 256  # images per batch an auto size stops at: larger batches gained nothing (docs/BENCHMARKS.md)


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    activations: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.context


@dataclass(frozen=True)
class ImageBudget:
    """Per image: the tokens it adds to the language model's sequence, and the vision encoder's positions."""

    tokens: int
    patches: int


def count_parameters(model_dir: Path) -> tuple[int, int]:
    """(parameters, bytes on disk) from the safetensors headers."""
    entries = read_index(model_dir).values()
    return sum(e.numel for e in entries), sum(e.end - e.start for e in entries)


def estimate(model_dir: Path, dtype: str, batch_size: int, max_new_tokens: int, on_gpu: bool = True,
             quantize: str | None = None) -> Estimate:
    """quantize: a `--quantize` method (vlmux.quantization.METHODS) applied on load; a pre-quantised checkpoint's
    packed weights count as stored without it."""
    element = TARGET_BYTES.get(dtype, 2)
    method = METHODS[quantize] if quantize else None
    weights = weight_bytes(read_index(model_dir), element, method)
    config = read_json(Path(model_dir) / "config.json")
    kv_cache, activations = image_bytes(config, image_budget(model_dir, config), max_new_tokens, element,
                                        method if on_gpu else None)
    return Estimate(weights, kv_cache * batch_size, activations * batch_size, CONTEXT_BYTES if on_gpu else 0)


def image_bytes(config: dict, budget: ImageBudget, max_new_tokens: int, element: int,
                quantized: Method | None = None) -> tuple[int, int]:
    """(KV cache, activations) one more image in a batch costs. Activations: the prefill's hidden- and MLP-sized
    tensors per token, and the vision encoder's per position (its rotary and attention scratch in float32); with a
    quantisation on a GPU, its copies of the widest matmul input (the MLP's down projection)."""
    text = text_config(config)
    # BART-style names (Florence-2's decoder) where the Llama-style ones are missing.
    layers = text.get("num_hidden_layers") or text.get("decoder_layers", 0)
    hidden = text.get("hidden_size") or text.get("d_model", 0)
    heads = text.get("num_attention_heads") or text.get("decoder_attention_heads") or 1
    kv_heads = text.get("num_key_value_heads", heads) or heads
    head_dim = text.get("head_dim") or hidden // heads
    prompt = budget.tokens + PROMPT_TOKENS
    kv_cache = 2 * layers * kv_heads * head_dim * (prompt + max_new_tokens) * element
    intermediate = text.get("intermediate_size") or text.get("decoder_ffn_dim") or 4 * hidden
    prefill = prompt * (4 * hidden + 3 * intermediate) * element
    if quantized is not None:
        prefill += prompt * quantized.padded(intermediate) * quantized.input_bytes
    vision = config.get("vision_config") or {}
    embed = _last(vision.get("embed_dim") or vision.get("hidden_size", 0))  # DaViT (Florence-2): per stage
    mlp = vision.get("intermediate_size") or int(embed * vision.get("mlp_ratio", 4))
    encoder = budget.patches * (6 * embed + 2 * mlp) * 4
    return kv_cache, prefill + encoder


def image_budget(model_dir: Path, config: dict | None = None) -> ImageBudget:
    """What one image costs in tokens, from the processor's own bounds where it has them."""
    config = config if config is not None else read_json(Path(model_dir) / "config.json")
    processor = read_json(Path(model_dir) / "processor_config.json")
    images = processor.get("image_processor") or read_json(Path(model_dir) / "preprocessor_config.json")
    vision = config.get("vision_config") or {}
    if "merge_size" in images and "patch_size" in images:  # Qwen2-VL family: resized to at most max_pixels
        size = images.get("size") or {}
        pixels = images.get("max_pixels") or size.get("longest_edge")
        patches = pixels // images["patch_size"] ** 2 if pixels else 0
        tokens = patches // images["merge_size"] ** 2
        if 0 < tokens <= 4 * IMAGE_TOKENS:
            return ImageBudget(tokens, patches)
        return ImageBudget(IMAGE_TOKENS, IMAGE_TOKENS * images["merge_size"] ** 2)
    side = _first(vision.get("image_size") or 0) // _first(vision.get("patch_size") or 1)
    per_image = config.get("image_seq_length") or config.get("mm_tokens_per_image") or images.get("image_seq_length")
    if per_image:  # InternVL (tiles of image_seq_length tokens, and a thumbnail), Gemma 3 (a fixed count)
        tiles = images.get("max_patches", 0) + 1 if images.get("crop_to_patches") else 1
        return ImageBudget(per_image * tiles, (side * side or per_image) * tiles)
    pinpoints = config.get("image_grid_pinpoints")
    if pinpoints and side:  # LLaVA-OneVision / -NeXT: the largest grid of tiles, and the whole picture as one more
        tile = _first(vision.get("image_size"))
        tiles = max(h * w for h, w in pinpoints) // tile**2 + 1
        return ImageBudget(side * side * tiles, side * side * tiles)
    if "image_seq_len" in processor:  # Idefics3: up to a grid of tiles plus the whole image, each image_seq_len tokens
        longest = (images.get("size") or {}).get("longest_edge", 0)
        tile = (images.get("max_image_size") or {}).get("longest_edge") or longest or 1
        tiles = math.ceil(longest / tile) ** 2 + 1 if longest and images.get("do_image_splitting", True) else 1
        return ImageBudget(processor["image_seq_len"] * tiles, side * side * tiles or IMAGE_TOKENS)
    if side:  # one fixed-size image (LLaVA with CLIP): a token per patch and the class token
        return ImageBudget(side * side + 1, side * side + 1)
    return ImageBudget(IMAGE_TOKENS, IMAGE_TOKENS)


def _first(value: int | list[int]) -> int:
    """A size given as one number, or as [height, width] (InternVL's vision config)."""
    return value[0] if isinstance(value, (list, tuple)) else value


def _last(value: int | list[int]) -> int:
    return value[-1] if isinstance(value, (list, tuple)) else value


def text_config(config: dict) -> dict:
    return config.get("text_config") or config.get("llm_config") or config


def context_length(model_dir: Path) -> int | None:
    """Tokens the language model takes at most (its max_position_embeddings), or None where its config says none."""
    text = text_config(read_json(Path(model_dir) / "config.json"))
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
