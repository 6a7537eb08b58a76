"""Quantisation, torch-free: the methods `--quantize` offers, the packages they and pre-quantised checkpoints need
(with the extra that installs them), the layers kept in 16 bits, and what the weights then take in memory."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from vlmux.checkpoint import TensorEntry


@dataclass(frozen=True)
class Method:
    """One way to quantise a 16-bit checkpoint on load, through a transformers integration."""

    package: str | None  # the import name it needs beyond transformers; None: none
    extra: str | None  # pip install 'vlmux[extra]'
    bits: int  # per quantised weight
    group: int  # weights per scale (0: one scale per output row)
    scale_bytes: int  # per scale, zero point included
    summary: str
    columns_multiple: int = 1  # a weight's input columns are padded to a multiple of this (a kernel's tile)
    input_bytes: int = 0  # on a GPU: transient bytes per element of a matmul's input (its quantised or padded copies)

    def padded(self, columns: int) -> int:
        return -(-columns // self.columns_multiple) * self.columns_multiple


# --quantize NAME -> how. Group sizes and scale widths as the integrations store them (docs: bnb absmax per 64 in
# float32, LLM.int8 a float32 per row, fine-grained fp8 a float32 per 128x128 block, torchao a bf16 scale and zero
# point per group).
METHODS: dict[str, Method] = {
    "4bit": Method("bitsandbytes", "bnb", 4, 64, 4, "bitsandbytes NF4, bf16 compute"),
    "8bit": Method("bitsandbytes", "bnb", 8, 0, 4, "bitsandbytes LLM.int8"),
    "fp8": Method(None, None, 8, 128 * 128, 4,
                  "transformers' fine-grained FP8 (CUDA, compute capability 8.9+, its Hub kernel through `kernels`)"),
    # tinygemm pads the input columns to 1024 and multiplies a padded bf16 copy of each input.
    "torchao-int4": Method("torchao", "torchao", 4, 128, 4, "torchao int4 weight-only (CUDA)", 1024, 2),
    "torchao-int8": Method("torchao", "torchao", 8, 0, 2, "torchao int8 weight-only (CPU and CUDA)"),
    # Its eager dynamic quantisation holds each input three times in float32 (widened, scaled, clamped) and once in fp8.
    "torchao-fp8": Method("torchao", "torchao", 8, 0, 4, "torchao float8, a float32 scale per row: weights and "
                          "activations on CUDA (compute capability 8.9+), weights only on the CPU", 1, 13),
}
# A pre-quantised checkpoint's quantization_config.quant_method -> (the import name it needs, the extra).
PREQUANTIZED: dict[str, tuple[str | None, str | None]] = {
    "awq": ("awq", "awq"), "gptq": ("gptqmodel", "gptq"), "compressed-tensors": ("compressed_tensors", "compressed-tensors"),
    "bitsandbytes": ("bitsandbytes", "bnb"), "torchao": ("torchao", "torchao"), "fp8": (None, None),
}
# Modules left in 16 bits: the vision tower and projector (small, and sensitive to rounding), the embeddings and the
# output head. Matched as parts of a module's name; the integrations take the same list.
KEEP_16BIT: tuple[str, ...] = ("lm_head", "embed_tokens", "visual", "vision_tower", "vision_model", "vision_embed",
                               "multi_modal_projector", "mlp1", "image_projection")


class QuantizationUnavailable(RuntimeError):
    """A package this quantisation needs is not installed; the message names it and the extra that installs it."""


def require(package: str | None, extra: str | None, what: str) -> None:
    if package is not None and importlib.util.find_spec(package) is None:
        raise QuantizationUnavailable(f"{what} needs the {package!r} package, which is not installed here: "
                                      f"pip install 'vlmux[{extra}]'")


def require_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown quantisation {name!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    require(method.package, method.extra, f"--quantize {name}")
    return method


def require_prequantized(quantization_config: dict) -> None:
    kind = str(quantization_config.get("quant_method", "unknown"))
    package, extra = PREQUANTIZED.get(kind, (None, None))
    require(package, extra, f"this {kind} checkpoint")


def kept_in_16bit(name: str) -> bool:
    return any(part in KEEP_16BIT for part in name.split("."))


_FLOATS = ("F64", "F32", "F16", "BF16")


def weight_bytes(index: dict[str, TensorEntry], element: int, method: Method | None) -> int:
    """The weights' bytes in memory. Stored float tensors take `element` bytes each (the load's dtype); integer and
    fp8 tensors (a pre-quantised checkpoint's packed weights, its zero points) stay as stored; with `method`, every
    2-D weight outside KEEP_16BIT takes `method.bits` and its scales."""
    total = 0
    for name, entry in index.items():
        if entry.dtype not in _FLOATS:
            total += entry.end - entry.start
        elif method is not None and len(entry.shape) == 2 and name.endswith(".weight") and not kept_in_16bit(name):
            rows, columns = entry.shape
            numel = rows * method.padded(columns)
            scales = rows if method.group == 0 else -(-numel // method.group)
            total += numel * method.bits // 8 + scales * method.scale_bytes
        else:
            total += entry.numel * element
    return total
