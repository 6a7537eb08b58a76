"""From the processor's batch to the engine's prompts: transformers' own vision tower turns pixel values into image
embeddings (and Qwen3-VL's deepstack features), transformers' own `get_rope_index` gives the 3-D positions and each
row's `rope_delta`; each row then loses its left padding. `pack` lays a group of prompts out right-padded for one
prefill."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IMAGE = 1  # mm_token_type_ids: 0 text, 1 image, 2 video


@dataclass(frozen=True)
class Prompt:
    """One row of a caption batch, ready for prefill."""

    embeds: torch.Tensor  # (tokens, hidden), the image's embeddings in place of its placeholder tokens
    positions: torch.Tensor  # (3, tokens): M-RoPE's temporal, height and width positions
    rope_delta: int  # an answer token's position is the row's length so far plus this
    token_ids: torch.Tensor  # the row as generate sees it, left padding included: what repetition penalty counts
    visual: torch.Tensor  # (tokens,) bool: the image's tokens
    deepstack: tuple[torch.Tensor, ...] = ()  # per deepstack layer, (image tokens, hidden) (Qwen3-VL)

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


@dataclass(frozen=True)
class PromptGroup:
    """Prompts right-padded to one length for one prefill."""

    embeds: torch.Tensor  # (rows, tokens, hidden)
    positions: torch.Tensor  # (3, rows, tokens)
    lengths: torch.Tensor  # (rows,)
    visual: torch.Tensor  # (rows, tokens) bool
    deepstack: tuple[torch.Tensor, ...]  # per layer, the visual tokens' features in `visual`'s order


@torch.inference_mode()
def prompts_from_inputs(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[Prompt]:
    """inputs: the processor's left-padded batch on the model's device (input_ids, attention_mask, pixel_values,
    image_grid_thw, mm_token_type_ids)."""
    base = model.model
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    embeds = base.get_input_embeddings()(ids)
    visual = ids == model.config.image_token_id
    deepstack: list[torch.Tensor] = []
    if inputs.get("pixel_values") is not None:
        grid = inputs["image_grid_thw"]
        features = base.get_image_features(inputs["pixel_values"], grid, return_dict=True)
        image_embeds = torch.cat(features.pooler_output).to(embeds.dtype)
        embeds = embeds.masked_scatter(visual.unsqueeze(-1), image_embeds)
        # per layer: all images' tokens in one tensor (transformers 5.17) or split per image (later 5.x)
        deepstack = [layer if isinstance(layer, torch.Tensor) else torch.cat(layer)
                     for layer in getattr(features, "deepstack_features", None) or ()]
        types = inputs.get("mm_token_type_ids")
        types = visual.int() * IMAGE if types is None else types
        positions, deltas = base.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask)
    else:  # text alone: 1-D positions on all three axes
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
        deltas = torch.zeros(ids.shape[0], 1, dtype=torch.long)
    counts = visual.sum(dim=1).tolist()
    starts = [sum(counts[:row]) for row in range(len(counts))]
    return [
        Prompt(embeds[row, mask[row]], positions[:, row, mask[row]], int(deltas[row]), ids[row], visual[row, mask[row]],
               tuple(layer[starts[row]:starts[row] + counts[row]] for layer in deepstack))
        for row in range(ids.shape[0])
    ]


def pack(prompts: Sequence[Prompt]) -> PromptGroup:
    first = prompts[0]
    rows, tokens = len(prompts), max(prompt.length for prompt in prompts)
    embeds = first.embeds.new_zeros(rows, tokens, first.embeds.shape[1])
    positions = first.positions.new_zeros(3, rows, tokens)
    visual = first.visual.new_zeros(rows, tokens)
    for row, prompt in enumerate(prompts):
        embeds[row, :prompt.length] = prompt.embeds
        positions[:, row, :prompt.length] = prompt.positions
        visual[row, :prompt.length] = prompt.visual
    lengths = torch.tensor([prompt.length for prompt in prompts], device=embeds.device)
    deepstack = tuple(torch.cat(layer) for layer in zip(*(prompt.deepstack for prompt in prompts)))
    return PromptGroup(embeds, positions, lengths, visual, deepstack)
