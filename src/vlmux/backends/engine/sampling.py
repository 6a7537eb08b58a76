"""The next token of each row from its logits, as `generate` picks it for vlmux's settings: the checkpoint's
repetition penalty, end-of-sequence tokens held off while `ignore_eos` (what `min_new_tokens` does there), then
greedy, or temperature, top-k and top-p sampling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmux.config import GenerationSpec

@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    eos: tuple[int, ...]
    ignore_eos: bool = False
    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def of(cls, gen: GenerationSpec, config: Any) -> Sampling:
        """gen: vlmux's settings; config: the checkpoint's GenerationConfig (eos tokens, penalty, top-k)."""
        eos = config.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(gen.max_new_tokens, eos, gen.ignore_eos, not gen.do_sample, gen.temperature,
                   config.top_k if gen.do_sample else None, gen.top_p, config.repetition_penalty or 1.0, gen.seed)

    @property
    def penalises(self) -> bool:
        return self.repetition_penalty != 1.0

    def finished(self, token: int, count: int) -> bool:
        """Whether a row ends with `token`, its `count`th answer token."""
        return count >= self.max_new_tokens or (not self.ignore_eos and token in self.eos)


def next_tokens(logits: torch.Tensor, sampling: Sampling, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (rows, vocab); seen: (rows, vocab) bool, the tokens each row holds (for the repetition penalty).
    Returns (rows,) token ids."""
    scores = logits.to(torch.float32)
    if seen is not None and sampling.penalises:
        penalty = sampling.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if sampling.ignore_eos and sampling.eos:
        scores[:, list(sampling.eos)] = -float("inf")
    if sampling.greedy:
        return scores.argmax(dim=-1)
    scores = scores / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if sampling.top_p < 1.0:
        ordered, order = scores.sort(dim=-1)
        tail = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        tail[:, -1] = False  # the likeliest token always stays
        scores = scores.masked_fill(tail.scatter(1, order, tail), -float("inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
