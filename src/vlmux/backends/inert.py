"""Text from users made inert: a tokenizer turns the text of an added token ("<|im_end|>", "<|vision_start|>",
"<image>") into that control token wherever it appears, so a prompt could end its turn or claim an image. Each such
string in user text gets a word joiner (U+2060) after its first character: it reads the same, tokenizes as text."""
from __future__ import annotations

import re
from typing import Any

JOINER = "\u2060"


def control_strings(processor: Any) -> tuple[str, ...]:
    """Every added token's text (the chat template's markers, image and video placeholders), longest first."""
    tokenizer = getattr(processor, "tokenizer", processor)
    strings = {token.content for token in tokenizer.added_tokens_decoder.values()}
    strings |= {value for name in ("image_token", "video_token") if isinstance(value := getattr(processor, name, None), str)}
    return tuple(sorted((s for s in strings if len(s) > 1), key=len, reverse=True))


def inert(text: str, controls: tuple[str, ...]) -> str:
    """`text` with every control string broken by a word joiner after its first character."""
    if not controls or not any(control in text for control in controls):
        return text
    pattern = re.compile("|".join(re.escape(control) for control in controls))
    return pattern.sub(lambda found: found.group(0)[0] + JOINER + found.group(0)[1:], text)


def inert_messages(messages: list[dict[str, Any]], controls: tuple[str, ...]) -> list[dict[str, Any]]:
    """Chat messages with the text of every role made inert (a system or assistant turn comes from the caller too)."""
    def part(item: dict[str, Any]) -> dict[str, Any]:
        return {**item, "text": inert(item["text"], controls)} if isinstance(item.get("text"), str) else item

    return [{**message, "content": inert(message["content"], controls) if isinstance(message["content"], str)
             else [part(item) for item in message["content"]]} for message in messages]
