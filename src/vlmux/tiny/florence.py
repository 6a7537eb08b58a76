"""A tiny Florence-2 model as transformers has it natively (florence-community/Florence-2-*): a DaViT tower and a
BART encoder-decoder. Its prompts are task tokens (<MORE_DETAILED_CAPTION>) that the processor turns into text; there
is no chat template."""

from __future__ import annotations

from transformers import BartConfig, CLIPImageProcessor, Florence2Config, Florence2Processor, Florence2VisionConfig

from vlmux.tiny.text import MAX_POSITIONS, TEXT, VISION, Parts, generation, tokenizer


def florence2() -> Parts:
    tok = tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<image>"], add_bos=False, bos_token="<s>", eos_token="</s>",
                    pad_token="<pad>", unk_token="<unk>", image_token="<image>")
    image_size, stride = 64, 32  # the four stages stride 4, 2, 2, 2: a 2x2 grid of features
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1], embed_dim=[16, 16, 32, VISION.hidden], num_heads=[2, 2, 2, VISION.heads],
        num_groups=[2, 2, 2, VISION.heads], window_size=2, projection_dim=TEXT.hidden, drop_path_rate=0.0,
        max_position_embeddings=8, initializer_range=VISION.init_range,
    )
    t = TEXT
    text = BartConfig(
        vocab_size=len(tok), d_model=t.hidden, encoder_layers=1, decoder_layers=1, encoder_attention_heads=t.heads,
        decoder_attention_heads=t.heads, encoder_ffn_dim=t.intermediate, decoder_ffn_dim=t.intermediate,
        max_position_embeddings=MAX_POSITIONS, init_std=0.5, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.eos_token_id,
        forced_bos_token_id=tok.bos_token_id,
    )
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"))
    images = CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                crop_size={"height": image_size, "width": image_size})
    images.image_seq_length = (image_size // stride) ** 2 + 1  # the spatial grid and one pooled token
    processor = Florence2Processor(image_processor=images, tokenizer=tok)
    return config, processor, generation(tok, bos=tok.bos_token_id)
