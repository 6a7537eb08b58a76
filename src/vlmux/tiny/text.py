"""What every tiny model shares: the dimensions, a byte-level BPE tokenizer trained offline on a built-in corpus,
a small Llama text config and the generation config."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig, LlamaConfig, PreTrainedConfig, PreTrainedTokenizerFast, ProcessorMixin, Qwen2Config,
)

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
MAX_POSITIONS = 1024
BPE_VOCAB = 1024  # an upper bound: the corpus runs out of merges at ~600 tokens

Parts = tuple[PreTrainedConfig, ProcessorMixin, GenerationConfig]


# --- tokenizer ---------------------------------------------------------------------------


def tokenizer(specials: list[str], add_bos: bool, **named: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the built-in corpus; `specials` are appended after the BPE vocab.

    `named` are the tokenizer's special-token attributes (bos_token=..., pad_token=...).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
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
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POSITIONS, **named)


def llama(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    t = TEXT
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=t.hidden, intermediate_size=t.intermediate,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
        max_position_embeddings=MAX_POSITIONS, initializer_range=t.init_range,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def generation(tok: PreTrainedTokenizerFast, bos: int | None = None, eos: list[int] | None = None) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=bos if bos is not None else tok.bos_token_id,
        eos_token_id=eos or tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def qwen2(tok: PreTrainedTokenizerFast, t: TextDims = TEXT) -> Qwen2Config:
    """A small Qwen2 language model config around `tok` (LLaVA-OneVision's and InternVL's text half)."""
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=t.hidden, intermediate_size=t.intermediate,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
        max_position_embeddings=MAX_POSITIONS, initializer_range=t.init_range, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


# ChatML as the Qwen2-based families write it; `image` is what one image becomes in the prompt.
def chatml_template(image: str, system: str | None = None) -> str:
    head = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}"
            if system else "")
    return (
        "{% for message in messages %}" + head +
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}"
        "{% if content['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
