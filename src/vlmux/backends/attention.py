"""Attention functions for caption batches, registered with transformers' AttentionInterface.

Packed vision attention. Qwen2-VL-style vision towers pack every image of a batch into one sequence and describe the images by `cu_seqlens`.
Without flash-attn, transformers then runs scaled-dot-product attention once per image per layer (a Python loop of
batch x depth calls: 8192 for 256 images through the 2B shape's 32 layers). Images resized to one size have equal
lengths, so their attention is one batched call: this groups equal-length spans and runs each group at once.

transformers sends the packed call (with `cu_seq_lens_q`) only to attention implementations whose name contains
"flash" (`is_flash_attention_requested`), hence the name under which this is registered. Only vision towers get it:
their attention is the one that passes `cu_seqlens`.

Grouped-query decode attention. With a padding mask (any batch of prompts of different lengths), transformers'
sdpa path copies every layer's keys and values once per query head group before each decode step (`repeat_kv`),
most of a large batch's step (docs/BENCHMARKS.md). One query token per row lets the query heads of a group stand in
for query positions instead, over the unexpanded cache (newer transformers do the same outside torch.compile).
"""
from __future__ import annotations

import inspect
from collections import defaultdict

import torch
from torch.nn import functional
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "vlmux_flash_packed"
DECODE_NAME = "vlmux_sdpa_gqa"


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query, key, value: (1, heads, total, head_dim) holding the spans `cu_seq_lens_q` bounds; returns the
    attention output as (1, total, heads, head_dim), as transformers' attention functions do."""
    if query.shape[0] != 1 or attention_mask is not None or cu_seq_lens_q is None:
        raise ValueError(f"{NAME} serves packed vision attention only (one packed row, cu_seqlens, no mask)")
    bounds = cu_seq_lens_q.tolist()
    groups: dict[int, list[int]] = defaultdict(list)
    for start, end in zip(bounds, bounds[1:]):
        groups[end - start].append(start)
    heads, total, head_dim = query.shape[1:]
    if len(groups) == 1:  # every image the same size: the packed sequence is already (spans x length), a view
        (length, starts), = groups.items()
        q, k, v = (t[0].view(heads, len(starts), length, head_dim).transpose(0, 1) for t in (query, key, value))
        attended = functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        return attended.transpose(1, 2).reshape(1, total, heads, head_dim), None
    output = query.new_empty(total, heads, head_dim)
    for length, starts in groups.items():
        index = torch.tensor(starts, device=query.device).unsqueeze(1) + torch.arange(length, device=query.device)
        q, k, v = (t[0][:, index].transpose(0, 1) for t in (query, key, value))  # (spans, heads, length, head_dim)
        attended = functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        output[index] = attended.transpose(1, 2)  # (spans, length, heads, head_dim)
    return output.unsqueeze(0), None


def grouped_query_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except one query token per row over fewer key/value heads: then the query heads
    of each group are laid out as query positions of their key/value head. Returns (batch, 1, heads, head_dim)."""
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or kv_heads == heads or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    grouped = query.view(batch, kv_heads, heads // kv_heads, head_dim)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None  # (batch, 1, 1, keys)
    output = functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(batch, 1, heads, head_dim), None


def use_fast_attention(model: PreTrainedModel, packed_vision: bool) -> list[str]:
    """Switch the model's sdpa attention to the functions above where they apply; returns what was switched.
    packed_vision: only with compiled vision blocks; eagerly, the per-image loop measured faster
    (docs/BENCHMARKS.md)."""
    switched = []
    vision = getattr(model.config, "vision_config", None)
    if packed_vision and vision is not None and getattr(vision, "_attn_implementation", None) == "sdpa" and _packs_images(model):
        AttentionInterface.register(NAME, packed_attention)
        vision._attn_implementation = NAME
        switched.append("vision")
    text = model.config.get_text_config()
    if getattr(text, "_attn_implementation", None) == "sdpa":
        AttentionInterface.register(DECODE_NAME, grouped_query_attention)
        AttentionMaskInterface.register(DECODE_NAME, sdpa_mask)  # the masks sdpa gets, built the same way
        text._attn_implementation = DECODE_NAME
        switched.append("text")
    return switched


def _packs_images(model: PreTrainedModel) -> bool:
    """Whether the vision tower's attention takes cu_seqlens: the packed-sequence style this serves."""
    for module in model.modules():
        name = type(module).__name__
        if "Vision" in name and name.endswith("Attention"):
            return "cu_seqlens" in inspect.signature(module.forward).parameters
    return False
