"""The engine's frozen records: the language model's dimensions, read from the transformers config, and how a runner
sizes its cache and its decode batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Decode batch sizes with a captured CUDA graph; a batch between two runs in the larger one's graph.
GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class TextShape:
    """The dimensions of a Qwen2-VL-family language model."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    hidden_act: str

    @classmethod
    def from_config(cls, text: Any) -> TextShape:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
                   head_dim, text.rms_norm_eps, text.hidden_act)


@dataclass(frozen=True)
class EngineConfig:
    """How one runner is sized: its cache holds `slots` rows of `max_length` tokens each."""

    slots: int  # rows decoded together; more rows wait in a queue for a slot
    max_length: int  # prompt and answer tokens of one row
    cuda_graphs: bool = True  # on CUDA, decode steps replay captured graphs
    graph_sizes: tuple[int, ...] = GRAPH_SIZES

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_length < 2:
            raise ValueError(f"an engine needs at least one slot and two tokens per slot, not {self}")
