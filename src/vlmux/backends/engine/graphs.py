"""CUDA graphs of the decode step, one per batch size in the config's list (captured on first use): a step of a
small model is mostly kernel launches, which a replay does at once. A batch between two sizes runs in the larger
graph; its spare rows write into free slots past the active ones. CUDA only: on the CPU the step runs eagerly.
tests/test_engine.py's GPU test checks the replayed steps against `generate`."""
from __future__ import annotations

from collections.abc import Callable

import torch

# tokens, at, rope positions -> logits, over the whole cache length
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecodeGraphs:
    def __init__(self, step: DecodeStep, sizes: tuple[int, ...], slots: int, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.step = step
        self.sizes = tuple(sorted({size for size in sizes if size < slots} | {slots}))
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.at = torch.zeros(slots, dtype=torch.long, device=device)
        self.rope = torch.zeros(slots, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # one memory pool shared by every size's graph

    def __call__(self, tokens: torch.Tensor, at: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0]
        size = next(size for size in self.sizes if size >= rows)
        for buffer, value in ((self.tokens, tokens), (self.at, at), (self.rope, rope)):
            buffer[:rows].copy_(value)
            buffer[rows:size].zero_()  # spare rows: position 0 of a free slot
        graph, logits = self.graphs.get(size) or self._capture(size)
        graph.replay()
        return logits[:rows]

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs = (self.tokens[:size], self.at[:size], self.rope[:size])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch's CUDA graph notes ask
            self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.step(*inputs)
        self.pool = graph.pool()
        self.graphs[size] = (graph, logits)
        return graph, logits
