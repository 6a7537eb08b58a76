"""How each model family is prompted and how its answer is cut out of `generate`'s output, declared per
transformers `model_type`: most families take a chat template and a decoder-only prompt, Florence-2 takes a task
token and answers from a decoder of its own (an encoder-decoder). Torch-free: preparing processes use it too."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vlmux.estimate import read_json


class PromptForm(Protocol):
    """One family's prompt text for an image and an instruction, and where its answer starts in the output."""

    def text(self, processor: Any, prompt: str) -> str: ...

    def chat_text(self, processor: Any, messages: list[dict[str, Any]]) -> str: ...

    def answer(self, output: Any, prompt_length: int) -> Any: ...


@dataclass(frozen=True)
class ChatTemplate:
    """A decoder-only model with a chat template: the output repeats the prompt, then the answer."""

    def text(self, processor: Any, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.chat_text(processor, messages)

    def chat_text(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answer(self, output: Any, prompt_length: int) -> Any:
        return output[:, prompt_length:]


@dataclass(frozen=True)
class TaskPrompt:
    """Florence-2: the prompt is one of the processor's task tokens, which it expands itself; the decoder's output
    starts with its start token, not with the prompt. Free text is not what these models were trained on, so a
    prompt that names no task gets `default_task`."""

    default_task: str = "<MORE_DETAILED_CAPTION>"
    tasks: tuple[str, ...] = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>")

    def text(self, processor: Any, prompt: str) -> str:
        prompt = prompt.strip()
        return prompt if prompt in self.tasks else self.default_task

    def chat_text(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        last = messages[-1]["content"]
        texts = [last] if isinstance(last, str) else [part.get("text", "") for part in last if part.get("type") == "text"]
        return self.text(processor, " ".join(texts))

    def answer(self, output: Any, prompt_length: int) -> Any:
        return output[:, 1:]  # the decoder start token


CHAT_TEMPLATE = ChatTemplate()
# model_type -> its form, where it is not the chat template.
FORMS: dict[str, PromptForm] = {"florence2": TaskPrompt()}


def prompt_form(model_dir: str | Path) -> PromptForm:
    model_type = read_json(Path(model_dir) / "config.json").get("model_type", "")
    return FORMS.get(model_type, CHAT_TEMPLATE)

