"""from_pretrained's quantisation arguments for `ModelSpec.quantize`, through transformers' own integrations, and the
package check for a pre-quantised checkpoint: both fail with the package and the extra to install, before loading."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmux.estimate import read_json
from vlmux.quantization import KEEP_16BIT, require_method, require_prequantized


def prequantized(path: str | Path) -> dict | None:
    """The checkpoint's own quantization_config (AWQ, GPTQ, bnb, fp8, ...), if it has one."""
    return read_json(Path(path) / "config.json").get("quantization_config")


def quantization_options(quantize: str | None, path: str | Path, dtype: torch.dtype) -> dict[str, Any]:
    """{"quantization_config": ...} for from_pretrained, or {} for a checkpoint loaded as it is."""
    stored = prequantized(path)
    if stored is not None:
        require_prequantized(stored)
        if quantize is not None:
            raise ValueError(f"--quantize {quantize}: this checkpoint is quantised already "
                             f"({stored.get('quant_method', 'unknown')}); load it without --quantize")
        return {}
    if quantize is None:
        return {}
    require_method(quantize)
    return {"quantization_config": _config(quantize, dtype)}


def _config(quantize: str, dtype: torch.dtype) -> Any:
    # transformers 5.x matches these from the start of a module's name, as regexes or suffixes (older ones as
    # substrings): each name as it is, and as a regex for a module of that name anywhere in the model.
    skip = [*KEEP_16BIT, *(rf"(?:.*\.)?{name}" for name in KEEP_16BIT)]
    if quantize in ("4bit", "8bit"):
        from transformers import BitsAndBytesConfig

        if quantize == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skip)
    if quantize == "fp8":
        from transformers import FineGrainedFP8Config

        return FineGrainedFP8Config(modules_to_not_convert=skip)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    method = Int4WeightOnlyConfig(group_size=128) if quantize == "torchao-int4" else Int8WeightOnlyConfig()
    return TorchAoConfig(method, modules_to_not_convert=skip)
