"""Tiny, randomly initialised vision-language models of real transformers architectures.

Everything is built offline: a byte-level BPE tokenizer trained on a built-in corpus, the
architecture's own processor classes and a model created from a small config. The written
folder loads with AutoProcessor / AutoModelForImageTextToText like a hub checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

ARCHITECTURES: tuple[str, ...] = ("llava", "qwen2_vl", "idefics3")

_CORPUS = """\
A photo of a red circle on a white background. A blue square sits next to a yellow triangle.
The picture shows a small cat sleeping on a warm window sill in the morning sun.
Two people are walking along the beach while the waves roll in under a gray sky.
There is a large green tree in the middle of the park, and children are playing around it.
The image contains a bowl of fresh fruit: apples, oranges, bananas and a bunch of grapes.
A man in a dark coat is reading a newspaper at a table in a quiet cafe.
The kitchen has white walls, a wooden floor and a bright lamp above the table.
In this picture we can see a city street at night with cars, lights and tall buildings.
A dog is running across the grass to catch a ball thrown by its owner.
The drawing is simple: one shape in the center, colored with a strong and flat color.
Describe the image. What is in this picture? What color is the shape? How many objects are there?
The answer is short and clear. The scene is bright, the colors are clean, the lines are sharp.
"""


@dataclass(frozen=True)
class TextDims:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    # 0.15 rather than the usual 0.02: at 0.02 a 2-layer model's output barely depends on the
    # picture. Larger ranges amplify float round-off (padded and unpadded runs differ by ~3e-6
    # times the logits' std) and with it the odds that a near-tie flips the greedy argmax. At
    # 0.15, 150 seeds per arch gave identical batch vs one-by-one tokens and picture-dependent captions.
    init_range: float = 0.15


@dataclass(frozen=True)
class VisionDims:
    hidden: int = 32
    intermediate: int = 64
    layers: int = 2
    heads: int = 4
    init_range: float = 0.1


TEXT = TextDims()
VISION = VisionDims()
_MAX_POSITIONS = 1024
_BPE_VOCAB = 1024  # an upper bound: the corpus runs out of merges at ~600 tokens

_Parts = tuple[PreTrainedConfig, ProcessorMixin, GenerationConfig]


def build_tiny(out_dir: str | Path, arch: str = "llava", seed: int = 0) -> Path:
    """Write a tiny model of `arch` (one of ARCHITECTURES) to out_dir and return the path.

    Same seed, same bytes. Raises ValueError for an unknown arch.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, processor, generation = _BUILDERS[arch]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = generation
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# --- tokenizer ---------------------------------------------------------------------------


def _tokenizer(specials: list[str], add_bos: bool, **named: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the built-in corpus; `specials` are appended after the BPE vocab.

    `named` are the tokenizer's special-token attributes (bos_token=..., pad_token=...).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    post = [processors.ByteLevel(trim_offsets=False)]
    if add_bos:
        bos = named["bos_token"]
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                  special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(post)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=_MAX_POSITIONS, **named)


def _llama(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    t = TEXT
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=t.hidden, intermediate_size=t.intermediate,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
        max_position_embeddings=_MAX_POSITIONS, initializer_range=t.init_range,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def _generation(tok: PreTrainedTokenizerFast, bos: int | None = None, eos: list[int] | None = None) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=bos if bos is not None else tok.bos_token_id,
        eos_token_id=eos or tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


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


def _llava() -> _Parts:
    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], add_bos=True,
                     bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    image_size, patch = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=VISION.hidden, intermediate_size=VISION.intermediate, num_hidden_layers=VISION.layers,
        num_attention_heads=VISION.heads, image_size=image_size, patch_size=patch, projection_dim=VISION.hidden,
        initializer_range=VISION.init_range,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=_llama(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
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
    return config, processor, _generation(tok)


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


def _qwen2_vl() -> _Parts:
    tok = _tokenizer(list(QWEN2_VL_SPECIALS), add_bos=False, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return qwen2_vl_parts(tok, TEXT, VISION, min_pixels=56 * 56, max_pixels=112 * 112)


def qwen2_vl_parts(tok: PreTrainedTokenizerFast, t: TextDims, v: VisionDims, min_pixels: int, max_pixels: int,
                   max_positions: int = _MAX_POSITIONS, rope_theta: float = 1e6) -> _Parts:
    """A Qwen2-VL config, processor and generation config around `tok`, which holds QWEN2_VL_SPECIALS,
    eos <|im_end|> and pad <|endoftext|>."""
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    ]}
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    head_dim = t.hidden // t.heads
    text = dict(
        vocab_size=len(tok), hidden_size=t.hidden, intermediate_size=t.intermediate,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
        max_position_embeddings=max_positions, initializer_range=t.init_range,
        # mrope splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                         "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
        bos_token_id=endoftext, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=v.layers, embed_dim=v.hidden, hidden_size=t.hidden, mlp_ratio=v.intermediate // v.hidden,
        num_heads=v.heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        initializer_range=v.init_range,
    )
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tok, chat_template=_QWEN2_VL_TEMPLATE,
    )
    return config, processor, _generation(tok, bos=endoftext, eos=[tok.eos_token_id, endoftext])


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


def _idefics3() -> _Parts:
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<fake_token_around_image>", "<image>",
                "<end_of_utterance>", "<global-img>", *grid]
    # The chat template writes <|begin_of_text|> itself, as the real one does, so the tokenizer adds none.
    tok = _tokenizer(specials, add_bos=False, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>",
                     pad_token="<pad>")
    image_size, patch, scale = 64, 8, 2
    vision = Idefics3VisionConfig(
        hidden_size=VISION.hidden, intermediate_size=VISION.intermediate, num_hidden_layers=VISION.layers,
        num_attention_heads=VISION.heads, image_size=image_size, patch_size=patch,
        initializer_range=VISION.init_range,
    )
    config = Idefics3Config(
        vision_config=vision, text_config=_llama(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale, pad_token_id=tok.pad_token_id,
    )
    images = Idefics3ImageProcessor(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tok, image_seq_len=(image_size // patch) ** 2 // scale**2,
        chat_template=_IDEFICS3_TEMPLATE,
    )
    return config, processor, _generation(tok)


_BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "idefics3": _idefics3}


# --- sample pictures -----------------------------------------------------------------------

_COLORS = [(220, 40, 40), (40, 80, 220), (240, 210, 40), (40, 160, 80)]
_BACKGROUNDS = [(255, 255, 255), (235, 235, 235)]


def draw_sample_images(out_dir: str | Path, count: int = 6, seed: int = 0) -> list[Path]:
    """Draw `count` small pictures of one or two filled shapes; PNG and JPEG alternate."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = rng.randint(64, 320), rng.randint(64, 320)
        image = Image.new("RGB", (width, height), rng.choice(_BACKGROUNDS))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 2)):
            _draw_shape(draw, rng, width, height)
        path = out / f"sample_{i}.{'png' if i % 2 == 0 else 'jpg'}"
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def _draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    side = rng.randint(min(width, height) // 4, min(width, height) // 2)
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    color = rng.choice(_COLORS)
    kind = rng.choice(["circle", "square", "triangle"])
    if kind == "circle":
        draw.ellipse([x, y, x + side, y + side], fill=color)
    elif kind == "square":
        draw.rectangle([x, y, x + side, y + side], fill=color)
    else:
        draw.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=color)
