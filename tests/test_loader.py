import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmux.backends.loader import StreamConfig, Unsupported, empty_model, stream_weights
from vlmux.tiny import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_weights_equal_from_pretrained(tiny_models, arch, dtype):
    path = tiny_models[arch]
    reference = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    model = empty_model(path, dtype, "cpu", trust_remote_code=False)
    read = stream_weights(model, path, StreamConfig(readers=3, chunk_bytes=4096))  # many pieces per tensor
    assert read == sum(f.stat().st_size for f in path.glob("*.safetensors")) - _header_bytes(path)
    expected, actual = reference.state_dict(), model.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name
    if getattr(reference.config, "tie_word_embeddings", False):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_renamed_checkpoints_fall_back(tiny_llava, tmp_path):
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for file in tiny_llava.iterdir():
        if file.suffix != ".safetensors":
            (renamed / file.name).write_bytes(file.read_bytes())
    tensors = load_file(tiny_llava / "model.safetensors")
    save_file({f"legacy.{name}": tensor for name, tensor in tensors.items()}, renamed / "model.safetensors")
    model = empty_model(renamed, torch.float32, "cpu", trust_remote_code=False)
    with pytest.raises(Unsupported, match="names differ"):
        stream_weights(model, renamed)


def _header_bytes(path) -> int:
    import struct

    total = 0
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as f:
            total += 8 + struct.unpack("<Q", f.read(8))[0]
    return total


def test_tied_embeddings_stay_tied_and_load_once(tiny_qwen, tmp_path):
    import json
    import shutil

    from transformers import AutoConfig

    tied = tmp_path / "tied"
    shutil.copytree(tiny_qwen, tied)
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tied)).save_pretrained(tied)
    reference = AutoModelForImageTextToText.from_pretrained(tied)
    model = empty_model(tied, torch.float32, "cpu", trust_remote_code=False)
    stream_weights(model, tied)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for (name, expected), actual in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(actual, expected), name


def test_sharded_checkpoints_stream_like_from_pretrained(tiny_qwen, tmp_path):
    import shutil

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_qwen, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    AutoModelForImageTextToText.from_pretrained(tiny_qwen).save_pretrained(sharded, max_shard_size="200KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").exists()
    reference = AutoModelForImageTextToText.from_pretrained(sharded)
    model = empty_model(sharded, torch.float32, "cpu", trust_remote_code=False)
    stream_weights(model, sharded, StreamConfig(readers=4, chunk_bytes=1 << 16))
    for (name, expected), actual in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(actual, expected), name


def test_remote_code_models_load_through_from_pretrained(tiny_qwen):
    from vlmux.backends.transformers import TransformersBackend
    from vlmux.config import ModelSpec

    backend = TransformersBackend(ModelSpec(str(tiny_qwen), device="cpu", trust_remote_code=True), str(tiny_qwen))
    assert backend.loader.startswith("from_pretrained (remote code")
    assert TransformersBackend(ModelSpec(str(tiny_qwen), device="cpu"), str(tiny_qwen)).loader == "stream"


def test_a_prebuilt_structure_is_taken_by_the_next_load_and_fills_like_a_fresh_one(tiny_qwen):
    from vlmux.backends.loader import prebuild

    fresh = empty_model(tiny_qwen, torch.float32, "cpu", False)
    stream_weights(fresh, tiny_qwen)
    prebuilt = prebuild(tiny_qwen, torch.float32, False)
    taken = empty_model(tiny_qwen, torch.float32, "cpu", False)
    assert taken is prebuilt
    assert empty_model(tiny_qwen, torch.float32, "cpu", False) is not prebuilt  # taken once
    stream_weights(taken, tiny_qwen)
    expected = fresh.state_dict()
    assert taken.state_dict().keys() == expected.keys()
    for name, tensor in taken.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert taken.generation_config.to_dict() == fresh.generation_config.to_dict()
