"""A tiny Gemma 3 model (google/gemma-3-*-it style): a SigLIP tower pooled to a fixed number of soft tokens, Gemma 3
text with sliding and global attention layers."""

from __future__ import annotations

from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig

from vlmux.tiny.text import MAX_POSITIONS, TEXT, VISION, Parts, generation, tokenizer

_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def gemma3() -> Parts:
    # The template writes <bos> itself, as the real one does, so the tokenizer adds none.
    tok = tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                     "<end_of_image>", "<image_soft_token>"], add_bos=False, bos_token="<bos>", eos_token="<eos>",
                    pad_token="<pad>", unk_token="<unk>", boi_token="<start_of_image>", eoi_token="<end_of_image>",
                    image_token="<image_soft_token>")
    image_size, patch, tokens = 32, 8, 4  # 4x4 patches pooled to 2x2 soft tokens
    vision = SiglipVisionConfig(
        hidden_size=VISION.hidden, intermediate_size=VISION.intermediate, num_hidden_layers=VISION.layers,
        num_attention_heads=VISION.heads, image_size=image_size, patch_size=patch, vision_use_head=False,
    )
    t = TEXT
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=t.hidden, intermediate_size=t.intermediate, num_hidden_layers=t.layers,
        num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, head_dim=t.hidden // t.heads,
        query_pre_attn_scalar=t.hidden // t.heads, sliding_window=32, max_position_embeddings=MAX_POSITIONS,
        initializer_range=t.init_range, tie_word_embeddings=False, layer_types=["sliding_attention", "full_attention"][: t.layers],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"), initializer_range=t.init_range,
        tie_word_embeddings=False,
    )
    images = Gemma3ImageProcessor(size={"height": image_size, "width": image_size}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=tokens, chat_template=_TEMPLATE)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    return config, processor, generation(tok, eos=[tok.eos_token_id, end_of_turn])
