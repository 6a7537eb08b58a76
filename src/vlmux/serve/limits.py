"""What one chat request may hold, checked in the parent before a worker takes it: images per request, pixels of all
its images together (from their headers, before any decoding) and characters of text; and how long it may run. Each refusal is a 400 naming
the limit and the `vlmux serve` flag that changes it. The prompt's tokens against the model's context length are
checked by the worker, the only side with the tokenizer (`backends/context.py`)."""
from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from PIL import Image

from vlmux.serve.errors import ApiError

if TYPE_CHECKING:  # settings holds a RequestLimits, and schema imports settings
    from vlmux.serve.schema import ChatRequest

T = TypeVar("T")


@dataclass(frozen=True)
class RequestLimits:
    max_images: int = 16  # --max-images
    max_pixels: int = 80_000_000  # --max-request-pixels: all of a request's images together
    max_chars: int = 100_000  # --max-chars: the text of all its messages
    max_seconds: float | None = None  # --request-timeout: from its arrival to its answer's end; None: no deadline

    def __post_init__(self) -> None:
        for flag, value in (("--max-images", self.max_images), ("--max-request-pixels", self.max_pixels),
                            ("--max-chars", self.max_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a whole number of at least 1, not {value!r}")
        if self.max_seconds is not None and not (isinstance(self.max_seconds, (int, float)) and self.max_seconds > 0):
            raise ValueError(f"--request-timeout must be a duration above 0 (30, 90s, 5m), not {self.max_seconds!r}")


async def within_deadline(answer: Awaitable[T], limits: RequestLimits) -> T:
    """The answer, or a 504 once the request has run for --request-timeout: the answer is cancelled, so its worker
    stops spending on it within one step."""
    if limits.max_seconds is None:
        return await answer
    try:
        return await asyncio.wait_for(answer, limits.max_seconds)
    except asyncio.TimeoutError:
        raise ApiError(504, f"no answer within {limits.max_seconds:g} s, this server's limit per request (vlmux serve "
                            f"--request-timeout)", "timeout") from None


def check_request(request: ChatRequest, limits: RequestLimits) -> None:
    """Images counted and text measured before any image is fetched or decoded."""
    images = sum(part.image_url is not None for message in request.messages for part in message.parts)
    if images > limits.max_images:
        raise ApiError(400, f"the request holds {images} images; this server takes at most {limits.max_images} per "
                            f"request (vlmux serve --max-images)", "too_many_images", "messages")
    chars = sum(len(part.text) for message in request.messages for part in message.parts if part.text is not None)
    if chars > limits.max_chars:
        raise ApiError(400, f"the request's messages hold {chars:,} characters of text; this server takes at most "
                            f"{limits.max_chars:,} (vlmux serve --max-chars)", "too_much_text", "messages")


def check_pixels(messages: list[dict], limits: RequestLimits) -> None:
    """messages: as `worker_messages` made them (image parts hold their bytes, each image already checked alone);
    the pixels of all images together, read from their headers."""
    total = 0
    for message in messages:
        for part in message["content"]:
            if part.get("type") == "image":
                with Image.open(io.BytesIO(part["image"])) as image:  # the header only
                    total += image.size[0] * image.size[1]
    if total > limits.max_pixels:
        raise ApiError(400, f"the request's images hold {total:,} pixels together; this server takes at most "
                            f"{limits.max_pixels:,} per request (vlmux serve --max-request-pixels)", "too_many_pixels",
                       "messages")
