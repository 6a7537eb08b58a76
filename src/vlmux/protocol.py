"""Messages between the parent and a worker. Both ends are vlmux processes of one user, so pickle is safe here."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Union

from vlmux.config import GenerationSpec, ModelSpec
from vlmux.images import ImageInput
from vlmux.logs import LogSettings


@dataclass(frozen=True)
class Load:
    spec: ModelSpec
    path: str
    env: dict[str, str]  # applied before CUDA starts: CUDA_VISIBLE_DEVICES places the worker
    # Device bytes the worker may spend on batches (KV cache and activations) beyond its weights and context: the
    # placement's charge less the weights. None: no budget from the pool (the CPU); the worker keeps to free memory.
    memory_budget: int | None = None
    batch_size: int | None = None  # the caller's largest batch; None: auto, the worker sizes it within its budget
    max_new_tokens: int = GenerationSpec.max_new_tokens  # what Loaded.batch_size is sized for
    # the caller's logging and warnings settings when the parent makes the request, applied before the load
    log: LogSettings | None = field(default_factory=LogSettings.here)


@dataclass(frozen=True)
class Warm:
    """Get ready to load `path` fast (CUDA context, staging memory, the model's kernels) without loading it."""

    spec: ModelSpec
    path: str
    env: dict[str, str]
    pin_weights: bool = False  # also pin the checkpoint's page-cache pages for DMA (backends/pinned.py)


@dataclass(frozen=True)
class Caption:
    items: list[ImageInput]
    prompts: list[str]
    gen: GenerationSpec
    batch_size: int | None  # images per model batch, capped by the worker's budget; None: the worker's own size


_CHAT_IDS = itertools.count(1)


@dataclass(frozen=True)
class Chat:
    messages: list[dict[str, Any]]
    gen: GenerationSpec
    stream: bool = False  # send the answer's text as it is generated (ChatText), before the Chatted reply
    ident: int = field(default_factory=lambda: next(_CHAT_IDS))  # unique in the parent: what an Abort names
    logprobs: int | None = None  # None: none; n: each answer token's log-probability and the n likeliest tokens'


@dataclass(frozen=True)
class Abort:
    """Sent at any time, also while a request runs: stop the chat `ident` (its caller left). The worker stops
    spending on it within one step and answers it early (finish_reason "abort"); an ident it never runs is ignored."""

    ident: int


@dataclass(frozen=True)
class Chats:
    """Conversations with the same generation settings, answered together in one batch."""

    chats: list[Chat]


@dataclass(frozen=True)
class Sleep:
    pass


@dataclass(frozen=True)
class Wake:
    pass


@dataclass(frozen=True)
class Exit:
    pass


Request = Union[Load, Warm, Caption, Chat, Chats, Sleep, Wake, Exit]


@dataclass(frozen=True)
class ItemResult:
    caption: str | None
    error: str | None = None
    bad_image: bool = False  # the error is the input's fault (undecodable), not the model's
    batch: int = 0  # images captioned together with this one in one model batch; 0: it reached no model batch
    note: str | None = None  # what decoding changed about the picture (a strip padded), for the record


@dataclass(frozen=True)
class Loaded:
    seconds: float
    device: str
    dtype: str
    timings: dict[str, float]  # where the load time went: processor, cuda_init, weights (= empty_model + stream)
    batch_size: int = 1  # images per model batch for a Caption with batch_size None and Load.max_new_tokens


@dataclass(frozen=True)
class Captions:
    results: list[ItemResult]
    seconds: float
    generated: int  # images that reached the model, for rates
    tokens: int = 0  # new tokens generated, for tokens/s
    prepared_apart: int = 0  # chunks decoded and preprocessed in the preparing processes (worker/prep.py)
    input_wait: float = 0.0  # seconds the model waited for its chunks' decode and preprocessing


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token: its text, its log-probability under the model, and the likeliest tokens at its step."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # (text, log-probability), the likeliest first


@dataclass(frozen=True)
class Chatted:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop: the model ended its answer; length: max_new_tokens cut it; abort: Abort did
    logprobs: tuple[TokenLogprob, ...] | None = None  # per answer token, when the Chat asked for them


@dataclass(frozen=True)
class Done:
    seconds: float


@dataclass(frozen=True)
class ChatText:
    """A piece of a streamed answer, sent while a Chat(stream=True) runs; the pieces join to Chatted.text."""

    text: str
    row: int = 0  # which conversation of a Chats request it belongs to


@dataclass(frozen=True)
class ChatsAnswered:
    """A Chats request's answers, one per conversation in order: each answered, or failed alone."""

    replies: list[Chatted | Failed]


@dataclass(frozen=True)
class Heartbeat:
    """Sent every HEARTBEAT_SECONDS while the worker works on a request: silence means it hangs. Also sent at once
    when the count of chat rows it is generating changes (a row ended or was aborted)."""

    rows: int = 0  # chat rows the worker is generating now


HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True)
class Failed:
    kind: str  # load | warm | request | input (the request's own fault) | context (over the context length) | oom
    message: str


Reply = Union[Loaded, Captions, Chatted, ChatsAnswered, Done, Failed]  # Heartbeats come between, never instead of, a reply
