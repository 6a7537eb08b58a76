"""Tiny Qwen-VL models: qwen2_vl, qwen2_5_vl and qwen3_vl (a native-resolution vision tower, multimodal rotary)."""

from __future__ import annotations

from transformers import (
    PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLImageProcessor,
    Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor,
)

from vlmux.tiny.text import MAX_POSITIONS, TEXT, VISION, Parts, TextDims, VisionDims, generation, tokenizer

# --- qwen2_vl (Qwen/Qwen2-VL-*-Instruct style) -----------------------------------------------

_QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


QWEN2_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# model_type -> (config class, processor class, video processor class, vision patch size)
_VERSIONS = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLProcessor, Qwen2VLVideoProcessor, 14),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, 14),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor, 16),
}


def _tiny(version: str) -> Parts:
    tok = tokenizer(list(QWEN2_VL_SPECIALS), add_bos=False, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    patch = _VERSIONS[version][3]
    return qwen2_vl_parts(tok, TEXT, VISION, min_pixels=(4 * patch) ** 2, max_pixels=(8 * patch) ** 2, version=version)


def qwen2_vl() -> Parts:
    return _tiny("qwen2_vl")


def qwen2_5_vl() -> Parts:
    return _tiny("qwen2_5_vl")


def qwen3_vl() -> Parts:
    return _tiny("qwen3_vl")


def qwen2_vl_parts(tok: PreTrainedTokenizerFast, t: TextDims, v: VisionDims, min_pixels: int, max_pixels: int,
                   max_positions: int = MAX_POSITIONS, rope_theta: float = 1e6, version: str = "qwen2_vl") -> Parts:
    """A Qwen-VL config (`version`: a key of _VERSIONS), processor and generation config around `tok`, which holds
    QWEN2_VL_SPECIALS, eos <|im_end|> and pad <|endoftext|>."""
    config_class, processor_class, video_class, patch = _VERSIONS[version]
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    ]}
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    head_dim = t.hidden // t.heads
    # mrope splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
    rope = {"rope_type": "default", "rope_theta": rope_theta,
            "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}
    text = dict(
        vocab_size=len(tok), hidden_size=t.hidden, intermediate_size=t.intermediate,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
        max_position_embeddings=max_positions, initializer_range=t.init_range, rope_parameters=rope,
        bos_token_id=endoftext, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=v.layers, num_heads=v.heads, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
        initializer_range=v.init_range,
    )
    if version == "qwen2_vl":
        vision.update(embed_dim=v.hidden, hidden_size=t.hidden, mlp_ratio=v.intermediate // v.hidden)
    else:  # a SwiGLU tower whose merger projects to out_hidden_size
        vision.update(hidden_size=v.hidden, intermediate_size=v.intermediate, out_hidden_size=t.hidden)
    if version == "qwen2_5_vl":  # window attention in all blocks but the last
        vision.update(window_size=4 * patch, fullatt_block_indexes=[v.layers - 1])
    if version == "qwen3_vl":  # learned position table (a square grid), deepstack features from the first block
        text.update(head_dim=head_dim, tie_word_embeddings=False)
        rope["mrope_interleaved"] = True
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = config_class(text_config=text, vision_config=vision, **ids)
    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels), video_processor=video_class(**pixels),
        tokenizer=tok, chat_template=_QWEN2_VL_TEMPLATE,
    )
    return config, processor, generation(tok, bos=endoftext, eos=[tok.eos_token_id, endoftext])
