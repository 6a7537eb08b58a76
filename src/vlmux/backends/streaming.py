"""Streamed answers' text in pieces, as transformers' `generate` makes it: one conversation, or each row of a batch."""
from __future__ import annotations

from collections.abc import Callable

from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer


class TextPieces(TextStreamer):
    """Hands each piece of new text to `on_text` as soon as it decodes to whole characters. The pieces join to the
    answer `chat` returns, which is stripped: leading whitespace is dropped and trailing whitespace held back until
    more text follows it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text
        self._started = False
        self._held = ""  # whitespace that only counts if more text follows

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text = self._held + text
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        self._held = text[len(body):]
        if body:
            self._started = True
            self._on_text(body)


class RowPieces(BaseStreamer):
    """`TextPieces` for each row of a batch (transformers' own streamers take one row): `on_text(row, piece)`."""

    def __init__(self, tokenizer, rows: int, on_text: Callable[[int, str], None]) -> None:
        self._rows = [TextPieces(tokenizer, lambda piece, row=row: on_text(row, piece)) for row in range(rows)]

    def put(self, value) -> None:  # the prompt's ids (rows x length) first, then one token per row and step
        for row, pieces in enumerate(self._rows):
            pieces.put(value[row : row + 1])

    def end(self) -> None:
        for pieces in self._rows:
            pieces.end()
