"""Names in results: an image's key, unique across all inputs, and a model's tag, unique across the job's models."""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sources calls unique_keys
    from vlmux.caption.sources import ImageRef


def unique_keys(refs: list[ImageRef]) -> list[ImageRef]:
    """Images found under several roots are named relative to the roots' common folder, so `A/x.jpg` and
    `B/x.jpg` stay apart; images of one root keep their names relative to it (an older output still resumes)."""
    roots = {ref.root for ref in refs}
    if len(roots) < 2:
        return refs
    common = Path(os.path.commonpath([str(root) for root in roots]))
    return [_rebased(ref, common) for ref in refs]


def _rebased(ref: ImageRef, common: Path) -> ImageRef:
    if ref.name is None:
        return replace(ref, root=common)
    below = ref.root.relative_to(common).as_posix()
    return replace(ref, root=common, name=ref.name if below == "." else f"{below}/{ref.name}")


def model_tag(model: str) -> str:
    """A short, file-name-safe name for a model: 'Qwen/Qwen2-VL-2B-Instruct' -> 'Qwen2-VL-2B-Instruct'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name) or "model"


def model_tags(models: list[str]) -> dict[str, str]:
    """Each model's tag for metadata columns and `{model}` sidecars: a tag already taken gets -2, -3, ... in the
    models' order, so the same -m list gives the same tags on every run."""
    tags: dict[str, str] = {}
    for model in models:
        base = tag = model_tag(model)
        number = 1
        while tag in tags.values():
            number += 1
            tag = f"{base}-{number}"
        tags[model] = tag
    return tags


def renamed(tags: dict[str, str]) -> list[str]:
    """One line per model whose tag is not its plain model_tag, for the user."""
    return [f"{model} is named {tag} in metadata columns and sidecar names ({model_tag(model)} is taken)"
            for model, tag in tags.items() if tag != model_tag(model)]
