"""Tiny, randomly initialised vision-language models of real transformers architectures.

Everything is built offline: a byte-level BPE tokenizer trained on a built-in corpus (`tiny.text`), the
architecture's own processor classes and a model created from a small config. The written folder loads with
AutoProcessor / AutoModelForImageTextToText like a hub checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from vlmux.tiny import florence, gemma, idefics, internvl, llava, qwen
from vlmux.tiny.pictures import draw_sample_images
from vlmux.tiny.remote import build_remote_tiny
from vlmux.tiny.qwen import QWEN2_VL_SPECIALS, qwen2_vl_parts
from vlmux.tiny.text import VISION, Parts, TextDims, VisionDims

__all__ = ["ARCHITECTURES", "FAMILIES", "REMOTE_FAMILIES", "QWEN2_VL_SPECIALS", "TextDims", "VisionDims", "build_tiny",
           "draw_sample_images", "qwen2_vl_parts"]



@dataclass(frozen=True)
class Family:
    parts: Callable[[], Parts]  # the config, processor and generation config
    # Parameters the architecture initialises to zero (a fine-tuning start), which a random model must fill or its
    # output would not depend on the picture.
    zero_init: tuple[str, ...] = ()


# transformers' model_type -> how its tiny model is built.
_BUILDERS: dict[str, Family] = {
    "llava": Family(llava.llava), "qwen2_vl": Family(qwen.qwen2_vl), "idefics3": Family(idefics.idefics3),
    "qwen2_5_vl": Family(qwen.qwen2_5_vl), "qwen3_vl": Family(qwen.qwen3_vl),
    "llava_onevision": Family(llava.llava_onevision), "smolvlm": Family(idefics.smolvlm),
    "internvl": Family(internvl.internvl), "gemma3": Family(gemma.gemma3, zero_init=("mm_input_projection_weight",)),
    "florence2": Family(florence.florence2),
}
# The first three are what the wider test suite (loader, pool, prep) runs on; FAMILIES are all of them.
ARCHITECTURES: tuple[str, ...] = ("llava", "qwen2_vl", "idefics3")
FAMILIES: tuple[str, ...] = tuple(_BUILDERS)
# Models that ship their own code and load only with trust_remote_code (tiny/remote.py).
REMOTE_FAMILIES: tuple[str, ...] = ("internvl_chat",)


def build_tiny(out_dir: str | Path, arch: str = "llava", seed: int = 0) -> Path:
    """Write a tiny model of `arch` (one of FAMILIES or REMOTE_FAMILIES) to out_dir and return the path.

    Same seed, same bytes. Raises ValueError for an unknown arch.
    """
    if arch in REMOTE_FAMILIES:
        return build_remote_tiny(out_dir, seed)
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(FAMILIES + REMOTE_FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = _BUILDERS[arch]
    config, processor, generation = family.parts()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.rsplit(".", 1)[-1] in family.zero_init:
                    param.normal_(0.0, VISION.init_range)
    model.generation_config = generation
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
