"""The shapes grammar and the bundled `vlmux/shapes` captioner trained on it.

Caption accuracy is asserted through every captioning path vlmux has: plain and batched `generate` on the
model loaded with from_pretrained, the pool's worker process (vlmux.pipeline) and `vlmux demo`'s caption job.
There is no server yet, so there is no server test. The model tests skip only while the packaged model folder
is absent (it is built by tools/train_shapes.py).
"""
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it

import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlmux
from vlmux.config import DEFAULT_PROMPT
from vlmux.hub import resolve_model
from vlmux.images import load_image
from vlmux import shapes

TEST_SEED = 7_654_321  # neither the training stream (0), its held-out set nor tools/eval_shapes.py
SHAPES = "vlmux/shapes"
PACKAGED = Path(vlmux.__file__).parent / "models" / "shapes"
SAMPLE_CAPTIONS = Path(vlmux.__file__).parent / "samples" / "captions.json"  # the demo's pictures, as drawn
needs_model = pytest.mark.skipif(not (PACKAGED / "config.json").is_file(),
                                 reason=f"no packaged model in {PACKAGED}: run tools/train_shapes.py")


# --- the grammar -----------------------------------------------------------------------------------


def scenes(count: int = 400, seed: int = 3) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.sample_scene(rng) for _ in range(count)]


def test_canvas_and_shape_sizes() -> None:
    seen = set()
    for scene in scenes():
        assert 64 <= scene.width <= 1024 and 64 <= scene.height <= 1024
        assert scene.background in ((255, 255, 255), (235, 235, 235))
        shorter = min(scene.width, scene.height)
        for s in scene.shapes:
            assert 0 <= s.x and s.x + s.side <= scene.width and 0 <= s.y and s.y + s.side <= scene.height
            if s.large:
                assert s.side >= 0.45 * shorter
            else:
                assert max(8, 0.10 * shorter) <= s.side <= 0.30 * shorter
            seen.add((s.kind, s.color, s.large))
        seen.add(len(scene.shapes))
    assert {1, 2} <= seen
    assert len(seen) == 2 + len(shapes.KINDS) * len(shapes.COLORS) * 2  # every kind, colour and size occurs


def test_two_shapes_never_overlap_and_caption_order() -> None:
    relations = set()
    for scene in scenes():
        if len(scene.shapes) == 1:
            assert scene.caption == scene.shapes[0].phrase()
            continue
        a, b = scene.shapes
        assert (a.x + a.side <= b.x or b.x + b.side <= a.x or a.y + a.side <= b.y or b.y + b.side <= a.y)
        (ax, ay), (bx, by) = a.centre, b.centre
        if abs(ax - bx) > abs(ay - by):
            left, right = (a, b) if ax < bx else (b, a)
            assert scene.caption == f"{left.phrase()} left of {right.phrase()}"
        else:
            upper, lower = (a, b) if ay < by else (b, a)
            assert scene.caption == f"{upper.phrase()} above {lower.phrase()}"
        relations.add(scene.caption.split()[4])
    assert relations == {"left", "above"}


def test_pictures_show_the_shapes() -> None:
    for scene in scenes(60):
        image = shapes.render(scene)
        assert image.size == (scene.width, scene.height)
        assert image.getpixel((0, 0)) == scene.background or any(s.x == 0 and s.y == 0 for s in scene.shapes)
        for s in scene.shapes:
            # The middle of the box's lower half is inside every kind, triangles included.
            point = (s.x + s.side // 2, s.y + (3 * s.side) // 4)
            assert image.getpixel(point) == shapes.COLORS[s.color]


def test_dataset_is_deterministic_and_mixes_formats(tmp_path: Path) -> None:
    first = shapes.write_dataset(tmp_path / "a", 24, seed=5)
    again = shapes.write_dataset(tmp_path / "b", 24, seed=5)
    other = shapes.write_dataset(tmp_path / "c", 24, seed=6)
    assert [p.read_bytes() for p, _ in again] == [p.read_bytes() for p, _ in first]
    assert [c for _, c in again] == [c for _, c in first]
    assert [p.read_bytes() for p, _ in other] != [p.read_bytes() for p, _ in first]
    assert {p.suffix for p, _ in first} == {".png", ".jpg"}
    for path, _ in first:
        with Image.open(path) as image:
            assert image.format == ("PNG" if path.suffix == ".png" else "JPEG")
            assert all(64 <= side <= 1024 for side in image.size)


# --- the bundled model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled() -> Path:
    return resolve_model("vlmux/shapes")


@pytest.fixture(scope="module")
def loaded(bundled: Path):
    processor = AutoProcessor.from_pretrained(bundled, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(bundled, dtype=torch.float32, local_files_only=True).eval()
    return processor, model


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    return shapes.write_dataset(tmp_path_factory.mktemp("fresh"), 64, seed=TEST_SEED)


def generate(loaded, paths: list[Path]) -> list[str]:
    processor, model = loaded
    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [[load_image(path)] for path in paths]
    inputs = processor(text=[text] * len(paths), images=images, padding=True, return_tensors="pt")
    if len(paths) > 1:
        assert (inputs["attention_mask"] == 0).any()  # left padding is really exercised
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


@pytest.fixture(scope="module")
def one_by_one(loaded, fresh) -> list[str]:
    return [generate(loaded, [path])[0] for path, _ in fresh]


def correct(captions: list[str], samples: list[tuple[Path, str]]) -> float:
    return sum(got == want for got, (_, want) in zip(captions, samples)) / len(samples)


@needs_model
def test_bundled_folder_loads_offline(bundled: Path, loaded) -> None:
    processor, model = loaded
    assert model.config.model_type == "qwen2_vl"
    assert sum(f.stat().st_size for f in bundled.iterdir() if f.is_file()) <= 10 * 2**20
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "processor_config.json"} <= {f.name for f in bundled.iterdir()}
    assert processor.tokenizer.eos_token_id in model.generation_config.eos_token_id


@needs_model
def test_captions_fresh_pictures_one_by_one(one_by_one: list[str], fresh) -> None:
    assert correct(one_by_one, fresh) >= 0.90, list(zip(one_by_one, fresh))


@needs_model
def test_batches_match_one_by_one(loaded, fresh, one_by_one: list[str]) -> None:
    batched = []
    for start in range(0, len(fresh), 8):
        batched += generate(loaded, [path for path, _ in fresh[start : start + 8]])
    assert batched == one_by_one
    assert correct(batched, fresh) >= 0.90


@needs_model
def test_pipeline_worker_captions_like_generate(fresh, one_by_one: list[str]) -> None:
    with vlmux.pipeline("vlmux/shapes", device="cpu", batch_size=8) as captioner:
        captions = captioner([str(path) for path, _ in fresh[:24]])
    assert captions == one_by_one[:24]
    assert correct(captions, fresh[:24]) >= 0.90


@needs_model
def test_resolves_without_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the bundled model must not touch the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model("vlmux/shapes")
    assert (path / "config.json").is_file()
    assert path == PACKAGED


@needs_model
def test_demo_captions_the_samples(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "vlmux.cli", "demo", "--out", str(tmp_path), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    expected = json.loads(SAMPLE_CAPTIONS.read_text())
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    shapes_rows = {Path(row["file"]).name: row["caption"] for row in rows if row["model"] == SHAPES}
    assert shapes_rows.keys() == expected.keys()
    assert sum(shapes_rows[name] == caption for name, caption in expected.items()) >= len(expected) - 1, run.stdout
    assert len({row["model"] for row in rows}) == 2
    assert run.stdout.count("released") + run.stdout.count("release verified") == 2
