"""The backend for models whose code ships with the checkpoint (trust_remote_code, `auto_map` in config.json): the
class the auto_map names, asked through the family's adapter (`backends.adapters`). No preparing processes, no
padded batches, no streaming load: the model's own code decides its inputs."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image

from vlmux.backends.adapters import remote_family
from vlmux.backends.base import RowControl
from vlmux.backends.fast import fitting_batch
from vlmux.backends.residency import Resident, drop_cached_memory, free_for_batches
from vlmux.backends.transformers import resolve_device, resolve_dtype
from vlmux.config import GenerationSpec, ModelSpec
from vlmux.estimate import image_budget, image_bytes, read_json
from vlmux.protocol import Chatted


class RemoteCodeBackend(Resident):
    prepares_apart = False  # preparing processes run the processor, and the adapter prepares its own inputs
    pads_batches = False

    def __init__(self, spec: ModelSpec, path: str) -> None:
        self.device = resolve_device(spec.device)
        self.torch_dtype = resolve_dtype(spec.dtype, self.device)
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        self.timings: dict[str, float] = {}
        start = time.perf_counter()
        self._path = Path(path)
        self._config = read_json(self._path / "config.json")
        family = remote_family(self._config)
        self.adapter = family.make(Path(path), self._config)
        self.timings["processor"] = time.perf_counter() - start
        auto_map = self._config.get("auto_map", {})
        name = next((name for name in family.auto_classes if name in auto_map), None)
        if name is None:
            raise ValueError(f"{path}: auto_map names none of {', '.join(family.auto_classes)}")
        self.model = getattr(transformers, name).from_pretrained(
            path, trust_remote_code=True, local_files_only=True, dtype=self.torch_dtype, device_map={"": self.device}
        ).eval()
        self.loader = f"from_pretrained ({name}, remote code)"
        self.timings["weights"] = time.perf_counter() - start - self.timings["processor"]
        self._host_state: dict[str, torch.Tensor] | None = None

    @property
    def generated_tokens(self) -> int:
        return self.adapter.generated_tokens

    @property
    def pad_token_id(self) -> int:
        return self.adapter.pad_token_id

    def largest_batch(self, max_new_tokens: int, memory_budget: int | None) -> int | None:
        if not self.device.startswith("cuda"):
            return None
        budget = image_budget(self._path, self._config)  # the processor's bounds where it has them, else a default
        kv_cache, activations = image_bytes(self._config, budget, max_new_tokens, self.torch_dtype.itemsize)
        return fitting_batch(kv_cache + activations, free_for_batches(self.device), memory_budget)

    def caption(self, images: list[Image.Image], prompts: list[str], gen: GenerationSpec) -> list[str]:
        return self.adapter.caption(self.model, images, prompts, gen)

    def prepare(self, images: list[Image.Image], prompts: list[str], pad_to: int | None = None) -> Any:
        return images, prompts  # the adapter's inputs are made where it generates: the model's code makes them

    def from_host(self, inputs: dict[str, Any], rows: int) -> Any:
        raise NotImplementedError("a remote-code model has no preparing processes (prepares_apart is False)")

    def generate(self, prepared: Any, gen: GenerationSpec) -> list[str]:
        images, prompts = prepared
        return self.adapter.caption(self.model, images, prompts, gen)

    def chat(self, messages: list[dict[str, Any]], images: list[Image.Image], gen: GenerationSpec,
             on_text: Callable[[str], None] | None = None, control: RowControl | None = None,
             logprobs: int | None = None) -> Chatted:
        if logprobs is not None:
            raise NotImplementedError("logprobs: this model answers through its own chat code, which gives no scores")
        if control is not None and control.aborted(0):  # the model's own chat runs whole: only before it starts
            return Chatted("", 0, 0, "abort")
        answer = self.adapter.chat(self.model, messages, images, gen)
        if on_text is not None:  # the model's own chat returns the whole text: it streams as one piece
            on_text(answer.text)
        return answer

    def chat_batch(self, conversations: list[tuple[list[dict[str, Any]], list[Image.Image]]], gen: GenerationSpec,
                   on_text: Callable[[int, str], None] | None = None, control: RowControl | None = None,
                   logprobs: list[int | None] | None = None) -> list[Chatted]:
        answers = []
        for row, (messages, images) in enumerate(conversations):
            answers.append(self.chat(messages, images, gen, None if on_text is None else
                                     lambda piece, row=row: on_text(row, piece),
                                     None if control is None else _Row(control, row),
                                     logprobs[row] if logprobs else None))
            if control is not None:
                control.running(len(conversations) - row - 1)
        return answers

    def after_reply(self) -> None:
        return None

    def close(self) -> None:
        self.model = None
        self.adapter = None
        self._host_state = None
        drop_cached_memory()


class _Row:
    """One row of a batch's RowControl, as row 0 of its own call."""

    def __init__(self, control: RowControl, row: int) -> None:
        self._control, self._row = control, row

    def aborted(self, row: int) -> bool:
        return self._control.aborted(self._row + row)

    def running(self, rows: int) -> None:
        return None  # the batch tells its own count
