"""OpenAI chat completion records: a request body checked into a frozen `ChatRequest` (400 with the parameter named
when it is wrong), and the response, chunk and model-list bodies. Only JSON is read from a client."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from vlmux.serve.errors import ApiError
from vlmux.serve.settings import parse_duration

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI SDKs send "developer" where older ones sent "system"
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is a 64-bit integer; torch takes no wider
UNSET = "unset"  # keep_alive not given: the model's own


@dataclass(frozen=True)
class Part:
    text: str | None = None
    image_url: str | None = None


@dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    keep_alive: float | None | str = UNSET  # seconds; None: forever; UNSET: the model's setting
    logprobs: int | None = None  # None: none; n: each token's log-probability and the n likeliest (serve/logprobs.py)


def parse_chat(body: Any, max_tokens_limit: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required", "model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages must be a non-empty list", "messages")
    if body.get("n", 1) != 1:
        raise _bad("only n=1 is supported", "n")
    if body.get("tools") or body.get("functions"):
        raise _bad("tools are not supported", "tools")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_limit):
        raise _bad(f"max_tokens must be a whole number from 1 to {max_tokens_limit}", "max_tokens")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise _bad("seed must be a whole number that fits in 64 bits (-2**63 to 2**63-1)", "seed")
    stops = _stops(body.get("stop"))
    _no_response_format(body.get("response_format"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    keep_alive: float | None | str = UNSET
    if body.get("keep_alive") is not None:
        try:
            keep_alive = parse_duration(body["keep_alive"])
        except ValueError as e:
            raise _bad(str(e), "keep_alive") from None
    return ChatRequest(model, tuple(_message(m) for m in raw), _flag(body, "stream"),
                       _flag(options, "include_usage", "stream_options.include_usage"), max_tokens, temperature, top_p, seed, stops, keep_alive)


def _stops(stop: Any) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else () if stop is None else None
    if stops is None or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop must be a string or a list of up to 4 non-empty strings", "stop")
    return stops


def _flag(body: dict, key: str, name: str | None = None) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{name or key} must be true or false (JSON booleans), not {type(value).__name__}", name or key)
    return value


def _no_response_format(value: Any) -> None:
    """Only plain text is written: a request for JSON output is refused rather than answered with unchecked text."""
    if value is None or (isinstance(value, dict) and value.get("type") == "text"):
        return
    kind = value.get("type") if isinstance(value, dict) else None
    raise _bad(f"response_format {str(kind)[:40]!r} is not supported by this server: only {{\"type\": \"text\"}}; "
               "leave response_format out and ask for JSON in the prompt", "response_format")


def _message(raw: Any) -> Message:
    role = raw.get("role") if isinstance(raw, dict) else None
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None
    if role not in ROLES:
        raise _bad(f"each message needs a role, one of {', '.join(ROLES + tuple(ROLE_ALIASES))}", "messages")
    content = raw.get("content")
    if isinstance(content, str):
        return Message(role, (Part(text=content),))
    if not isinstance(content, list):
        raise _bad("message content must be a string or a list of parts", "messages")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(Part(text=part["text"]))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise _bad("an image_url part needs image_url.url", "messages")
            parts.append(Part(image_url=url))
        else:
            raise _bad(f"unsupported content part {str(kind)[:40]!r}: use text or image_url", "messages")
    return Message(role, tuple(parts))


def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(f"{key} must be a number from {low:g} to {high:g}", key)
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request", param)


# -- responses -------------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(ident: str, model: str, text: str, finish: str, counts: dict) -> dict:
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": counts}


def chunk(ident: str, model: str, delta: dict, finish: str | None = None, **extra: Any) -> dict:
    return {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}


def usage_chunk(ident: str, model: str, counts: dict) -> dict:
    return {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": counts}


def model_list(names: list[tuple[str, str]]) -> dict:
    """(name, owner) pairs as /v1/models lists them."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": owner}
                                       for name, owner in names]}


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found (the model ran on; the rest is dropped)."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopWatch:
    """`stop` strings over a streamed answer: the pieces up to the first stop string, holding back any tail that
    could be the start of one, so the stream ends where `cut_at_stop` cuts the whole answer."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.stopped = False
        self._held = ""

    def feed(self, piece: str) -> str:
        """What of `piece` can be sent now ("" once a stop string was seen)."""
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(self._held + piece, self.stops)
        if self.stopped:
            self._held = ""
            return text
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def rest(self) -> str:
        """What was held back, once the answer is complete."""
        held, self._held = ("", "") if self.stopped else (self._held, "")
        return held
