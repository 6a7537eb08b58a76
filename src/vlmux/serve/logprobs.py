"""`logprobs` and `top_logprobs` of a chat request (OpenAI's), and the answer's tokens as OpenAI's `logprobs.content`
writes them: each token's text, log-probability and UTF-8 bytes, with the likeliest tokens at its step."""
from __future__ import annotations

from typing import Any

from vlmux.protocol import TokenLogprob
from vlmux.serve.errors import ApiError

MAX_TOP = 20  # OpenAI's limit for top_logprobs


def parse_logprobs(body: dict) -> int | None:
    """None: no logprobs; else how many of the likeliest tokens each answer token comes with (top_logprobs)."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(400, "logprobs must be true or false", "invalid_request", "logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP):
        raise ApiError(400, f"top_logprobs must be a whole number from 0 to {MAX_TOP}", "invalid_request",
                       "top_logprobs")
    if top and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_request", "top_logprobs")
    return (top or 0) if wanted else None


def content(entries: tuple[TokenLogprob, ...], text: str) -> dict[str, Any]:
    """OpenAI's choice.logprobs for the tokens of `text`, the answer as sent: the tokens past its end (its
    end-of-sequence token, or all past a stop string that cut it) are left out."""
    entries = _within(entries, text)
    return {"content": [{"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode()),
                         "top_logprobs": [{"token": token, "logprob": logprob, "bytes": list(token.encode())}
                                          for token, logprob in entry.top]} for entry in entries],
            "refusal": None}


def _within(entries: tuple[TokenLogprob, ...], text: str) -> tuple[TokenLogprob, ...]:
    """The tokens whose text starts before the end of `text` (the answer is stripped of leading whitespace)."""
    kept, joined = [], ""
    for entry in entries:
        if len(joined.lstrip()) >= len(text):
            break
        kept.append(entry)
        joined += entry.token
    return tuple(kept)
