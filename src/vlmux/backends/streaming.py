"""Streamed answers' text in pieces, as transformers' `generate` makes it: one conversation, or each row of a batch;
and the rows of a chat batch stopped one by one when their callers abort."""
from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StoppingCriteria, TextStreamer
from transformers.generation.streamers import BaseStreamer

from vlmux.backends.base import RowControl


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


class RowStops(StoppingCriteria):
    """generate's per-row stopping criterion for chats: a row the caller aborted stops at the next step (generate
    pads it from then on, and the batch ends once every row has), and the rows still running are told
    (`RowControl.running`): at once after an abort, else every REPORT_STEPS steps, since counting the rows that
    ended by themselves reads the device, a wait generate's deferred stop check otherwise avoids."""

    REPORT_STEPS = 16

    def __init__(self, control: RowControl, rows: int, eos: int | list[int] | None, ignore_eos: bool,
                 max_new_tokens: int) -> None:
        """eos: the generation config's eos_token_id."""
        self._control = control
        self._steps, self._max_steps = 0, max_new_tokens  # generate's own length limit ends every row at the last
        self._eos = torch.tensor([-1] if eos is None else [eos] if isinstance(eos, int) else list(eos) or [-1])
        self._ignore_eos = ignore_eos
        self._done: torch.Tensor | None = None  # ended or aborted, on the device
        self.aborted = [False] * rows  # rows aborted (the answer is dropped: one that had ended counts too)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self._done is None:
            self._done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self._eos = self._eos.to(input_ids.device)
        self._steps += 1
        if self._steps >= self._max_steps:
            self._done[:] = True
        elif not self._ignore_eos:
            self._done |= torch.isin(input_ids[:, -1], self._eos)
        newly = [row for row, aborted in enumerate(self.aborted) if not aborted and self._control.aborted(row)]
        for row in newly:
            self.aborted[row] = True
        if newly:
            self._done[newly] = True
        if newly or self._steps == 1 or self._steps % self.REPORT_STEPS == 0 or self._steps >= self._max_steps:
            self._control.running(int((~self._done).sum()))
        return self._done
