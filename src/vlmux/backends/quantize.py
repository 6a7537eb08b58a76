"""from_pretrained's quantisation arguments for `ModelSpec.quantize`, through transformers' own integrations, and the
package check for a pre-quantised checkpoint: both fail with the package and the extra to install, before loading.
`load_report` puts the cause of a weight conversion that failed into from_pretrained's error."""
from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlmux.estimate import read_json
from vlmux.quantization import KEEP_16BIT, QuantizationUnavailable, require_method, require_prequantized


def prequantized(path: str | Path) -> dict | None:
    """The checkpoint's own quantization_config (AWQ, GPTQ, bnb, fp8, ...), if it has one."""
    return read_json(Path(path) / "config.json").get("quantization_config")


def quantization_options(quantize: str | None, path: str | Path, dtype: torch.dtype,
                         device: str = "cuda") -> dict[str, Any]:
    """{"quantization_config": ...} for from_pretrained, or {} for a checkpoint loaded as it is."""
    stored = prequantized(path)
    if stored is not None:
        require_prequantized(stored)
        if quantize is not None:
            raise ValueError(f"--quantize {quantize}: this checkpoint is quantised already "
                             f"({stored.get('quant_method', 'unknown')}); load it without --quantize")
        _require_kernel(stored.get("quant_method"), device)
        return {}
    if quantize is None:
        return {}
    require_method(quantize)
    _require_kernel(quantize, device)
    return {"quantization_config": _config(quantize, dtype, device)}


def _config(quantize: str, dtype: torch.dtype, device: str) -> Any:
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
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    if quantize == "torchao-fp8":
        return TorchAoConfig(_float8(device), modules_to_not_convert=skip)
    return TorchAoConfig(_int4() if quantize == "torchao-int4" else Int8WeightOnlyConfig(), modules_to_not_convert=skip)


def _float8(device: str) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    # torch's scaled fp8 matmul needs CUDA 8.9+ (Ada, Hopper); elsewhere the weights stay fp8 and are widened per matmul.
    if device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 9):
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Float8WeightOnlyConfig()


def _int4() -> Any:
    from torchao.quantization import Int4WeightOnlyConfig

    # Recent torchao (0.18) packs "plain" by default, whose kernels are in the separate mslk package ("Requires mslk");
    # tinygemm's tile-packed layout runs on torch's own CUDA kernels, as older torchao's default layout did.
    if "int4_packing_format" in inspect.signature(Int4WeightOnlyConfig).parameters:
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    return Int4WeightOnlyConfig(group_size=128)


def _require_kernel(method: str | None, device: str) -> None:
    """transformers 5.x's fp8 layers multiply through a kernel fetched from the Hugging Face Hub by the `kernels`
    package, at the first forward: without it a model loads and then fails every caption. (On the CPU
    transformers refuses fp8, or dequantises a pre-quantised checkpoint on load.)"""
    if method != "fp8" or not device.startswith("cuda"):
        return
    try:
        from transformers.integrations.finegrained_fp8 import load_finegrained_fp8_kernel
    except ImportError:  # a transformers whose fp8 kernels are its own
        return
    try:
        load_finegrained_fp8_kernel()
    except Exception as e:  # noqa: BLE001 - no `kernels`, a wrong version, or offline with nothing cached
        raise QuantizationUnavailable(
            f"fp8 needs transformers' FP8 matmul kernel (kernels-community/finegrained-fp8, fetched from the Hugging "
            f"Face Hub by the `kernels` package and cached), which did not load here: {e}. Install `kernels` and "
            f"load once with the Hub reachable, or use --quantize torchao-fp8 (fp8 with nothing fetched), 4bit or "
            f"torchao-int8") from e


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FAILED_KEY = re.compile(r"^(\S.*?)\s*\|\s*CONVERSION\s*\|", re.M)
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*: \S")  # "ImportError: ...", not a traceback's frames


class _Report(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "LOAD REPORT" in message:
            self.text = _ANSI.sub("", message)


def _causes(report: str) -> list[str]:
    """Each entry's exception: the last "Type: message" line before the "Error ... destined for" line that ends it
    (earlier ones are exceptions it was raised while handling)."""
    causes, last = [], None
    for line in report.splitlines():
        if line.startswith("Error") and last:
            causes.append(last)
        elif _EXCEPTION_LINE.match(line):
            last = line
    return list(dict.fromkeys(causes or ([last] if last else [])))


@contextlib.contextmanager
def load_report() -> Iterator[None]:
    """transformers 5.x logs a failed weight conversion's traceback in a report and raises "look at the CONVERSION
    entries of the above report", which a worker's caller never sees: the error says which weights and why."""
    report, logger = _Report(), logging.getLogger("transformers")
    logger.addHandler(report)
    try:
        yield
    except RuntimeError as e:
        keys = _FAILED_KEY.findall(report.text)
        if "CONVERSION" not in str(e) or not keys:
            raise
        causes = _causes(report.text)[:3]
        more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
        raise RuntimeError(f"transformers could not convert {keys[0]}{more} on load: "
                           f"{'; '.join(causes) or report.text[-500:]}") from e
    finally:
        logger.removeHandler(report)
