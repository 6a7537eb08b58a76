"""Turning paths, bytes and PIL images into RGB pictures, with errors that name the file."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps

from vlmux.config import MAX_PIXELS

ImageInput = Union[str, Path, bytes, Image.Image]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".heic"}
)
# Pillow's draft() lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding, which is far
# cheaper than decoding a 12 MP photo in full and resizing it; processors resize far below this.
DRAFT_SIZE = (1024, 1024)
JPEG_MAX_REDUCTION = 64  # draft() scales each side by up to 1/8
# Qwen2-VL's processor refuses an aspect ratio of 200:1 or more; a strip beyond MAX_ASPECT is padded to it.
MAX_ASPECT = 100
NOTE = "vlmux_note"  # the key in Image.info of what decoding changed about the picture (a padded strip)


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


def check_input(item: object) -> str | None:
    """Why `item` can never be an image (a wrong type, a PIL image without pixels), or None; decodes nothing."""
    if isinstance(item, Image.Image):
        width, height = item.size
        return f"empty image: a {width}x{height} PIL image has no pixels" if width == 0 or height == 0 else None
    if isinstance(item, str) and _is_url(item):
        return f"a URL ({item:.80}): vlmux reads files, not URLs; download it and give its path or its bytes"
    if isinstance(item, (str, bytes, os.PathLike)):
        return None
    return f"not an image: {type(item).__name__}; give a path, bytes or a PIL image"


def from_caller(item: object) -> object:
    """`item` with a relative path made absolute here, in the caller's current folder: a worker runs in another
    folder (the fork server's), so a path must not be resolved there. A URL is left as it is (check_input refuses it)."""
    if isinstance(item, os.PathLike):
        item = os.fspath(item)
    if isinstance(item, str) and not _is_url(item):
        return os.path.abspath(item)
    return item


def _is_url(text: str) -> bool:
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isalpha()


def load_image(source: ImageInput, draft: tuple[int, int] | None = DRAFT_SIZE,
               max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Decode one image to RGB, first frame only, EXIF rotation applied. An image that would take more than
    `max_pixels` pixels to decode (a JPEG counts at its draft size) is refused as a possible decompression bomb;
    None: no limit."""
    reason = check_input(source)
    if reason is not None:
        raise ImageError(reason)
    if isinstance(source, Image.Image):
        return fit_aspect(_to_rgb(source), max_pixels)
    _leave_the_limit_to_us(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", draft)
            _check_pixels(image.size, max_pixels)  # after draft(): what load() will allocate
            image.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"file not found: {source}") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large (decompression bomb guard): {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}") from None
    return fit_aspect(_to_rgb(image), max_pixels)


def fit_aspect(image: Image.Image, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """`image`, or a strip beyond MAX_ASPECT:1 padded on white to that ratio (centred), which every processor takes;
    the padded copy says so in `info[NOTE]`. Padding counts against `max_pixels` too: a 10^6 x 1 strip is no bomb
    until padded."""
    width, height = image.size
    if max(width, height) <= MAX_ASPECT * min(width, height):
        return image
    short = -(-max(width, height) // MAX_ASPECT)  # the short side at MAX_ASPECT:1, rounded up
    size = (width, short) if width > height else (short, height)
    _check_pixels(size, max_pixels)
    padded = Image.new("RGB", size, (255, 255, 255))
    padded.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    padded.info[NOTE] = (f"padded from {width}x{height} to {size[0]}x{size[1]}: an aspect ratio over {MAX_ASPECT}:1 "
                         f"is refused by some processors")
    return padded


def _leave_the_limit_to_us(max_pixels: int | None) -> None:
    """Pillow's own guard counts a JPEG's full size before draft() shrinks it: raise it (process-wide, never lower)
    so that _check_pixels decides."""
    needed = None if max_pixels is None else max_pixels * JPEG_MAX_REDUCTION
    if Image.MAX_IMAGE_PIXELS is not None and (needed is None or Image.MAX_IMAGE_PIXELS < needed):
        Image.MAX_IMAGE_PIXELS = needed


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} would decode to {width * height / 1e6:.1f} megapixels, "
                         f"over the limit of {max_pixels / 1e6:g} (a guard against decompression bombs); raise it "
                         f"with --max-pixels N (max_pixels in the Python API)")


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit samples scaled to 8; a 32-bit "I" image holding 0-255 values (numpy's int arrays) is 8-bit already
        scale = 1 if image.mode == "I" and image.getextrema()[1] <= 255 else 1 / 256
        image = image.point(lambda value: value * scale).convert("L")
    return image.convert("RGB")


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS
