"""Image parts of a chat request to image bytes: data: URLs, http(s) URLs when the server allows them (fetch.py),
and local paths only under the folder the server allows. Each image is checked in the parent against the byte and
pixel limits from its header alone, before any worker decodes it."""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmux.images import ImageError, load_image
from vlmux.serve.errors import ApiError
from vlmux.serve.fetch import FetchPolicy, fetch
from vlmux.serve.schema import Message


@dataclass(frozen=True)
class ImagePolicy:
    allow_remote: bool = False
    fetch: FetchPolicy = FetchPolicy()
    local_root: Path | None = None
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000


def image_bytes(url: str, policy: ImagePolicy, decode: bool = False) -> bytes:
    """The bytes of one image_url part, checked; ApiError 400 or 413 otherwise. `decode`: decode it whole here too,
    for a stream, whose 200 is sent before a worker would find a truncated image."""
    scheme = url[:8].lower()  # URL schemes are case-insensitive (RFC 3986): HTTP://host/x.png is a URL, not a path
    if scheme.startswith("data:"):
        data = _data_url(url, policy.max_bytes)
    elif scheme.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise ApiError(400, "image URLs are not fetched by this server (start it with --allow-remote-images); "
                                "send the image as a data: URL", "remote_images_disabled", "messages")
        data = fetch(url, policy.fetch)
    else:
        data = _local(url, policy)
    _check_image(data, policy.max_pixels)
    if decode:
        try:
            load_image(data, max_pixels=policy.max_pixels).close()
        except ImageError as e:
            raise ApiError(400, f"an image could not be read: {e}", "invalid_image", "messages") from None
    return data


def _data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, "a data: image URL must be base64 (data:image/png;base64,...)", "invalid_image_url", "messages")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ApiError(413, f"an image is larger than {max_bytes // 2**20} MiB", "image_too_large", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data: image URL is not valid base64", "invalid_image_url", "messages") from None


def _local(url: str, policy: ImagePolicy) -> bytes:
    if policy.local_root is None:
        raise ApiError(400, "only data: URLs (and http(s) URLs when allowed) are accepted as images; local paths need "
                            "the server's --allow-local-images DIR", "local_images_disabled", "messages")
    text = url[7:] if url[:7].lower() == "file://" else url
    root = policy.local_root.resolve()
    refused = ApiError(400, f"image path {text[:200]!r} is not a file under the allowed folder", "invalid_image_path",
                       "messages")
    try:  # a NUL byte (ValueError) or a name too long (OSError) is a bad path, not the server's fault
        path = (root / text).resolve()  # an absolute path stays itself; either way it must lie under the root
        if not path.is_relative_to(root) or not path.is_file():
            raise refused
        if path.stat().st_size > policy.max_bytes:
            raise ApiError(413, f"an image is larger than {policy.max_bytes // 2**20} MiB", "image_too_large", "messages")
        return path.read_bytes()
    except (OSError, ValueError):
        raise refused from None


def _check_image(data: bytes, max_pixels: int) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
    except UnidentifiedImageError:
        raise ApiError(400, f"an image could not be read: its {len(data)} bytes are not a picture in a format Pillow "
                            f"reads (PNG, JPEG, WebP, GIF, ...); send the file itself", "invalid_image", "messages") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"an image could not be read: {e}", "invalid_image", "messages") from None
    if width * height > max_pixels:
        raise ApiError(413, f"an image of {width}x{height} pixels is over the server's limit of {max_pixels} pixels",
                       "image_too_large", "messages")


def worker_messages(messages: tuple[Message, ...], policy: ImagePolicy, decode: bool = False) -> list[dict]:
    """The request's messages as the worker's chat takes them: content parts of text and image bytes (each decoded
    here first when `decode`, see image_bytes)."""
    converted = []
    for message in messages:
        parts = []
        for part in message.parts:
            if part.image_url is not None:
                if message.role != "user":
                    raise ApiError(400, "images are accepted in user messages only", "invalid_request", "messages")
                parts.append({"type": "image", "image": image_bytes(part.image_url, policy, decode)})
            else:
                parts.append({"type": "text", "text": part.text})
        converted.append({"role": message.role, "content": parts})
    return converted
