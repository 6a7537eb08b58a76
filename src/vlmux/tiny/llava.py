"""Tiny LLaVA-family models: llava (CLIP tower + Llama) and llava_onevision (SigLIP tower + Qwen2, any-resolution tiles)."""

from __future__ import annotations

from transformers import (
    CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaOnevisionConfig, LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, LlavaProcessor, SiglipVisionConfig,
)

from vlmux.tiny.text import CHATML_SPECIALS, VISION, Parts, chatml_template, generation, llama, qwen2, tokenizer

# --- llava (llava-hf/llava-1.5 style: CLIP tower + Llama) ------------------------------------

_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava() -> Parts:
    tok = tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], add_bos=True,
                     bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    image_size, patch = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=VISION.hidden, intermediate_size=VISION.intermediate, num_hidden_layers=VISION.layers,
        num_attention_heads=VISION.heads, image_size=image_size, patch_size=patch, projection_dim=VISION.hidden,
        initializer_range=VISION.init_range,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=llama(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE,
    )
    return config, processor, generation(tok)




# --- llava_onevision (llava-hf/llava-onevision-qwen2-*-ov-hf style: SigLIP tower + Qwen2, any-resolution tiles) ----


def llava_onevision() -> Parts:
    tok = tokenizer([*CHATML_SPECIALS, "<image>", "<video>"], add_bos=False, eos_token="<|im_end|>",
                    pad_token="<|endoftext|>", image_token="<image>", video_token="<video>")
    tile, patch = 32, 8
    vision = SiglipVisionConfig(
        hidden_size=VISION.hidden, intermediate_size=VISION.intermediate, num_hidden_layers=VISION.layers,
        num_attention_heads=VISION.heads, image_size=tile, patch_size=patch,
    )
    # Tiles of the picture at one of these resolutions, plus the whole picture at tile size.
    grid = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=qwen2(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=grid,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    size = {"height": tile, "width": tile}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=grid),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tok,
        num_image_tokens=(tile // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=chatml_template("<image>\n"),
    )
    return config, processor, generation(tok, eos=[tok.eos_token_id])
