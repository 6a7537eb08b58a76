"""vlmux's attention functions give what transformers' sdpa attention gives: packed vision attention for images of
one size (one batched call) and of mixed sizes (one call per size); grouped-query decode attention with padding."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlmux.backends.attention import DECODE_NAME, NAME, grouped_query_attention, use_fast_attention
from vlmux.backends.transformers import TransformersBackend
from vlmux.config import ModelSpec

SIZES = {"one size": [(64, 64)] * 3, "mixed sizes": [(64, 64), (40, 90), (64, 64), (120, 50), (40, 90)]}


def vision_features(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    features = getattr(output, "pooler_output", output)
    return torch.cat(list(features)) if isinstance(features, (list, tuple)) else features


def compare(path, device: str, dtype: torch.dtype) -> dict[str, float]:
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    assert model.config.vision_config._attn_implementation == "sdpa"
    differences = {}
    for name, sizes in SIZES.items():
        images = [Image.effect_noise(size, 40 + 10 * i).convert("RGB") for i, size in enumerate(sizes)]
        inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"] * len(images),
                           images=[[image] for image in images], padding=True, return_tensors="pt").to(device, dtype=dtype)
        model.config.vision_config._attn_implementation = "sdpa"
        per_image = vision_features(model, inputs)
        assert "vision" in use_fast_attention(model, packed_vision=True)
        packed = vision_features(model, inputs)
        differences[name] = (per_image.float() - packed.float()).abs().max().item() / per_image.float().abs().max().item()
    return differences


def test_packed_attention_equals_per_image_attention_on_the_cpu(tiny_qwen):
    assert compare(tiny_qwen, "cpu", torch.float32) == {"one size": pytest.approx(0, abs=1e-6),
                                                        "mixed sizes": pytest.approx(0, abs=1e-6)}


def test_the_backend_packs_vision_attention_when_compiled_and_uses_grouped_decode_attention(tiny_qwen, tiny_llava):
    compiled = TransformersBackend(ModelSpec(str(tiny_qwen), device="cpu", decode="compiled"), str(tiny_qwen))
    eager = TransformersBackend(ModelSpec(str(tiny_qwen), device="cpu"), str(tiny_qwen))
    llava = TransformersBackend(ModelSpec(str(tiny_llava), device="cpu", decode="compiled"), str(tiny_llava))
    assert compiled.model.config.vision_config._attn_implementation == NAME and compiled.compiled_vision_blocks == 2
    assert eager.model.config.vision_config._attn_implementation == "sdpa" and eager.compiled_vision_blocks == 0
    assert llava.model.config.vision_config._attn_implementation == "sdpa"  # CLIP: no packed sequences
    for backend in (compiled, eager, llava):
        assert backend.model.config.text_config._attn_implementation == DECODE_NAME


class GroupedModule(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def decode_difference(device: str, dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(0)
    batch, kv_heads, keys, head_dim = 5, 2, 37, 16
    query = torch.randn(batch, kv_heads * 3, 1, head_dim, generator=generator).to(device, dtype)
    key, value = (torch.randn(batch, kv_heads, keys, head_dim, generator=generator).to(device, dtype) for _ in range(2))
    mask = torch.ones(batch, 1, 1, keys + 11, dtype=torch.bool)  # a static cache's mask is longer than the keys
    for row, padding in enumerate((0, 3, 10, 1, 20)):  # left padding, as in a caption batch
        mask[row, ..., :padding] = False
    mask = mask.to(device)
    expected, _ = sdpa_attention_forward(GroupedModule(), query, key, value, mask[..., :keys], scaling=0.25)
    actual, _ = grouped_query_attention(GroupedModule(), query, key, value, mask, scaling=0.25)
    assert actual.shape == expected.shape == (batch, 1, kv_heads * 3, head_dim)
    return (actual.float() - expected.float()).abs().max().item()


def test_grouped_query_decode_attention_equals_sdpa_with_left_padding_on_the_cpu():
    assert decode_difference("cpu", torch.float32) < 1e-6


@pytest.mark.gpu
def test_grouped_query_decode_attention_equals_sdpa_with_left_padding_on_the_gpu():
    assert decode_difference("cuda", torch.bfloat16) < 2e-2


@pytest.mark.gpu
def test_packed_attention_equals_per_image_attention_on_the_gpu(tiny_qwen):
    differences = compare(tiny_qwen, "cuda", torch.bfloat16)
    assert max(differences.values()) < 2e-2, differences  # bf16: different kernels, rounding apart


def test_small_batches_leave_cudnn_attention_out_and_large_ones_keep_it():
    import torch

    from vlmux.backends.transformers import CUDNN_MIN_ROWS, attention_kernels

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels(1, "cuda:0"):  # a first answer: no per-shape cuDNN plans
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels(CUDNN_MIN_ROWS, "cuda:0"):
        assert torch.backends.cuda.cudnn_sdp_enabled()
