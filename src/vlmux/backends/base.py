"""What a backend is: the object inside a worker that owns a loaded model."""
from __future__ import annotations

from typing import Any, Protocol

from PIL import Image

from vlmux.config import GenerationSpec


class OutOfMemory(RuntimeError):
    """The device ran out of memory for this batch; a smaller batch may fit."""


class Backend(Protocol):
    device: str
    dtype: str

    def caption(self, images: list[Image.Image], prompts: list[str], gen: GenerationSpec) -> list[str]:
        """One caption per image, in order; raises OutOfMemory when the batch does not fit."""
        ...

    def chat(self, messages: list[dict[str, Any]], images: list[Image.Image], gen: GenerationSpec) -> str:
        """Answer a conversation whose image items were replaced by {"type": "image"}."""
        ...

    def sleep(self) -> None:
        """Move the weights to host memory; the process keeps its device context."""
        ...

    def wake(self) -> None:
        ...

    def close(self) -> None:
        """Drop the model and do the best in-process cleanup there is."""
        ...
