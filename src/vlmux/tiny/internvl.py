"""A tiny InternVL model as the -hf checkpoints are (OpenGVLab/InternVL3-*-hf): an InternViT-like tower, a pixel
shuffle projector and Qwen2; its processor tiles the picture (GotOcr2ImageProcessor)."""

from __future__ import annotations

from transformers import (
    GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor, InternVLVisionConfig,
)

from vlmux.tiny.text import CHATML_SPECIALS, VISION, Parts, chatml_template, generation, qwen2, tokenizer


def internvl() -> Parts:
    tok = tokenizer([*CHATML_SPECIALS, "<img>", "</img>", "<IMG_CONTEXT>", "<video>"], add_bos=False,
                    eos_token="<|im_end|>", pad_token="<|endoftext|>", start_image_token="<img>",
                    end_image_token="</img>", context_image_token="<IMG_CONTEXT>", video_token="<video>")
    tile, patch, downsample = 32, 8, 0.5
    vision = InternVLVisionConfig(
        hidden_size=VISION.hidden, intermediate_size=VISION.intermediate, num_hidden_layers=VISION.layers,
        num_attention_heads=VISION.heads, image_size=[tile, tile], patch_size=[patch, patch],
        initializer_range=VISION.init_range,
    )
    tokens = int((tile // patch) ** 2 * downsample**2)  # per tile, after the pixel shuffle
    config = InternVLConfig(
        vision_config=vision, text_config=qwen2(tok), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens, downsample_ratio=downsample, tie_word_embeddings=False,
    )
    size = {"height": tile, "width": tile}
    # Up to 4 tiles and a thumbnail of the whole picture, as the real processor does with up to 12.
    images = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=4)
    processor = InternVLProcessor(
        image_processor=images, tokenizer=tok, video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=tokens, chat_template=chatml_template("<IMG_CONTEXT>\\n", system="You are a helpful assistant."),
    )
    return config, processor, generation(tok, eos=[tok.eos_token_id])
