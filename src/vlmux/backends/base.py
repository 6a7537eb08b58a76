"""What a backend is: the object inside a worker that owns a loaded model. Everything the worker's handler uses of
a backend is declared here; this module stays free of torch, since the handler is imported by the parent too."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from PIL import Image

from vlmux.config import GenerationSpec
from vlmux.protocol import Chatted

# A caption batch made ready by `prepare` or `from_host`; the handler only hands it back to `generate`.
PreparedBatch = Any


class OutOfMemory(RuntimeError):
    """The device ran out of memory for this batch; a smaller batch may fit."""


class RowControl(Protocol):
    """How a chat's generation hears from its callers between steps (the worker's handler implements it)."""

    def aborted(self, row: int) -> bool:
        """Whether conversation `row` of the call was aborted: it stops spending at the next step."""
        ...

    def running(self, rows: int) -> None:
        """The call's rows still generating, told after each step."""
        ...


class Backend(Protocol):
    device: str
    """Where the model runs: "cpu" or "cuda:N"."""
    dtype: str
    """The weights' dtype, without "torch.": "bfloat16", "float32", ..."""
    timings: dict[str, float]
    """Where the load's time went, for Loaded.timings."""
    generated_tokens: int
    """New tokens generated since the load, a running total for tokens/s."""
    prepares_apart: bool
    """Whether preparing processes (worker/prep.py: the processor in other processes) can make its caption batches."""

    @property
    def pad_token_id(self) -> int:
        """The token that pads prompts on the left and fills the rows of a padded batch."""
        ...

    @property
    def pads_batches(self) -> bool:
        """Whether a short batch is best padded up to the worker's batch size (the compiled decode step's shape)."""
        ...

    def largest_batch(self, max_new_tokens: int, memory_budget: int | None) -> int | None:
        """The most images a batch of `max_new_tokens` fits in the budget and free device memory; None on the CPU."""
        ...

    def caption(self, images: list[Image.Image], prompts: list[str], gen: GenerationSpec) -> list[str]:
        """One caption per image, in order; raises OutOfMemory when the batch does not fit."""
        ...

    def prepare(self, images: list[Image.Image], prompts: list[str], pad_to: int | None = None) -> PreparedBatch:
        """The host half of `caption`, safe beside a running `generate`; pad_to: the batch size to pad up to."""
        ...

    def from_host(self, inputs: dict[str, Any], rows: int) -> PreparedBatch:
        """A batch another process prepared (tensors in the model's dtype, `rows` real images), for `generate`."""
        ...

    def generate(self, prepared: PreparedBatch, gen: GenerationSpec) -> list[str]:
        """The device half of `caption`: a caption per real row; raises OutOfMemory when the batch does not fit."""
        ...

    def chat(self, messages: list[dict[str, Any]], images: list[Image.Image], gen: GenerationSpec,
             on_text: Callable[[str], None] | None = None, control: RowControl | None = None,
             logprobs: int | None = None) -> Chatted:
        """Answer a conversation whose image items were replaced by {"type": "image"}, with its token counts;
        `on_text` gets the answer's text in pieces as it is generated (they join to Chatted.text); `control` (row 0)
        ends it early when aborted (finish_reason "abort"); `logprobs` (not None): Chatted.logprobs per answer token
        with that many likeliest tokens (NotImplementedError where the model gives no scores). Raises
        ContextExceeded when it cannot fit."""
        ...

    def chat_batch(self, conversations: list[tuple[list[dict[str, Any]], list[Image.Image]]], gen: GenerationSpec,
                   on_text: Callable[[int, str], None] | None = None, control: RowControl | None = None,
                   logprobs: list[int | None] | None = None) -> list[Chatted]:
        """Conversations (messages, images) answered together in one batch, each with images or none;
        `on_text(row, piece)` streams each one's text; an aborted row stops at the next step; `logprobs`: each
        row's, as `chat` takes it. Raises OutOfMemory when the batch does not fit, ContextExceeded naming the rows
        over the context length."""
        ...

    def after_reply(self) -> None:
        """Work kept off a first answer's path (unpinning what a warm spare pinned), done once an answer is sent."""
        ...

    def sleep(self) -> None:
        """Move the weights to host memory; the process keeps its device context."""
        ...

    def wake(self) -> None:
        """Bring the weights back to the device after `sleep`."""
        ...

    def close(self) -> None:
        """Drop the model and do the best in-process cleanup there is."""
        ...
