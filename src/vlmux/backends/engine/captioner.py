"""What the transformers backend holds for decode mode `engine`: the engine built over its loaded model, and a
runner whose cache grows to the widest and longest batch seen (allocated once per worker for a steady caption job)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from vlmux.backends.engine.config import EngineConfig, family_refusal, refusal
from vlmux.backends.engine.layers import LanguageModel
from vlmux.backends.engine.prompts import prompts_from_inputs
from vlmux.backends.engine.runner import Runner, RunStats
from vlmux.backends.engine.sampling import Sampling
from vlmux.backends.fast import cache_length
from vlmux.config import GenerationSpec


class EngineUnsupported(ValueError):
    """A model that decode mode `engine` cannot run."""


def check_family(model_type: str) -> None:
    reason = family_refusal(model_type)
    if reason:
        raise EngineUnsupported(f"{reason}; use decode 'auto', 'dynamic', 'static' or 'compiled' for it")


def check_model(model: torch.nn.Module) -> None:
    check_family(model.config.model_type)
    reason = refusal(model.config.to_dict(), model.generation_config.to_dict())
    if reason:
        raise EngineUnsupported(reason)
    if len(set(getattr(model, "hf_device_map", {"": 0}).values())) > 1:
        raise EngineUnsupported("decode 'engine' runs a model on one device, not one split across several")


class EngineCaptioner:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, max_slots: int | None = None,
                 cuda_graphs: bool = True) -> None:
        """max_slots: rows decoded at once (None: a whole batch); more rows than that wait for a slot."""
        check_model(model)
        self.model = model
        self.language = LanguageModel.from_transformers(model)
        self.pad_token_id = pad_token_id
        self.max_slots = max_slots
        self.cuda_graphs = cuda_graphs
        self.runner: Runner | None = None
        self.stats: RunStats | None = None  # the last batch's

    @torch.inference_mode()
    def generate(self, inputs: Mapping[str, torch.Tensor], gen: GenerationSpec) -> torch.Tensor:
        """inputs: the processor's left-padded batch on the model's device. Returns each row's answer tokens,
        padded with the pad token to the longest answer (as generate's output after the prompt)."""
        prompts = prompts_from_inputs(self.model, inputs)
        sampling = Sampling.of(gen, self.model.generation_config)
        length = cache_length(max(prompt.length for prompt in prompts), gen.max_new_tokens)  # bucketed: reused
        answers, self.stats = self._runner(len(prompts), length).run(prompts, sampling)
        tokens = torch.full((len(answers), max(map(len, answers))), self.pad_token_id, dtype=torch.long)
        for row, answer in enumerate(answers):
            tokens[row, :len(answer)] = torch.tensor(answer)
        return tokens

    def _runner(self, rows: int, length: int) -> Runner:
        slots = min(rows, self.max_slots or rows)
        held = self.runner.config if self.runner is not None else EngineConfig(1, 2)
        if self.runner is None or held.slots < slots or held.max_length < length:
            self.runner = None  # the old cache goes before the new one is allocated
            wanted = EngineConfig(max(slots, held.slots), max(length, held.max_length), self.cuda_graphs)
            self.runner = Runner(self.language, wanted)
        return self.runner

    def release(self) -> None:
        """Drop the cache (after running out of memory, so that a smaller batch can have the room)."""
        self.runner = None
