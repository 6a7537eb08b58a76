"""vlmux's own caption engine for the Qwen2-VL family (decode mode `engine`): transformers' vision tower and 3-D
positions, then a language model of its own over a static KV cache, batched prefill and a decode loop that refills
a finished row's slot with a waiting row."""
