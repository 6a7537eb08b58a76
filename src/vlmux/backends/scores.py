"""Each answer token's log-probability, and the likeliest tokens at its step, for a chat that asks for `logprobs`:
taken from the model's own logits at every step of `generate` (the output layer's result, before any logits
processor: the repetition penalty, temperature or top-p change the choice, not the distribution reported)."""
from __future__ import annotations

import torch
from transformers import StoppingCriteria

from vlmux.protocol import TokenLogprob


class TokenScores(StoppingCriteria):
    """A stopping criterion that never stops: after each step it reads the logits the output layer made for it (a
    forward hook on that layer while `generate` runs) and keeps, per row, the chosen token's log-probability and
    the `top` likeliest tokens with theirs."""

    def __init__(self, model: torch.nn.Module, top: int) -> None:
        self._top = top
        self._logits: torch.Tensor | None = None
        self._hook = model.get_output_embeddings().register_forward_hook(self._keep)
        self._chosen: list[torch.Tensor] = []  # per step: (rows,) ids and (rows,) log-probabilities
        self._scores: list[torch.Tensor] = []
        self._tops: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _keep(self, _module, _inputs, output: torch.Tensor) -> None:
        self._logits = output[:, -1]  # prefill: the prompt's last position; decode: the one new position

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        logprobs = torch.log_softmax(self._logits.to(torch.float32), dim=-1)
        chosen = input_ids[:, -1]
        self._chosen.append(chosen)
        self._scores.append(logprobs.gather(1, chosen[:, None])[:, 0])
        if self._top:
            values, ids = logprobs.topk(self._top, dim=-1)
            self._tops.append((ids, values))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        self._hook.remove()
        self._logits = None

    def rows(self, tokenizer, counts: list[int]) -> list[tuple[TokenLogprob, ...]]:
        """Each row's first `counts[row]` answer tokens (its completion; the steps after a row ended are padding)."""
        self.close()
        if not self._chosen:
            return [() for _ in counts]
        chosen = torch.stack(self._chosen, dim=1).cpu().tolist()
        scores = torch.stack(self._scores, dim=1).cpu().tolist()
        tops = ([], [])
        if self._top:
            tops = (torch.stack([ids for ids, _ in self._tops], dim=1).cpu().tolist(),
                    torch.stack([values for _, values in self._tops], dim=1).cpu().tolist())
        texts: dict[int, str] = {}

        def text(token: int) -> str:
            if token not in texts:
                texts[token] = tokenizer.decode([token])
            return texts[token]

        answers = []
        for row, count in enumerate(counts):
            answers.append(tuple(
                TokenLogprob(text(token), score, tuple((text(i), v) for i, v in zip(tops[0][row][step], tops[1][row][step]))
                             if self._top else ())
                for step, (token, score) in enumerate(zip(chosen[row][:count], scores[row][:count]))))
        return answers
