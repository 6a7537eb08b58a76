"""A static KV cache: per layer, keys and values for a fixed number of slots of a fixed length, and each slot's
length. Rows being decoded hold the first slots, so a decode step reads a prefix of the cache, never a gather."""
from __future__ import annotations

import torch

from vlmux.backends.engine.config import TextShape


class KVCache:
    def __init__(self, shape: TextShape, slots: int, max_length: int, dtype: torch.dtype, device: torch.device) -> None:
        size = (slots, shape.kv_heads, max_length, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens held per slot
        self.slots = slots
        self.max_length = max_length

    def write_prompts(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: (rows, kv_heads, tokens, head_dim) of right-padded prompts, for the given slots."""
        tokens = keys.shape[2]
        self.keys[layer][slots, :, :tokens] = keys
        self.values[layer][slots, :, :tokens] = values

    def append(self, layer: int, at: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """One new token for each of the first rows: keys, values (rows, kv_heads, 1, head_dim) go to position
        `at[row]` of slot `row`."""
        rows = torch.arange(at.shape[0], device=at.device)
        self.keys[layer][rows, :, at] = keys[:, :, 0]
        self.values[layer][rows, :, at] = values[:, :, 0]

    def prefix(self, layer: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `rows` slots' keys and values up to `length` tokens: views, no copy."""
        return self.keys[layer][:rows, :, :length], self.values[layer][:rows, :, :length]

    def move(self, sources: list[int], targets: list[int]) -> None:
        """Slots `sources` copied to `targets` (every layer and the lengths), closing the gaps finished rows left."""
        if not sources:
            return
        source = torch.tensor(sources, device=self.lengths.device)
        target = torch.tensor(targets, device=self.lengths.device)
        for layer in range(len(self.keys)):
            self.keys[layer][target] = self.keys[layer][source]
            self.values[layer][target] = self.values[layer][source]
        self.lengths[target] = self.lengths[source]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
