"""Where a fresh worker's first answer spends its time (run on a GPU): load, then time the first calls."""
from __future__ import annotations

import json
import sys
import time

import torch

from vlmux.backends.transformers import TransformersBackend
from vlmux.config import GenerationSpec, ModelSpec
from vlmux.images import load_image


def timed(label: str, fn, results: dict):
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    results[label] = round(time.perf_counter() - start, 4)
    return value


def main(model: str, image: str, warmup: str) -> None:
    results: dict = {"warmup": warmup}
    start = time.perf_counter()
    backend = TransformersBackend(ModelSpec(model, device="cuda"), model)
    results["load"] = round(time.perf_counter() - start, 4)
    results["load_parts"] = backend.timings
    picture = load_image(image)
    gen = GenerationSpec("Describe this image in one short sentence.", max_new_tokens=8)
    if warmup == "tiny":
        from PIL import Image

        timed("warmup_tiny_image", lambda: backend.caption([Image.new("RGB", (56, 56))], ["hi"], GenerationSpec("hi", max_new_tokens=2)), results)
    inputs = timed("processor", lambda: backend.processor(text=[backend._prompt_text([{"type": "image"}, {"type": "text", "text": gen.prompt}])],
                                                          images=[[picture]], return_tensors="pt").to("cuda", dtype=torch.bfloat16), results)
    timed("first_generate", lambda: backend.model.generate(**inputs, max_new_tokens=8, do_sample=False), results)
    timed("second_generate", lambda: backend.model.generate(**inputs, max_new_tokens=8, do_sample=False), results)
    timed("caption_call", lambda: backend.caption([picture], [gen.prompt], gen), results)
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
