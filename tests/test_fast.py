"""The fast caption path (static KV cache, compiled decode, padded batches, overlapped preparation) gives the same
greedy captions as plain `generate`, batched and one by one, over images of different sizes."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmux.backends.fast import MEMORY_SHARE, FastConfig, cache_length, fitting_batch, generate_options, pad_rows
from vlmux.backends.transformers import TransformersBackend
from vlmux.config import GenerationSpec, ModelSpec
from vlmux.estimate import MAX_AUTO_BATCH
from vlmux.worker.handler import CPU_BATCH_SIZE, Handler, auto_batch_size, capped_batch_size
from vlmux.protocol import Caption, Captions, Load, Loaded
from vlmux.tiny.pictures import ellipses

GEN = GenerationSpec(max_new_tokens=10, ignore_eos=True)
PROMPTS = ("Describe the image.", "What is in this picture?", "Colours and shapes, please, all of them.", "Caption.")


def pictures() -> list[Image.Image]:
    return ellipses([(40, 30), (64, 64), (120, 50), (33, 90), (200, 150)])


def reference(path: Path, images: list[Image.Image], prompts: list[str], device: str = "cpu") -> list[str]:
    """Plain transformers: from_pretrained, the processor, generate with its default dynamic cache."""
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(device).eval()
    texts = [
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                      add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    inputs = processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt").to(device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=GEN.max_new_tokens, min_new_tokens=GEN.max_new_tokens,
                                do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]


def fast_backend(path: Path, decode: str, device: str = "cpu") -> TransformersBackend:
    return TransformersBackend(ModelSpec(str(path), device=device, dtype="float32", decode=decode), str(path))


def check_equal(path: Path, decode: str, device: str = "cpu") -> None:
    images, prompts = pictures()[:4], list(PROMPTS)
    backend = fast_backend(path, decode, device)
    try:
        batched = backend.generate(backend.prepare(images, prompts, pad_to=6), GEN)  # two rows of padding
        alone = [backend.generate(backend.prepare([i], [p]), GEN)[0] for i, p in zip(images, prompts)]
        # generate falls back to eager without a word when it cannot compile: make sure it did.
        assert hasattr(backend.model, "_compiled_call") == (decode == "compiled")
    finally:
        backend.close()
    expected = reference(path, images, prompts, device)
    assert len(set(expected)) > 1  # the model looks at the images: a mixed-up batch would show
    assert batched == expected
    for image, text, prompt in zip(images, alone, prompts):
        assert [text] == reference(path, [image], [prompt], device)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "idefics3"])
def test_static_cache_equals_plain_generate(tiny_models, arch):
    check_equal(tiny_models[arch], "static")


def test_compiled_decode_equals_plain_generate(tiny_qwen):
    check_equal(tiny_qwen, "compiled")


def test_the_worker_pipeline_equals_plain_generate_with_a_bad_image(tiny_qwen, tmp_path):
    """Chunks of 2 over 5 images and one broken file: chunk i+1 is prepared while chunk i generates, the short
    last chunk is padded to the compiled size, the broken file gets its own error and shifts nothing."""
    files = []
    for index, image in enumerate(pictures()):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        files.append(buffer.getvalue())
    files.insert(2, b"not an image")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(files))]
    handler = Handler()
    try:
        spec = ModelSpec(str(tiny_qwen), device="cpu", dtype="float32", decode="compiled")
        assert isinstance(handler.handle(Load(spec, str(tiny_qwen), {})), Loaded)
        assert handler.backend.fast == FastConfig(static_cache=True, compile=True, vision_compiled=True)
        reply = handler.handle(Caption(files, prompts, GEN, 2))
    finally:
        handler.close()
    assert isinstance(reply, Captions) and reply.generated == 5
    assert reply.results[2].bad_image and reply.results[2].caption is None
    good = [i for i in range(len(files)) if i != 2]
    expected = reference(tiny_qwen, pictures(), [prompts[i] for i in good])
    assert [reply.results[i].caption for i in good] == expected
    assert all(reply.results[i].error is None for i in good)


def test_decode_modes_by_device():
    assert FastConfig.for_device("auto", "cuda:0") == FastConfig(static_cache=False, compile=False)
    assert FastConfig.for_device("compiled", "cuda:0") == FastConfig(True, True, vision_compiled=True)
    assert FastConfig.for_device("engine", "cuda:0") == FastConfig(False, False, engine=True, vision_compiled=True)
    assert FastConfig.for_device("engine", "cpu") == FastConfig(False, False, engine=True)
    assert FastConfig.for_device("auto", "cpu") == FastConfig(static_cache=False, compile=False)
    assert FastConfig.for_device("static", "cuda:0") == FastConfig(static_cache=True, compile=False)
    assert generate_options(FastConfig(False, False), 70, 64) == {}
    assert generate_options(FastConfig(True, False), 70, 64) == {
        "cache_implementation": "static", "max_cache_len": 192, "disable_compile": True}
    assert "compile_config" in generate_options(FastConfig(True, True), 70, 64)
    with pytest.raises(ValueError):
        ModelSpec("m", decode="fastest")


def test_shapes_stay_put():
    assert cache_length(250, 64) == cache_length(256, 64) == 320  # one compiled graph across prompt lengths
    assert pad_rows(["a", "b"], 4) == ["a", "b", "b", "b"] and pad_rows(["a"], 1) == ["a"]


def test_the_budget_caps_what_free_memory_allows():
    image = 200 << 20
    assert fitting_batch(image, 10 << 30, None) == int((10 << 30) * MEMORY_SHARE) // image == 40
    assert fitting_batch(image, 10 << 30, 2 << 30) == 10  # a budget below the free memory's share bounds it
    assert fitting_batch(image, 10 << 30, 100 << 30) == 40  # a budget above it does not lift the bound
    assert fitting_batch(image, 10 << 30, 0) == 0 and fitting_batch(image, 0, None) == 0
    assert fitting_batch(0, 1 << 20, None) == int((1 << 20) * MEMORY_SHARE)  # a cost of nothing divides by one


def test_the_auto_batch_size_is_what_fits_up_to_the_maximum_or_the_cpu_default():
    assert auto_batch_size(None) == CPU_BATCH_SIZE
    assert auto_batch_size(40) == 40
    assert auto_batch_size(10 * MAX_AUTO_BATCH) == MAX_AUTO_BATCH
    assert auto_batch_size(0) == 1  # not even one image fits the estimate: one is tried, and fails alone


def test_a_batch_size_is_the_requested_or_the_auto_size_within_what_fits():
    assert capped_batch_size(None, 32, None) == 32
    assert capped_batch_size(3, 32, None) == 3
    assert capped_batch_size(100, 32, None) == 100  # the CPU: nothing bounds an asked-for size
    assert capped_batch_size(100, 32, 40) == 40
    assert capped_batch_size(None, 32, 10) == 10  # a request with longer answers fits fewer than the load's size
    assert capped_batch_size(None, 32, 0) == capped_batch_size(5, 32, 0) == 1
    assert capped_batch_size(1000, 32, 10 * MAX_AUTO_BATCH) == 1000  # the auto maximum leaves asked-for sizes be


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["static", "compiled"])
def test_fast_path_on_cuda_equals_plain_generate(tiny_models, decode):
    for arch in ("qwen2_vl", "llava"):
        check_equal(tiny_models[arch], decode, device="cuda")


@pytest.mark.gpu
def test_images_are_preprocessed_on_the_gpu_like_on_the_host(tiny_models):
    for arch in ("qwen2_vl", "llava"):
        path = tiny_models[arch]
        backend = fast_backend(path, "dynamic", device="cuda")
        try:
            prepared = backend.prepare(pictures(), list(PROMPTS) + ["Caption."])
            assert backend.preprocess_on_device and prepared.ready is not None
            on_device = {k: v.cpu() for k, v in prepared.inputs.items() if isinstance(v, torch.Tensor)}
        finally:
            backend.close()
        processor = AutoProcessor.from_pretrained(path)
        processor.tokenizer.padding_side = "left"
        texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                               add_generation_prompt=True, tokenize=False) for p in list(PROMPTS) + ["Caption."]]
        on_host = processor(text=texts, images=[[image] for image in pictures()], padding=True, return_tensors="pt")
        for key in set(on_host) - {"pixel_values"}:
            assert torch.equal(on_device[key], on_host[key]), (arch, key)
        # The host resizes in uint8 (rounded, clamped), the GPU in float: bicubic overshoot at sharp edges stays
        # unclamped there, so a few edge pixels differ by more than rounding; the image as a whole does not.
        difference = (on_device["pixel_values"].float() - on_host["pixel_values"].float()).abs()
        print(arch, "mean", difference.mean().item(), "max", difference.max().item(),
              "share over 0.05", (difference > 0.05).float().mean().item())
        assert difference.mean() < 1e-2 and (difference > 0.05).float().mean() < 0.02, arch


BROKEN_COMPILER = """
import sys
import torch._inductor.config
torch._inductor.config.cpp.cxx = ("/nonexistent/g++",)  # inductor cannot build a single kernel
sys.path.insert(0, sys.argv[2])
from test_fast import check_equal
check_equal(sys.argv[1], "compiled")
print("captions equal")
"""


def test_a_compile_that_fails_falls_back_to_eager_and_still_captions(tiny_qwen, tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}  # nothing compiled before can stand in
    done = subprocess.run([sys.executable, "-c", BROKEN_COMPILER, str(tiny_qwen), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and "captions equal" in done.stdout, done.stderr[-3000:]
    assert "InvalidCxxCompiler" in done.stderr  # the compile really failed, and dynamo ran the code eagerly
