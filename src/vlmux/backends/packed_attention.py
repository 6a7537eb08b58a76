"""Vision attention over many images in one kernel call.

Qwen2-VL-style vision towers pack every image of a batch into one sequence and describe the images by `cu_seqlens`.
Without flash-attn, transformers then runs scaled-dot-product attention once per image per layer (a Python loop of
batch x depth calls: 8192 for 256 images through the 2B shape's 32 layers). Images resized to one size have equal
lengths, so their attention is one batched call: this groups equal-length spans and runs each group at once.

transformers sends the packed call (with `cu_seq_lens_q`) only to attention implementations whose name contains
"flash" (`is_flash_attention_requested`), hence the name under which this is registered. Only vision towers get it:
their attention is the one that passes `cu_seqlens`.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.nn import functional
from transformers import AttentionInterface, PreTrainedModel

NAME = "vlmux_flash_packed"


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
    output = query.new_empty(total, heads, head_dim)
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


def use_packed_vision_attention(model: PreTrainedModel) -> bool:
    """Switch the model's vision tower to packed attention when it has one that uses sdpa; True if switched."""
    vision = getattr(model.config, "vision_config", None)
    if vision is None or getattr(vision, "_attn_implementation", None) != "sdpa":
        return False
    if not _packs_images(model):
        return False
    AttentionInterface.register(NAME, packed_attention)
    vision._attn_implementation = NAME
    return True


def _packs_images(model: PreTrainedModel) -> bool:
    """Whether the vision tower's attention takes cu_seqlens: the packed-sequence style this serves."""
    import inspect

    for module in model.modules():
        name = type(module).__name__
        if "Vision" in name and name.endswith("Attention"):
            return "cu_seqlens" in inspect.signature(module.forward).parameters
    return False
