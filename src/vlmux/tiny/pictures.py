"""Sample pictures for the demo and the tests: one or two filled shapes on a plain background."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

_COLORS = [(220, 40, 40), (40, 80, 220), (240, 210, 40), (40, 160, 80)]
_BACKGROUNDS = [(255, 255, 255), (235, 235, 235)]


def draw_sample_images(out_dir: str | Path, count: int = 6, seed: int = 0) -> list[Path]:
    """Draw `count` small pictures of one or two filled shapes; PNG and JPEG alternate."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = rng.randint(64, 320), rng.randint(64, 320)
        image = Image.new("RGB", (width, height), rng.choice(_BACKGROUNDS))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 2)):
            _draw_shape(draw, rng, width, height)
        path = out / f"sample_{i}.{'png' if i % 2 == 0 else 'jpg'}"
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def _draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    side = rng.randint(min(width, height) // 4, min(width, height) // 2)
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    color = rng.choice(_COLORS)
    kind = rng.choice(["circle", "square", "triangle"])
    if kind == "circle":
        draw.ellipse([x, y, x + side, y + side], fill=color)
    elif kind == "square":
        draw.rectangle([x, y, x + side, y + side], fill=color)
    else:
        draw.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=color)


def ellipses(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """One coloured ellipse on near-white per (width, height): pictures of mixed sizes for batch tests."""
    images = []
    for index, (width, height) in enumerate(sizes):
        image = Image.new("RGB", (width, height), (250, 250, 250))
        colour = (60 * index % 256, 200 - 30 * index, 40 + 50 * index % 256)
        ImageDraw.Draw(image).ellipse([width // 5, height // 5, 4 * width // 5, 4 * height // 5], fill=colour)
        images.append(image)
    return images
