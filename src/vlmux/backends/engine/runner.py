"""The engine's loop: prefill waiting rows into free slots, then decode one token for every active row; a row that
ends (end-of-sequence, or its token limit) leaves at once, the rows behind it close the gap, and a waiting row's
prefill takes the freed slot, so no step decodes padding for a finished row."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from vlmux.backends.engine.cache import KVCache
from vlmux.backends.engine.config import EngineConfig
from vlmux.backends.engine.graphs import DecodeGraphs
from vlmux.backends.engine.layers import LanguageModel
from vlmux.backends.engine.prompts import Prompt, pack
from vlmux.backends.engine.sampling import Sampling, next_tokens


@dataclass
class RunStats:
    """What one `run` did."""

    rows: int = 0
    prefills: int = 0  # prefill calls: the first one, then one per refill
    decode_steps: int = 0
    decoded_tokens: int = 0  # over all decode steps: the rows each step decoded
    widest_step: int = 0  # the most rows one decode step decoded
    answer_lengths: list[int] = field(default_factory=list)  # tokens per row, its end-of-sequence token included


@dataclass
class Slots:
    """The active rows' state, slot by slot: active rows hold slots 0 .. len(rows) - 1."""

    rows: list[int] = field(default_factory=list)  # the prompt index each active slot holds
    lengths: list[int] = field(default_factory=list)  # tokens in the cache, mirrored from the device for kv_length


class Runner:
    def __init__(self, model: LanguageModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self.cache = KVCache(model.shape, config.slots, config.max_length, model.dtype, model.device)
        device = model.device
        self.deltas = torch.zeros(config.slots, dtype=torch.long, device=device)
        self.last = torch.zeros(config.slots, dtype=torch.long, device=device)  # each slot's newest token
        self.seen: torch.Tensor | None = None  # (slots, vocab) bool, only under a repetition penalty
        self.graphs = (DecodeGraphs(self._full_step, config.graph_sizes, config.slots, device)
                       if device.type == "cuda" and config.cuda_graphs else None)

    @torch.inference_mode()
    def run(self, prompts: list[Prompt], sampling: Sampling) -> tuple[list[list[int]], RunStats]:
        """Each prompt's answer tokens (its end-of-sequence token included, as generate returns it). Empties
        `prompts`: a row's embeddings are dropped once it is prefilled (a batch's worth of device memory)."""
        longest = max(prompt.length for prompt in prompts) + sampling.max_new_tokens - 1
        if longest > self.config.max_length:
            raise ValueError(f"a row needs {longest} cache tokens; this runner holds {self.config.max_length}")
        if sampling.penalises and self.seen is None:
            self.seen = torch.zeros(self.config.slots, self.model.head.shape[0], dtype=torch.bool,
                                    device=self.model.device)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(self.model.device).manual_seed(sampling.seed)
        waiting, answers = deque(enumerate(prompts)), [[] for _ in prompts]
        slots, stats = Slots(), RunStats(rows=len(prompts))
        prompts.clear()
        while waiting or slots.rows:
            free = self.config.slots - len(slots.rows)
            if waiting and free:
                logits = self._prefill([waiting.popleft() for _ in range(min(free, len(waiting)))], slots)
                stats.prefills += 1
                self._accept(logits, len(slots.rows) - logits.shape[0], slots, answers, sampling, generator)
            if slots.rows:
                logits = self._decode(slots)
                stats.decode_steps += 1
                stats.decoded_tokens += len(slots.rows)
                stats.widest_step = max(stats.widest_step, len(slots.rows))
                self._accept(logits, 0, slots, answers, sampling, generator)
        stats.answer_lengths = [len(answer) for answer in answers]
        return answers, stats

    def _prefill(self, taking: list[tuple[int, Prompt]], slots: Slots) -> torch.Tensor:
        """Waiting rows (index, prompt) into the first free slots; returns the logits of their first answer token."""
        rows, group = [row for row, _ in taking], [prompt for _, prompt in taking]
        first = len(slots.rows)
        taken = torch.arange(first, first + len(group), device=self.model.device)
        packed = pack(group)
        logits = self.model.prefill(packed.embeds, packed.positions, packed.lengths, self.cache, taken,
                                    packed.visual, packed.deepstack)
        self.cache.lengths[taken] = packed.lengths
        self.deltas[taken] = torch.tensor([prompt.rope_delta for prompt in group], device=self.model.device)
        if self.seen is not None:
            self.seen[taken] = False
            for slot, prompt in zip(taken.tolist(), group):
                self.seen[slot, prompt.token_ids] = True
        slots.rows.extend(rows)
        slots.lengths.extend(prompt.length for prompt in group)
        return logits

    def _decode(self, slots: Slots) -> torch.Tensor:
        active = len(slots.rows)
        at = self.cache.lengths[:active]
        tokens, rope = self.last[:active], at + self.deltas[:active]
        if self.graphs is not None:
            logits = self.graphs(tokens, at, rope)
        else:  # eager: attend only as far as the longest row
            logits = self.model.decode(tokens, at, rope, self.cache, max(slots.lengths) + 1)
        self.cache.lengths[:active] += 1
        slots.lengths = [length + 1 for length in slots.lengths]
        return logits

    def _full_step(self, tokens: torch.Tensor, at: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, at, rope, self.cache, self.config.max_length)

    def _accept(self, logits: torch.Tensor, first: int, slots: Slots, answers: list[list[int]], sampling: Sampling,
                generator: torch.Generator | None) -> None:
        """The next token of slots first .. first + len(logits) - 1; rows that end leave their slots."""
        count = logits.shape[0]
        taken = slice(first, first + count)
        tokens = next_tokens(logits, sampling, None if self.seen is None else self.seen[taken], generator)
        self.last[taken] = tokens
        if self.seen is not None:
            self.seen[torch.arange(first, first + count, device=tokens.device), tokens] = True
        ended = []
        for slot, token in enumerate(tokens.tolist(), start=first):
            answer = answers[slots.rows[slot]]
            answer.append(token)
            if sampling.finished(token, len(answer)):
                ended.append(slot)
        self._release(ended, slots)

    def _release(self, ended: list[int], slots: Slots) -> None:
        """Ended rows leave; the last active rows move into the gaps below the new count."""
        if not ended:
            return
        remaining = len(slots.rows) - len(ended)
        gone = set(ended)
        gaps = [slot for slot in ended if slot < remaining]
        movers = [slot for slot in range(remaining, len(slots.rows)) if slot not in gone]
        self.cache.move(movers, gaps)
        for tensor in (self.deltas, self.last, self.seen):
            if tensor is not None and movers:
                tensor[gaps] = tensor[movers]
        for source, target in zip(movers, gaps):
            slots.rows[target], slots.lengths[target] = slots.rows[source], slots.lengths[source]
        del slots.rows[remaining:], slots.lengths[remaining:]
