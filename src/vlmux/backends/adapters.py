"""How a remote-code model (trust_remote_code) is asked for an answer, declared per `model_type`: InternVL2 / 2.5
answer through their own `chat` / `batch_chat` on tiles they expect the caller to cut; Florence-2's remote code
through its processor's task prompts and `generate`; anything else through its processor, the chat template and
`generate` (the generic fallback)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from vlmux.backends.base import OutOfMemory
from vlmux.backends.families import CHAT_TEMPLATE, PromptForm, TaskPrompt
from vlmux.config import GenerationSpec
from vlmux.protocol import Chatted

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Adapter(Protocol):
    """One loaded remote-code model's way to caption and chat; it counts the tokens it generates."""

    generated_tokens: int

    @property
    def pad_token_id(self) -> int: ...

    def caption(self, model: Any, images: list[Image.Image], prompts: list[str], gen: GenerationSpec) -> list[str]: ...

    def chat(self, model: Any, messages: list[dict[str, Any]], images: list[Image.Image], gen: GenerationSpec) -> Chatted: ...


@dataclass(frozen=True)
class RemoteFamily:
    auto_classes: tuple[str, ...]  # the auto_map entries that build the model, in order of preference
    make: Callable[[Path, dict], Adapter]  # (model folder, config.json) -> the adapter


def generation_options(gen: GenerationSpec) -> dict[str, Any]:
    options: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample}
    if gen.do_sample:
        options.update(temperature=gen.temperature, top_p=gen.top_p)
    if gen.ignore_eos:
        options["min_new_tokens"] = gen.max_new_tokens
    if gen.seed is not None:
        torch.manual_seed(gen.seed)
    return options


def finish(completion: int, gen: GenerationSpec) -> str:
    return "length" if completion >= gen.max_new_tokens else "stop"


def tiles(image: Image.Image, size: int, max_tiles: int, thumbnail: bool) -> list[Image.Image]:
    """InternVL's dynamic_preprocess: the grid of up to `max_tiles` tiles whose aspect ratio is closest to the
    picture's (the larger grid on a tie, for a picture big enough to fill it), plus a thumbnail of the whole."""
    width, height = image.size
    grids = sorted({(c, r) for n in range(1, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
                    if c * r <= max_tiles}, key=lambda grid: grid[0] * grid[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    cols, rows = best
    resized = image.resize((size * cols, size * rows), Image.BICUBIC)
    parts = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
    if thumbnail and len(parts) > 1:
        parts.append(image.resize((size, size), Image.BICUBIC))
    return parts


def normalised(parts: list[Image.Image]) -> torch.Tensor:
    """Tiles as InternVL's transform makes them: 0..1, then ImageNet mean and std, channels first."""
    pixels = torch.stack([torch.frombuffer(bytearray(p.tobytes()), dtype=torch.uint8).view(p.height, p.width, 3)
                          for p in parts]).permute(0, 3, 1, 2).float() / 255
    return (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


class InternVLChat:
    """OpenGVLab's InternVL2 / 2.5 (model_type internvl_chat): tiles of `force_image_size` pixels, `<image>` in
    the question, answers from `model.chat` (one) or `model.batch_chat` (several)."""

    def __init__(self, path: Path, config: dict) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, local_files_only=True)
        vision = config.get("vision_config") or {}
        self.size = int(config.get("force_image_size") or vision.get("image_size") or 448)
        self.max_tiles = int(config.get("max_dynamic_patch", 12)) if config.get("dynamic_image_size", True) else 1
        self.thumbnail = bool(config.get("use_thumbnail", True))
        self.generated_tokens = 0

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _pixels(self, model: Any, images: list[Image.Image]) -> tuple[torch.Tensor, list[int]]:
        per_image = [tiles(image, self.size, self.max_tiles, self.thumbnail) for image in images]
        pixels = normalised([part for parts in per_image for part in parts])
        return pixels.to(model.device, dtype=model.dtype), [len(parts) for parts in per_image]

    def _count(self, answers: list[str]) -> list[int]:
        # chat returns text only: its tokens are counted again (special tokens, an eos, are not in the text)
        counts = [len(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers]
        self.generated_tokens += sum(counts)
        return counts

    def caption(self, model: Any, images: list[Image.Image], prompts: list[str], gen: GenerationSpec) -> list[str]:
        pixels, patches = self._pixels(model, images)
        options = generation_options(gen)
        with out_of_memory():
            if len(images) == 1:
                answers = [model.chat(self.tokenizer, pixels, prompts[0], options)]
            else:
                answers = model.batch_chat(self.tokenizer, pixels, list(prompts), options, num_patches_list=patches)
        self._count(answers)
        return [answer.strip() for answer in answers]

    def chat(self, model: Any, messages: list[dict[str, Any]], images: list[Image.Image], gen: GenerationSpec) -> Chatted:
        """Earlier turns become InternVL's history of (question, answer) pairs; images go with the last question."""
        turns = [(message["role"], plain_text(message["content"])) for message in messages if message["role"] != "system"]
        history = [(q, a) for (role, q), (_, a) in zip(turns[:-1:2], turns[1:-1:2]) if role == "user"]
        question = "".join("<image>\n" for _ in images) + turns[-1][1]
        pixels, patches = self._pixels(model, images) if images else (None, None)
        with out_of_memory():
            answer = model.chat(self.tokenizer, pixels, question, generation_options(gen), history=history or None,
                                num_patches_list=patches).strip()
        completion = self._count([answer])[0]
        prompt = len(self.tokenizer(question, add_special_tokens=False)["input_ids"])  # without the image tokens
        return Chatted(answer, prompt, completion, finish(completion, gen))


class ProcessorGenerate:
    """A remote-code model with a processor and `generate` (Florence-2's remote code, the generic fallback): the
    family's prompt form, as the transformers backend uses it, one batch per call."""

    def __init__(self, path: Path, form: PromptForm) -> None:
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True, local_files_only=True)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # decoder-only batches need the prompt ends aligned
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.form = form
        self.generated_tokens = 0

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _answer(self, model: Any, texts: list[str], images: list[Image.Image] | None, gen: GenerationSpec) -> list[Any]:
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(model.device)
        inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with out_of_memory(), torch.inference_mode():
            output = model.generate(**inputs, **generation_options(gen), pad_token_id=self.pad_token_id)
        tokens = self.form.answer(output, inputs["input_ids"].shape[1])
        self.generated_tokens += int((tokens != self.pad_token_id).sum())
        return [(self.tokenizer.decode(row, skip_special_tokens=True).strip(), int((row != self.pad_token_id).sum()),
                 int(inputs["input_ids"].shape[1])) for row in tokens]

    def caption(self, model: Any, images: list[Image.Image], prompts: list[str], gen: GenerationSpec) -> list[str]:
        texts = [self.form.text(self.processor, prompt) for prompt in prompts]
        return [text for text, _, _ in self._answer(model, texts, images, gen)]

    def chat(self, model: Any, messages: list[dict[str, Any]], images: list[Image.Image], gen: GenerationSpec) -> Chatted:
        text, completion, prompt = self._answer(model, [self.form.chat_text(self.processor, messages)], images or None,
                                                gen)[0]
        return Chatted(text, prompt, completion, finish(completion, gen))


def plain_text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content if p.get("type") == "text")


@contextlib.contextmanager
def out_of_memory() -> Iterator[None]:
    """The device's out-of-memory error as OutOfMemory, which the handler answers by halving the batch."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(str(e).splitlines()[0]) from None  # the handler retries only once this error is gone


# model_type -> how its remote code is asked; GENERIC for any other.
REMOTE_FAMILIES: dict[str, RemoteFamily] = {
    "internvl_chat": RemoteFamily(("AutoModel",), InternVLChat),
    "florence2": RemoteFamily(("AutoModelForCausalLM",), lambda path, config: ProcessorGenerate(path, TaskPrompt())),
}
GENERIC = RemoteFamily(("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM", "AutoModel"),
                       lambda path, config: ProcessorGenerate(path, CHAT_TEMPLATE))


def remote_family(config: dict) -> RemoteFamily:
    return REMOTE_FAMILIES.get(config.get("model_type", ""), GENERIC)
