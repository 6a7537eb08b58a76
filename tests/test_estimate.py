"""The memory estimate's image budget matches what each model's processor really makes of a large image."""
from __future__ import annotations

from PIL import Image
from transformers import AutoProcessor

from vlmux.estimate import IMAGE_TOKENS, estimate, image_budget

IMAGE_TOKEN_NAMES = ("<|image_pad|>", "<image>")


def image_tokens(path, size: tuple[int, int]) -> int:
    """Image tokens in the processor's input_ids for one picture of `size`."""
    processor = AutoProcessor.from_pretrained(path)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[Image.new("RGB", size, (90, 120, 200))]], return_tensors="pt")
    vocabulary = processor.tokenizer.get_vocab()
    ids = {vocabulary[name] for name in IMAGE_TOKEN_NAMES if name in vocabulary}
    return sum(int((inputs["input_ids"] == i).sum()) for i in ids)


def test_the_budget_bounds_the_image_tokens_of_a_large_photo(tiny_models):
    for arch, path in tiny_models.items():
        actual = image_tokens(path, (2048, 1536))
        budget = image_budget(path)
        assert 0 < actual <= budget.tokens, (arch, actual, budget)
        assert actual >= 0.6 * budget.tokens, (arch, actual, budget)  # a bound, not a blanket IMAGE_TOKENS
        assert budget.tokens < IMAGE_TOKENS


def test_kv_cache_and_activations_grow_with_the_batch(tiny_qwen):
    one, eight = estimate(tiny_qwen, "bfloat16", 1, 64), estimate(tiny_qwen, "bfloat16", 8, 64)
    assert eight.weights == one.weights and eight.context == one.context
    assert eight.kv_cache == 8 * one.kv_cache and eight.activations == 8 * one.activations
    assert estimate(tiny_qwen, "float32", 1, 64).weights == 2 * one.weights
    assert estimate(tiny_qwen, "bfloat16", 1, 64, on_gpu=False).context == 0
