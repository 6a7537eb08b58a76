import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, BatchFeature, PreTrainedModel, ProcessorMixin

try:
    from vlmux.tiny import ARCHITECTURES, build_tiny, draw_sample_images
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from vlmux.tiny import ARCHITECTURES, build_tiny, draw_sample_images

QUESTIONS = (
    "Describe the image.",
    "What is in this picture?",
    "What color is the shape in the middle of this picture, and how many shapes are there?",
)


@dataclass(frozen=True)
class Tiny:
    arch: str
    path: Path
    processor: ProcessorMixin
    model: PreTrainedModel


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    path = build_tiny(tmp_path_factory.mktemp(request.param), request.param)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return Tiny(request.param, path, processor, model)


def picture(width: int, height: int, color: tuple[int, int, int], shape: str = "circle") -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    box = [width // 4, height // 4, 3 * width // 4, 3 * height // 4]
    draw = ImageDraw.Draw(image)
    draw.ellipse(box, fill=color) if shape == "circle" else draw.rectangle(box, fill=color)
    return image


def prompt(processor: ProcessorMixin, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def caption(t: Tiny, texts: list[str], images: list[Image.Image]) -> tuple[torch.Tensor, BatchFeature]:
    t.processor.tokenizer.padding_side = "left"
    inputs = t.processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = t.model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :], inputs


def test_loads_with_auto_classes(tiny: Tiny) -> None:
    assert tiny.model.config.model_type == tiny.arch
    assert sum(f.stat().st_size for f in tiny.path.iterdir()) < 10 * 2**20
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        f.name for f in tiny.path.iterdir()
    }
    tok, config = tiny.processor.tokenizer, tiny.model.config
    text_config = config.get_text_config()
    image_token_id = tok.convert_tokens_to_ids(tiny.processor.image_token)
    assert config.image_token_id == tiny.processor.image_token_id == image_token_id
    assert text_config.vocab_size == len(tok)
    assert tok.pad_token_id is not None and text_config.pad_token_id == tok.pad_token_id
    eos = tiny.model.generation_config.eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert tiny.model.generation_config.pad_token_id == tok.pad_token_id


def test_chat_template(tiny: Tiny) -> None:
    text = prompt(tiny.processor, "Describe the image.")
    assert "Describe the image." in text
    assert text.count(tiny.processor.image_token) == 1
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    ]
    no_prompt = tiny.processor.apply_chat_template(messages, tokenize=False)
    assert "A red circle." in no_prompt
    assert not text.startswith(no_prompt)  # add_generation_prompt adds the assistant header


def test_caption_two_sizes(tiny: Tiny) -> None:
    text = prompt(tiny.processor, "Describe the image.")
    images = [picture(40, 30, (220, 40, 40)), picture(64, 64, (40, 80, 220), "square")]
    new, _ = caption(tiny, [text, text], images)
    assert new.shape == (2, 8)
    captions = tiny.processor.batch_decode(new, skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    # The model must look at the picture, or a batch that mixes up images would go unnoticed.
    assert not torch.equal(new[0], new[1])


def test_batch_matches_one_by_one(tiny: Tiny) -> None:
    images = [
        picture(40, 30, (220, 40, 40)),
        picture(64, 64, (40, 80, 220), "square"),
        picture(100, 50, (240, 210, 40)),
    ]
    texts = [prompt(tiny.processor, q) for q in QUESTIONS]
    batch, inputs = caption(tiny, texts, images)
    assert (inputs["attention_mask"] == 0).any()  # left padding is really exercised
    for i, (text, image) in enumerate(zip(texts, images)):
        alone, _ = caption(tiny, [text], [image])
        assert alone[0].tolist() == batch[i].tolist(), f"{tiny.arch}: row {i} differs"


def test_same_seed_same_bytes(tiny: Tiny, tmp_path: Path) -> None:
    again = build_tiny(tmp_path / "again", tiny.arch, seed=0)
    other = build_tiny(tmp_path / "other", tiny.arch, seed=1)
    weights = (tiny.path / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    assert (again / "tokenizer.json").read_bytes() == (tiny.path / "tokenizer.json").read_bytes()


def test_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        build_tiny(tmp_path, "gpt-vision-9000")
    assert all(arch in str(err.value) for arch in ARCHITECTURES)


def test_draw_sample_images(tmp_path: Path) -> None:
    paths = draw_sample_images(tmp_path / "a", count=6, seed=0)
    assert len(paths) == 6
    assert {p.suffix for p in paths} == {".png", ".jpg"}
    for path in paths:
        with Image.open(path) as image:
            image.load()
            assert image.mode == "RGB"
            assert all(64 <= side <= 320 for side in image.size)
            assert image.format == ("PNG" if path.suffix == ".png" else "JPEG")
    again = draw_sample_images(tmp_path / "b", count=6, seed=0)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    other = draw_sample_images(tmp_path / "c", count=6, seed=1)
    assert [p.read_bytes() for p in other] != [p.read_bytes() for p in paths]
