"""The engine's frozen records: the language model's dimensions, read from the transformers config, and how a runner
sizes its cache and its decode batches; which checkpoints it runs, read from their JSON alone (no torch: the parent
asks too, to pick decode `engine` for a caption job)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# transformers model_types the engine runs: their language models share one layout.
SUPPORTED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Logits processors `generate` would apply from a checkpoint's generation config that the engine does not: a model
# setting one is refused rather than answered differently.
UNSUPPORTED = ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
               "forced_bos_token_id", "forced_eos_token_id", "min_length", "min_new_tokens",
               "exponential_decay_length_penalty")

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


def unsupported_settings(generation: Mapping[str, Any]) -> list[str]:
    """The generation config's settings (generation_config.json's values) the engine cannot honour; [] if none."""
    found = [name for name in UNSUPPORTED if generation.get(name) not in (None, 0, [], ())]
    if (generation.get("num_beams") or 1) > 1:
        found.append("num_beams")
    return found


def family_refusal(model_type: str) -> str | None:
    """Why decode `engine` cannot run a model of this transformers model_type; None if it can."""
    return None if model_type in SUPPORTED else f"decode 'engine' runs {', '.join(SUPPORTED)}, not {model_type!r}"


def refusal(config: Mapping[str, Any], generation: Mapping[str, Any]) -> str | None:
    """Why decode `engine` cannot run a checkpoint, from its config.json and generation_config.json; None if it can."""
    family = family_refusal(config.get("model_type", ""))
    if family:
        return family
    if config.get("quantization_config"):
        return "decode 'engine' runs 16- and 32-bit weights only, not a quantised model"
    if (config.get("text_config") or config).get("use_sliding_window"):
        return "decode 'engine' has no sliding-window attention"
    settings = unsupported_settings(generation)
    if settings:
        return f"decode 'engine' cannot honour the model's generation settings {settings}"
    return None
