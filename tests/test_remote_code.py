"""A model that ships its own code (tiny/remote.py: InternVL2's `chat` shape, `auto_map`), loaded only with
trust_remote_code and answered through its adapter in a worker process, whose release is then checked."""
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

from vlmux import GenerationSpec, ModelLoadError, ModelPool, ModelSpec, PoolConfig, pipeline
from vlmux.backends.base import Backend
from vlmux.backends.adapters import GENERIC, REMOTE_FAMILIES, normalised, remote_family, tiles
from vlmux.protocol import Caption, Captions, Load, Loaded
from vlmux.testing.processes import process_gone
from vlmux.worker import prep
from vlmux.worker.handler import Handler
from vlmux.tiny import build_tiny

# A model type transformers does not have, whose code subclasses LLaVA's: the generic adapter's case.
GENERIC_CONFIG = """from transformers import LlavaConfig


class TinyRemoteLlavaConfig(LlavaConfig):
    model_type = "tiny_remote_llava"
"""
GENERIC_MODELING = """from transformers import LlavaForConditionalGeneration

from .configuration_remote_llava import TinyRemoteLlavaConfig


class TinyRemoteLlava(LlavaForConditionalGeneration):
    config_class = TinyRemoteLlavaConfig
"""


@pytest.fixture(scope="module")
def remote_model(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("remote") / "tinychat", "internvl_chat")


@pytest.fixture(scope="module")
def generic_model(tmp_path_factory, tiny_llava):
    """The tiny LLaVA with its config and model class moved into the folder's own code, under a new model_type."""
    path = shutil.copytree(tiny_llava, tmp_path_factory.mktemp("remote") / "remote_llava")
    (path / "configuration_remote_llava.py").write_text(GENERIC_CONFIG)
    (path / "modeling_remote_llava.py").write_text(GENERIC_MODELING)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tiny_remote_llava", architectures=["TinyRemoteLlava"], auto_map={
        "AutoConfig": "configuration_remote_llava.TinyRemoteLlavaConfig",
        "AutoModelForImageTextToText": "modeling_remote_llava.TinyRemoteLlava"})
    (path / "config.json").write_text(json.dumps(config))
    # transformers renames LLaVA's saved keys by model_type, which the new one does not have: saved by module name.
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors", {"format": "pt"})
    return path


def pictures() -> list[Image.Image]:
    return [Image.new("RGB", (48, 40), (220, 40, 40)), Image.new("RGB", (96, 32), (40, 80, 220)),
            Image.new("RGB", (70, 90), (240, 210, 40))]


def test_the_folder_carries_its_own_code_and_names_it_in_auto_map(remote_model):
    config = json.loads((remote_model / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and config["auto_map"]["AutoModel"].startswith("modeling_tinychat.")
    assert (remote_model / "modeling_tinychat.py").exists() and (remote_model / "model.safetensors").exists()
    assert remote_family(config) is REMOTE_FAMILIES["internvl_chat"]
    assert remote_family({"model_type": "something_new"}) is GENERIC


def test_internvl_tiling_follows_the_aspect_ratio_and_adds_a_thumbnail():
    assert len(tiles(Image.new("RGB", (40, 40)), 32, 4, True)) == 1  # one tile: no thumbnail
    wide = tiles(Image.new("RGB", (128, 32)), 32, 4, True)
    assert len(wide) == 5 and all(t.size == (32, 32) for t in wide)  # 4 x 1, and the thumbnail
    pixels = normalised(wide)
    assert pixels.shape == (5, 3, 32, 32)
    assert torch.allclose(pixels[0, :, 0, 0], (torch.zeros(3) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_without_trust_remote_code_the_load_fails_naming_the_option(remote_model):
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        pipeline(str(remote_model), device="cpu", max_new_tokens=4)


def test_the_remote_model_captions_and_chats_in_a_worker_through_its_own_chat(remote_model):
    images = pictures()
    with pipeline(str(remote_model), device="cpu", trust_remote_code=True, max_new_tokens=8, ignore_eos=True) as pipe:
        pid = pipe.status[0].pid
        batch = pipe(images)  # batch_chat
        alone = [pipe(image) for image in images]  # chat
        asked = pipe(images[0], prompt="What is in this picture?")
        answer = pipe.chat([{"role": "user", "content": [{"type": "image", "image": images[0]},
                                                         {"type": "text", "text": "What is in this picture?"}]}])
    assert all(isinstance(c, str) and c for c in batch)
    assert len(set(batch)) > 1, "the captions do not depend on the picture"
    assert batch == alone
    assert answer == asked  # the same question and tiles through the chat request
    assert process_gone(pid)
    assert pipe.release is not None and pipe.release.process_gone


def test_the_pool_loads_it_answers_a_caption_job_and_releases_it(remote_model, image_dir):
    images = sorted(image_dir.iterdir())
    spec = ModelSpec(str(remote_model), device="cpu", trust_remote_code=True)
    with ModelPool(PoolConfig(spare_worker=False)) as pool:
        name = pool.load(spec)
        pid = pool.status()[0].pid
        done = pool.submit_caption(name, images, ["Describe."] * len(images), GenerationSpec(max_new_tokens=6)).result()
        assert all(r.caption for r in done.results) and done.generated == len(images)
        release = pool.unload(name)
    assert release.process_gone and process_gone(pid)


def test_a_family_without_an_adapter_captions_through_the_generic_one_as_its_native_twin_does(generic_model, tiny_llava):
    images = pictures()
    with pipeline(str(generic_model), device="cpu", trust_remote_code=True, max_new_tokens=6, ignore_eos=True) as pipe:
        pid = pipe.status[0].pid
        remote = pipe(images)
    with pipeline(str(tiny_llava), device="cpu", max_new_tokens=6, ignore_eos=True) as pipe:
        native = pipe(images)
    assert remote == native and len(set(remote)) > 1  # same weights, same processor: the same greedy answers
    assert process_gone(pid)


def test_a_large_request_is_prepared_in_the_worker_since_the_adapter_makes_its_own_inputs(remote_model, image_dir):
    handler = Handler()
    spec = ModelSpec(str(remote_model), device="cpu", trust_remote_code=True, prep_processes=2)
    try:
        assert isinstance(handler.handle(Load(spec, str(remote_model), {}, batch_size=4)), Loaded)
        declared = set(Backend.__annotations__) | {name for name in vars(Backend) if not name.startswith("_")}
        assert [name for name in sorted(declared) if not hasattr(handler.backend, name)] == []
        items = [str(path) for path in sorted(image_dir.iterdir())] * 4
        assert len(items) >= prep.MIN_IMAGES
        reply = handler.handle(Caption(items, ["Describe."] * len(items), GenerationSpec(max_new_tokens=4), None))
        assert isinstance(reply, Captions) and all(r.caption for r in reply.results), reply
        assert handler._prep is None and reply.prepared_apart == 0  # asked for two, and none started
    finally:
        handler.close()
