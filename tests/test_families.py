"""Every family `vlmux make-tiny` builds, captioned on the CPU through the real path: a worker process, the streaming
loader or from_pretrained, the family's prompt form (tests/test_tiny.py checks the three the rest of the suite uses)."""
import json

import pytest
import torch
from PIL import Image

from vlmux import pipeline
from vlmux.backends.families import CHAT_TEMPLATE, FORMS, TaskPrompt, prompt_form
from vlmux.backends.transformers import host_inputs, load_processor
from vlmux.testing.processes import process_gone
from vlmux.tiny import ARCHITECTURES, FAMILIES
from vlmux.worker.prep import NotJoinable, join

NEW = [arch for arch in FAMILIES if arch not in ARCHITECTURES]


def pictures() -> list[Image.Image]:
    return [Image.new("RGB", (48, 40), (220, 40, 40)), Image.new("RGB", (96, 64), (40, 80, 220)),
            Image.new("RGB", (70, 90), (240, 210, 40))]


@pytest.mark.parametrize("arch", NEW)
def test_each_family_captions_in_a_worker_and_a_batch_matches_one_by_one(family_models, arch):
    path = family_models[arch]
    assert json.loads((path / "config.json").read_text())["model_type"] == arch
    assert sum(f.stat().st_size for f in path.iterdir()) < 5 * 2**20
    images = pictures()
    with pipeline(str(path), device="cpu", max_new_tokens=8, ignore_eos=True) as pipe:
        pid = pipe.status[0].pid
        batch = pipe(images)
        alone = [pipe(image) for image in images]
    assert batch == alone, arch
    assert all(isinstance(c, str) and c for c in batch)
    assert len(set(batch)) > 1, f"{arch}: the captions do not depend on the picture"
    assert process_gone(pid)


@pytest.mark.parametrize("arch", FAMILIES)
def test_parts_prepared_apart_join_to_the_whole_batch_or_say_they_cannot(family_models, arch):
    processor = load_processor(family_models[arch], trust_remote_code=False)
    form = prompt_form(family_models[arch])
    images = pictures() * 2
    prompts = ["Describe the image.", "What is in this picture? Answer in one sentence."] * 3
    whole = host_inputs(processor, images, prompts, torch.float32, form)
    parts = [host_inputs(processor, images[s : s + 3], prompts[s : s + 3], torch.float32, form) for s in (0, 3)]
    try:
        joined = join(parts, processor.tokenizer.pad_token_id)
    except NotJoinable:  # tiles per image differ between parts: the pool prepares such a chunk in one part
        assert arch in ("idefics3", "smolvlm", "llava_onevision")
        return
    assert joined.keys() == whole.keys()
    for key in whole:
        assert torch.equal(joined[key], whole[key]), (arch, key)


def test_florence_takes_task_tokens_and_no_chat_template(family_models):
    path = family_models["florence2"]
    form = prompt_form(path)
    assert form is FORMS["florence2"] and isinstance(form, TaskPrompt)
    assert prompt_form(family_models["gemma3"]) is CHAT_TEMPLATE
    processor = load_processor(path, trust_remote_code=False)
    assert form.text(processor, "<CAPTION>") == "<CAPTION>"
    assert form.text(processor, "Describe this image in one sentence.") == "<MORE_DETAILED_CAPTION>"
    with pipeline(str(path), device="cpu", max_new_tokens=6, ignore_eos=True) as pipe:
        image = pictures()[0]
        detailed = pipe(image)
        assert pipe(image, prompt="<MORE_DETAILED_CAPTION>") == detailed
        assert pipe(image, prompt="<CAPTION>") != detailed
        answer = pipe.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": "<CAPTION>"}]}])
        assert answer == pipe(image, prompt="<CAPTION>")
