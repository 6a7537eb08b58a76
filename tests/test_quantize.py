"""Quantisation: the estimate's bytes per weight, `quantize=` through the real load path on the CPU where the package
runs there, and the error that names the missing package and its extra."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from vlmux import pipeline
from vlmux.config import ModelSpec
from vlmux.estimate import estimate
from vlmux.quantization import METHODS, QuantizationUnavailable, kept_in_16bit, require_method
from vlmux.testing.processes import process_gone

MLP = "model.language_model.layers.0.mlp.up_proj.weight"
KEPT = ["lm_head.weight", "model.language_model.embed_tokens.weight", "model.visual.blocks.0.attn.qkv.weight"]


@pytest.fixture()
def shaped(tmp_path):
    """A checkpoint of four 256x128 bf16 weights (one quantisable) and a norm, with a Qwen2-VL-like config."""
    tensors = {name: torch.zeros(256, 128, dtype=torch.bfloat16) for name in [MLP, *KEPT]}
    tensors["model.language_model.norm.weight"] = torch.zeros(128, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl", "text_config": {"hidden_size": 128}}')
    return tmp_path


def test_weights_in_16_bits_without_quantisation(shaped):
    assert estimate(shaped, "bfloat16", 1, 8).weights == 4 * 256 * 128 * 2 + 128 * 2
    assert estimate(shaped, "float32", 1, 8).weights == 4 * 256 * 128 * 4 + 128 * 4


@pytest.mark.parametrize("method, quantised", [
    ("4bit", 256 * 128 // 2 + 256 * 128 // 64 * 4),  # NF4 and a float32 absmax per 64
    ("8bit", 256 * 128 + 256 * 4),  # int8 and a float32 scale per row
    ("fp8", 256 * 128 + 2 * 4),  # fp8 and a float32 scale per 128x128 block
    # bf16 scale and zero point per 128; tinygemm pads the 128 input columns to 1024
    ("torchao-int4", 256 * 1024 // 2 + 256 * 1024 // 128 * 4),
    ("torchao-int8", 256 * 128 + 256 * 2),
    ("torchao-fp8", 256 * 128 + 256 * 4),  # fp8 and a float32 scale per row
])
def test_quantise_on_load_counts_bits_scales_and_the_layers_kept_in_16_bits(shaped, method, quantised):
    kept = 3 * 256 * 128 * 2 + 128 * 2
    assert estimate(shaped, "bfloat16", 1, 8, quantize=method).weights == quantised + kept
    assert not kept_in_16bit(MLP) and all(kept_in_16bit(name) for name in KEPT)


def test_on_a_gpu_the_estimate_counts_the_quantised_matmuls_copies_of_their_input(shaped):
    plain = estimate(shaped, "bfloat16", 4, 8).activations
    fp8, int4 = (estimate(shaped, "bfloat16", 4, 8, quantize=m).activations - plain for m in ("torchao-fp8", "torchao-int4"))
    assert fp8 > 0 and int4 > 0
    assert fp8 * 2 * 1024 == int4 * 13 * 512  # 13 bytes per input element; 2 per element of the input padded to 1024
    assert estimate(shaped, "bfloat16", 4, 8, on_gpu=False, quantize="torchao-fp8").activations == plain
    assert estimate(shaped, "bfloat16", 4, 8, quantize="4bit").activations == plain


def test_a_prequantised_checkpoint_counts_its_packed_tensors_as_stored(tmp_path):
    # AWQ's layout: int32 words of eight 4-bit weights, int32 packed zero points, fp16 scales per group of 128.
    tensors = {
        "model.layers.0.mlp.up_proj.qweight": torch.zeros(128, 256 // 8, dtype=torch.int32),
        "model.layers.0.mlp.up_proj.qzeros": torch.zeros(1, 256 // 8, dtype=torch.int32),
        "model.layers.0.mlp.up_proj.scales": torch.zeros(1, 256, dtype=torch.float16),
        "lm_head.weight": torch.zeros(256, 128, dtype=torch.float16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "awq", "bits": 4}}')
    packed = 128 * 32 * 4 + 32 * 4
    assert estimate(tmp_path, "bfloat16", 1, 8).weights == packed + 256 * 2 + 256 * 128 * 2


def test_unknown_quantisation_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="torchao-int4"):
        ModelSpec("m", quantize="3bit")


def test_torchao_int8_quantises_the_language_model_and_keeps_the_vision_tower(tiny_models):
    pytest.importorskip("torchao")
    from vlmux.backends.transformers import TransformersBackend

    path = tiny_models["qwen2_vl"]
    backend = TransformersBackend(ModelSpec(str(path), device="cpu", quantize="torchao-int8"), str(path))
    try:
        assert backend.loader.startswith("from_pretrained (quantised on load")
        model = backend.model
        assert "AffineQuantized" in type(model.model.language_model.layers[0].mlp.up_proj.weight).__name__ or \
            "Int8" in type(model.model.language_model.layers[0].mlp.up_proj.weight).__name__
        assert type(model.model.visual.blocks[0].attn.qkv.weight) is torch.nn.Parameter
        assert type(model.lm_head.weight) is torch.nn.Parameter
        pictures = [_picture(), _picture((40, 80, 220))]
        captions = [backend.caption([picture], ["Describe the image."], _gen())[0] for picture in pictures]
        assert captions == plain_generate(path, "torchao-int8", backend.torch_dtype, pictures, _gen().max_new_tokens)
        assert_same_logits_as_transformers(backend, path, "torchao-int8")
    finally:
        backend.close()


def test_torchao_fp8_keeps_fp8_weights_on_the_cpu_and_captions_through_a_worker(tiny_models):
    pytest.importorskip("torchao")
    from vlmux.backends.transformers import TransformersBackend

    path = tiny_models["qwen2_vl"]
    backend = TransformersBackend(ModelSpec(str(path), device="cpu", quantize="torchao-fp8"), str(path))
    try:
        model = backend.model
        assert "Float8" in type(model.model.language_model.layers[0].mlp.up_proj.weight).__name__
        assert model.model.language_model.layers[0].mlp.up_proj.weight.qdata.dtype == torch.float8_e4m3fn
        assert type(model.model.visual.blocks[0].attn.qkv.weight) is torch.nn.Parameter
        assert type(model.lm_head.weight) is torch.nn.Parameter
    finally:
        backend.close()
    with pipeline(str(path), device="cpu", quantize="torchao-fp8", max_new_tokens=6, ignore_eos=True) as pipe:
        pid = pipe.status[0].pid
        captions = pipe([_picture(), _picture((40, 80, 220))], prompt="Describe the image.")
    assert process_gone(pid)
    assert captions == plain_generate(path, "torchao-fp8", torch.float32, [_picture(), _picture((40, 80, 220))], 6)


def test_bitsandbytes_8bit_captions_in_a_worker_on_the_cpu_and_is_released(tiny_models):
    pytest.importorskip("bitsandbytes")
    path = tiny_models["qwen2_vl"]
    with pipeline(str(path), device="cpu", quantize="8bit", max_new_tokens=6, ignore_eos=True) as pipe:
        pid = pipe.status[0].pid
        captions = pipe([_picture(), _picture((40, 80, 220))], prompt="Describe the image.")
    assert process_gone(pid)
    assert captions == plain_generate(path, "8bit", torch.float32, [_picture(), _picture((40, 80, 220))], 6)
    from vlmux.backends.transformers import TransformersBackend

    backend = TransformersBackend(ModelSpec(str(path), device="cpu", quantize="8bit"), str(path))
    try:
        assert_same_logits_as_transformers(backend, path, "8bit")
    finally:
        backend.close()


HIDE = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # import fails, find_spec says absent\n"


def test_a_missing_package_names_itself_and_the_extra(tiny_models, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HIDE.format(names=["bitsandbytes", "torchao"]))
    code = textwrap.dedent(f"""
        import vlmux
        try:
            vlmux.pipeline({str(tiny_models["llava"])!r}, device="cpu", quantize="8bit")
        except vlmux.ModelLoadError as e:
            print("ERROR", e)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert "ERROR" in run.stdout and "pip install 'vlmux[bnb]'" in run.stdout and "bitsandbytes" in run.stdout


def test_require_method_names_the_extra_in_this_process(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(QuantizationUnavailable, match=r"pip install 'vlmux\[torchao\]'"):
        require_method("torchao-int4")
    assert require_method("fp8") is METHODS["fp8"]  # no package to find: its kernel is checked on a CUDA load


def test_torchao_int4_packs_for_torchs_own_kernels(shaped):
    pytest.importorskip("torchao")
    from vlmux.backends.quantize import quantization_options

    method = quantization_options("torchao-int4", shaped, torch.bfloat16)["quantization_config"].quant_type
    # torchao 0.18's default "plain" packing needs the mslk package, which the device lacked ("Requires mslk")
    assert method.group_size == 128 and getattr(method, "int4_packing_format", "tile_packed_to_4d") == "tile_packed_to_4d"


def test_fp8_without_its_kernel_fails_the_load_and_says_what_to_install(shaped, monkeypatch):
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    from vlmux.backends.quantize import quantization_options

    def missing():
        raise ImportError("finegrained-fp8 kernel unavailable: `kernels` is not installed")

    monkeypatch.setattr(finegrained, "load_finegrained_fp8_kernel", missing, raising=False)
    with pytest.raises(QuantizationUnavailable, match="kernels.*not installed.*Install `kernels`"):
        quantization_options("fp8", shaped, torch.bfloat16, "cuda")


def test_a_failed_weight_conversion_says_which_weights_and_why():
    core = pytest.importorskip("transformers.core_model_loading")
    report = pytest.importorskip("transformers.utils.loading_report")
    from transformers.utils import logging as hf_logging

    from vlmux.backends.quantize import load_report

    info = report.LoadStateDictInfo(set(), set(), set(), [], {}, set())
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(core.SkipParameters):  # how transformers records a conversion's error, traceback and all
        with core.log_conversion_errors(name, info, (1, name)):
            raise ImportError("Requires mslk >= 1.0.0")
    with pytest.raises(RuntimeError, match=rf"could not convert {name} on load: ImportError: Requires mslk >= 1.0.0$"):
        with load_report():
            report.log_state_dict_report(torch.nn.Linear(1, 1), "tiny", False, info,
                                         hf_logging.get_logger("transformers.modeling_utils"))


PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]


def plain_model(path, quantize: str | None, dtype: torch.dtype):
    """transformers alone under the same quantisation config: its processor and from_pretrained."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmux.backends.quantize import quantization_options

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map="cpu",
                                                        **quantization_options(quantize, path, dtype, "cpu")).eval()
    return AutoProcessor.from_pretrained(path), model


def plain_inputs(processor, picture, dtype: torch.dtype):
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[picture]], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def plain_generate(path, quantize: str, dtype: torch.dtype, pictures: list, tokens: int) -> list[str]:
    """Greedy `generate` of transformers alone, one picture at a time."""
    processor, model = plain_model(path, quantize, dtype)
    captions = []
    for picture in pictures:
        inputs = plain_inputs(processor, picture, dtype)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        captions.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return captions


def assert_same_logits_as_transformers(backend, path, quantize: str) -> None:
    """The tiny model's greedy words barely move under 8-bit weights (int8 gives the unquantised words): its logits
    do. Equal to transformers' under the same config, and unlike the unquantised model's."""
    processor, quantised = plain_model(path, quantize, backend.torch_dtype)
    _, plain = plain_model(path, None, backend.torch_dtype)
    inputs = plain_inputs(processor, _picture(), backend.torch_dtype)
    with torch.inference_mode():
        ours, theirs, unquantised = (model(**inputs).logits for model in (backend.model, quantised, plain))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, unquantised)


def _picture(color=(220, 40, 40)):
    from PIL import Image

    return Image.new("RGB", (64, 48), color)


def _gen():
    from vlmux.config import GenerationSpec

    return GenerationSpec(max_new_tokens=4, ignore_eos=True)
