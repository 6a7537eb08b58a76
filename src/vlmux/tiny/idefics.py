"""Tiny Idefics-family models: idefics3 (SigLIP-like tower + Llama 3) and smolvlm."""

from __future__ import annotations

from transformers import (
    Idefics3Config, Idefics3ImageProcessor, Idefics3Processor, Idefics3VisionConfig, SmolVLMConfig,
    SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor, SmolVLMVisionConfig,
)

from vlmux.tiny.text import VISION, Parts, generation, llama, tokenizer

# --- idefics3 (HuggingFaceM4/Idefics3-8B-Llama3 style: SigLIP-like tower + Llama 3) ------------

_IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def idefics3() -> Parts:
    return _idefics("idefics3")


def smolvlm() -> Parts:
    """HuggingFaceTB/SmolVLM-*-Instruct style: Idefics3's design with a smaller tower; its processor needs num2words."""
    return _idefics("smolvlm")


# model_type -> (config, vision config, image processor, processor) classes
_CLASSES = {
    "idefics3": (Idefics3Config, Idefics3VisionConfig, Idefics3ImageProcessor, Idefics3Processor),
    "smolvlm": (SmolVLMConfig, SmolVLMVisionConfig, SmolVLMImageProcessor, SmolVLMProcessor),
}


def _idefics(version: str) -> Parts:
    config_class, vision_class, images_class, processor_class = _CLASSES[version]
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<fake_token_around_image>", "<image>",
                "<end_of_utterance>", "<global-img>", *grid]
    # The chat template writes <|begin_of_text|> itself, as the real one does, so the tokenizer adds none.
    tok = tokenizer(specials, add_bos=False, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>",
                    pad_token="<pad>")
    image_size, patch, scale = 64, 8, 2
    vision = vision_class(
        hidden_size=VISION.hidden, intermediate_size=VISION.intermediate, num_hidden_layers=VISION.layers,
        num_attention_heads=VISION.heads, image_size=image_size, patch_size=patch,
        initializer_range=VISION.init_range,
    )
    config = config_class(
        vision_config=vision, text_config=llama(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale, pad_token_id=tok.pad_token_id,
    )
    images = images_class(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=False,
    )
    extra = {"video_processor": SmolVLMVideoProcessor()} if version == "smolvlm" else {}
    processor = processor_class(
        image_processor=images, tokenizer=tok, image_seq_len=(image_size // patch) ** 2 // scale**2,
        chat_template=_IDEFICS3_TEMPLATE, **extra,
    )
    return config, processor, generation(tok)
