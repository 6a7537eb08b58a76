"""A conversation's prompt tokens plus the tokens it may generate, against the model's context length: a request
over it is refused (`ContextExceeded`) before any of its tokens is generated. Torch-free."""
from __future__ import annotations

from typing import Any


class ContextExceeded(ValueError):
    """Rows whose prompt and max_new_tokens do not fit the model's context; `rows`: their places in the batch."""

    def __init__(self, message: str, rows: tuple[int, ...] = (0,)) -> None:
        super().__init__(message)
        self.rows = rows


def context_length(config: Any) -> int | None:
    """config: a transformers PretrainedConfig. The language model's positions (max_position_embeddings of its text
    config); None where it names none."""
    length = getattr(config.get_text_config(), "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def check_fits(prompt_tokens: list[int], max_new_tokens: int, limit: int | None) -> None:
    """Raises ContextExceeded naming the rows (and the first one's figures) that do not fit `limit`."""
    if limit is None:
        return
    over = tuple(row for row, tokens in enumerate(prompt_tokens) if tokens + max_new_tokens > limit)
    if over:
        tokens = prompt_tokens[over[0]]
        raise ContextExceeded(
            f"the prompt's {tokens:,} tokens plus max_tokens {max_new_tokens:,} are over the model's context length of "
            f"{limit:,} tokens; shorten the messages (fewer or smaller images) or lower max_tokens (vlmux serve "
            f"--max-tokens sets the default)", over)
