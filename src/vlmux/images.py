"""Turning paths, bytes and PIL images into RGB pictures, with errors that name the file."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps

ImageInput = Union[str, Path, bytes, Image.Image]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".heic"}
)
# Pillow's draft() lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding, which is far
# cheaper than decoding a 12 MP photo in full and resizing it; processors resize far below this.
DRAFT_SIZE = (1024, 1024)


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


def check_input(item: object) -> str | None:
    """Why `item` can never be an image (a wrong type, a PIL image without pixels), or None; decodes nothing."""
    if isinstance(item, Image.Image):
        width, height = item.size
        return f"empty image: a {width}x{height} PIL image has no pixels" if width == 0 or height == 0 else None
    if isinstance(item, (str, bytes, os.PathLike)):
        return None
    return f"not an image: {type(item).__name__}; give a path, bytes or a PIL image"


def load_image(source: ImageInput, draft: tuple[int, int] | None = DRAFT_SIZE) -> Image.Image:
    """Decode one image to RGB, first frame only, EXIF rotation applied."""
    reason = check_input(source)
    if reason is not None:
        raise ImageError(reason)
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", draft)
            image.load()
    except FileNotFoundError:
        raise ImageError(f"file not found: {source}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large (decompression bomb guard): {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    return image.convert("RGB")


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS
