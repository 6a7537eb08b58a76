"""The shapes grammar that the bundled `vlmux/shapes` captioner is trained on and judged against.

A canvas of 64..1024 px per side, white or light gray, holding one or two filled shapes. Each shape is
`small` (bounding box side at most 30 % of the canvas's shorter side) or `large` (at least 45 %); two
shapes never overlap, and the caption names the left one first (`left of`) when their centres differ
more horizontally than vertically, else the upper one first (`above`).
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 170), "orange": (250, 140, 30), "black": (20, 20, 20),
}
KINDS = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235))
MIN_SIDE, MAX_SIDE = 64, 1024
# Box sides in percent of the shorter side (integers keep the bounds exact): nothing between 30 and 45.
SMALL_MAX_PCT, LARGE_MIN_PCT = 30, 45
SMALL_MIN_PCT, SMALL_MIN_PX = 10, 8  # the smallest shape stays a recognisable blob
LARGE_MAX_PCT = 80
GAP = 0.05  # empty space between two shapes' boxes, of the shorter side, so they never touch
# Centre offsets closer to the diagonal than this (|dx - dy| / max(dx, dy)) are not drawn: at 45 degrees
# `left of` and `above` are a coin toss for a human too.
DIAGONAL_MARGIN = 0.10
JPEG_QUALITY = (75, 95)
WORDS = ("a", "small", "large", *COLORS, *KINDS, "left", "of", "above")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: int  # left edge of the bounding box
    y: int  # top edge
    side: int  # the box covers side x side pixels
    large: bool

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + (self.side - 1) / 2, self.y + (self.side - 1) / 2

    def phrase(self) -> str:
        return f"a {'large' if self.large else 'small'} {self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    @property
    def caption(self) -> str:
        return caption(self.shapes)


def caption(shapes: tuple[Shape, ...]) -> str:
    ordered, relation = in_caption_order(shapes)
    return f" {relation} ".join(shape.phrase() for shape in ordered)


def in_caption_order(shapes: tuple[Shape, ...]) -> tuple[tuple[Shape, ...], str]:
    """The shapes in the order the caption names them, and the word(s) between them ('' for one shape)."""
    if len(shapes) == 1:
        return shapes, ""
    (ax, ay), (bx, by) = shapes[0].centre, shapes[1].centre
    if abs(ax - bx) > abs(ay - by):
        return tuple(sorted(shapes, key=lambda s: s.centre[0])), "left of"
    return tuple(sorted(shapes, key=lambda s: s.centre[1])), "above"


def side_range(shorter: int, large: bool) -> tuple[int, int]:
    """The inclusive range of box sides a small or large shape may have on a canvas of this shorter side."""
    if large:
        return -(-shorter * LARGE_MIN_PCT // 100), shorter * LARGE_MAX_PCT // 100
    return max(SMALL_MIN_PX, -(-shorter * SMALL_MIN_PCT // 100)), shorter * SMALL_MAX_PCT // 100


def sample_scene(rng: random.Random, max_side: int = MAX_SIDE, count: int | None = None) -> Scene:
    """A random scene of `count` shapes (1 or 2 at random if None); max_side below 1024 draws smaller
    canvases (the bundled samples stay a few KB)."""
    width, height = rng.randint(MIN_SIDE, max_side), rng.randint(MIN_SIDE, max_side)
    background = rng.choice(BACKGROUNDS)
    if count is None:
        count = rng.randint(1, 2)
    while True:  # a placement that fits is found within a few tries on every canvas size
        shapes = _place(rng, width, height, count)
        if shapes is not None:
            return Scene(width, height, background, shapes)


def _place(rng: random.Random, width: int, height: int, count: int) -> tuple[Shape, ...] | None:
    shorter = min(width, height)
    shapes: list[Shape] = []
    for _ in range(count):
        large = rng.random() < 0.5
        low, high = side_range(shorter, large)
        side = rng.randint(low, high)
        kind, color = rng.choice(KINDS), rng.choice(list(COLORS))
        for _ in range(50):
            shape = Shape(kind, color, rng.randint(0, width - side), rng.randint(0, height - side), side, large)
            if all(_apart(shape, other, GAP * shorter) for other in shapes):
                break
        else:
            return None
        shapes.append(shape)
    return tuple(shapes)


def _apart(a: Shape, b: Shape, gap: float) -> bool:
    separated = (a.x + a.side + gap <= b.x or b.x + b.side + gap <= a.x
                 or a.y + a.side + gap <= b.y or b.y + b.side + gap <= a.y)
    dx, dy = abs(a.centre[0] - b.centre[0]), abs(a.centre[1] - b.centre[1])
    return separated and abs(dx - dy) >= DIAGONAL_MARGIN * max(dx, dy)


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        draw_shape(draw, s, COLORS[s.color])
    return image


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape, fill: tuple[int, int, int] | int) -> None:
    box = [s.x, s.y, s.x + s.side - 1, s.y + s.side - 1]
    if s.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif s.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(s.x + (s.side - 1) / 2, s.y), (s.x, box[3]), (box[2], box[3])], fill=fill)


def draw(rng: random.Random, max_side: int = MAX_SIDE) -> tuple[Image.Image, str]:
    """One picture of the grammar and its caption."""
    scene = sample_scene(rng, max_side)
    return render(scene), scene.caption


def encode(image: Image.Image, rng: random.Random) -> tuple[bytes, str]:
    """The picture as a file's bytes, PNG or JPEG (quality 75..95) at random; returns (bytes, suffix)."""
    buffer = io.BytesIO()
    if rng.random() < 0.5:
        image.save(buffer, format="PNG")
        return buffer.getvalue(), ".png"
    image.save(buffer, format="JPEG", quality=rng.randint(*JPEG_QUALITY))
    return buffer.getvalue(), ".jpg"


def write_dataset(out_dir: str | Path, count: int, seed: int, max_side: int = MAX_SIDE,
                  stem: str = "image_") -> list[tuple[Path, str]]:
    """Write `count` pictures to out_dir as image_00000.png / .jpg; returns (path, caption) pairs.

    Same seed, same bytes.
    """
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        image, text = draw(rng, max_side)
        data, suffix = encode(image, rng)
        path = out / f"{stem}{index:05d}{suffix}"
        path.write_bytes(data)
        written.append((path, text))
    return written
