"""The language model of Qwen2-VL, Qwen2.5-VL and Qwen3-VL, built from a loaded transformers model's own weight
tensors: queries, keys and values in one matrix, gate and up in another (one matmul each instead of three and two),
RMSNorm, M-RoPE through the model's own rotary module, and attention over the engine's KV cache."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional
from transformers.activations import ACT2FN

from vlmux.backends.engine.cache import KVCache
from vlmux.backends.engine.config import TextShape


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2RMSNorm, operation for operation: greedy answers must not drift from generate's."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (rows, heads, tokens, head_dim); cos, sin: (rows, tokens, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def fused(linears: Sequence[torch.nn.Linear], name: str = "weight") -> torch.Tensor | None:
    """The linears' weights (or biases) stacked in one tensor. Each linear's own parameter becomes a view of it, so
    the transformers model (chat still runs through it) and the engine share the memory instead of holding two."""
    parts = [getattr(linear, name) for linear in linears]
    if any(part is None for part in parts):
        return None
    whole = torch.cat([part.data for part in parts])
    start = 0
    for part in parts:
        part.data = whole[start:start + part.shape[0]]
        start += part.shape[0]
    return whole


@dataclass
class Attention:
    shape: TextShape
    index: int  # the layer's number: its place in the cache
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3-VL normalises each head's queries and keys
    k_norm: torch.Tensor | None

    @classmethod
    def of(cls, shape: TextShape, index: int, module: torch.nn.Module) -> Attention:
        projections = (module.q_proj, module.k_proj, module.v_proj)
        q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        out = module.o_proj
        return cls(shape, index, fused(projections), fused(projections, "bias"), out.weight, out.bias,
                   None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight)

    def heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (rows, tokens, hidden) -> rotated queries and keys, values: (rows, heads, tokens, head_dim)."""
        rows, tokens, _ = x.shape
        s = self.shape
        sizes = (s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim)
        projected = functional.linear(x, self.qkv, self.qkv_bias).split(sizes, -1)
        q, k, v = (t.view(rows, tokens, -1, s.head_dim) for t in projected)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, s.eps), rms_norm(k, self.k_norm, s.eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache,
                slots: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x, cos, sin)
        cache.write_prompts(self.index, slots, k, v)
        attended = functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return functional.linear(attended.transpose(1, 2).reshape(*x.shape[:2], -1), self.out, self.out_bias)

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache,
               at: torch.Tensor, kv_length: int) -> torch.Tensor:
        """One token per row: the query heads of a group stand in for query positions of their key/value head, so
        the cache is read once per group and never expanded."""
        rows, s = x.shape[0], self.shape
        q, k, v = self.heads(x, cos, sin)
        cache.append(self.index, at, k, v)
        keys, values = cache.prefix(self.index, rows, kv_length)
        grouped = q.reshape(rows, s.kv_heads, s.heads // s.kv_heads, s.head_dim)
        attended = functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        return functional.linear(attended.reshape(rows, 1, -1), self.out, self.out_bias)


@dataclass
class MLP:
    gate_up: torch.Tensor
    down: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, shape: TextShape, module: torch.nn.Module) -> MLP:
        return cls(fused((module.gate_proj, module.up_proj)), module.down_proj.weight, ACT2FN[shape.hidden_act])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = functional.linear(x, self.gate_up).chunk(2, dim=-1)
        return functional.linear(self.act(gate) * up, self.down)


@dataclass
class DecoderLayer:
    attention: Attention
    mlp: MLP
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache,
                slots: torch.Tensor) -> torch.Tensor:
        x = x + self.attention.prefill(rms_norm(x, self.input_norm, self.eps), cos, sin, mask, cache, slots)
        return x + self.mlp(rms_norm(x, self.post_norm, self.eps))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache,
               at: torch.Tensor, kv_length: int) -> torch.Tensor:
        x = x + self.attention.decode(rms_norm(x, self.input_norm, self.eps), cos, sin, mask, cache, at, kv_length)
        return x + self.mlp(rms_norm(x, self.post_norm, self.eps))


class LanguageModel:
    """The decoder stack, its embeddings and head; `prefill` and `decode` run it over the engine's cache."""

    def __init__(self, shape: TextShape, embed: torch.Tensor, layers: list[DecoderLayer], norm: torch.Tensor,
                 head: torch.Tensor, rotary: torch.nn.Module) -> None:
        self.shape, self.embed, self.layers = shape, embed, layers
        self.norm, self.head, self.rotary = norm, head, rotary

    @classmethod
    def from_transformers(cls, model: torch.nn.Module) -> LanguageModel:
        text = model.model.language_model
        shape = TextShape.from_config(text.config)
        layers = [DecoderLayer(Attention.of(shape, index, layer.self_attn), MLP.of(shape, layer.mlp),
                               layer.input_layernorm.weight, layer.post_attention_layernorm.weight, shape.eps)
                  for index, layer in enumerate(text.layers)]
        return cls(shape, text.embed_tokens.weight, layers, text.norm.weight, model.lm_head.weight, text.rotary_emb)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, cache: KVCache,
                slots: torch.Tensor, visual: torch.Tensor | None = None,
                deepstack: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Right-padded prompts: embeds (rows, tokens, hidden), positions (3, rows, tokens), their true lengths;
        their keys and values go to `slots` of the cache. deepstack: visual features added to the `visual` tokens'
        hidden states after the first layers (Qwen3-VL). Returns the logits after each prompt's last token."""
        rows, tokens, _ = embeds.shape
        index = torch.arange(tokens, device=embeds.device)
        causal = index[None, :] <= index[:, None]
        mask = (causal[None] & (index[None, :] < lengths[:, None])[:, None, :]).unsqueeze(1)
        cos, sin = self.rotary(embeds, positions)
        hidden = embeds
        for number, layer in enumerate(self.layers):
            hidden = layer.prefill(hidden, cos, sin, mask, cache, slots)
            if number < len(deepstack):
                hidden[visual] = hidden[visual] + deepstack[number].to(hidden.dtype)
        last = hidden[torch.arange(rows, device=embeds.device), lengths - 1]
        return self.logits(last)

    def decode(self, tokens: torch.Tensor, at: torch.Tensor, rope_positions: torch.Tensor, cache: KVCache,
               kv_length: int) -> torch.Tensor:
        """One new token for each of the first rows of the cache: `at` is where its key and value go (the row's
        length so far), `rope_positions` its position (the same on all three M-RoPE axes once the image is behind).
        Attends to the first `kv_length` cache positions. Returns (rows, vocab) logits."""
        rows = tokens.shape[0]
        hidden = functional.embedding(tokens, self.embed).unsqueeze(1)
        cos, sin = self.rotary(hidden, rope_positions.view(1, rows, 1).expand(3, rows, 1))
        mask = (torch.arange(kv_length, device=tokens.device)[None, :] <= at[:, None]).view(rows, 1, 1, kv_length)
        for layer in self.layers:
            hidden = layer.decode(hidden, cos, sin, mask, cache, at, kv_length)
        return self.logits(hidden[:, 0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return functional.linear(rms_norm(hidden, self.norm, self.shape.eps), self.head)
