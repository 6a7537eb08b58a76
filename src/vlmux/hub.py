"""Turning a model name into a local folder, in the parent, before any worker starts.

Resolving here means a misspelt hub id fails in a second with a clear message instead of inside a worker,
and the worker never needs the network. huggingface_hub honours HF_HUB_OFFLINE and HF_ENDPOINT itself.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

# Models shipped inside the package, by name -> folder under the vlmux package.
BUNDLED = {"vlmux/shapes": "models/shapes"}
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py", "*.bpe"]


class ModelNotFound(ValueError):
    """The model name is neither a model folder nor a hub id we can reach."""


def resolve_model(model: str, revision: str | None = None) -> Path:
    if model in BUNDLED:
        return bundled(model)
    path = Path(model).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long for a path, or one with a NUL byte
        raise ModelNotFound(f"{model[:80]}...: neither a folder here nor a hub id") from None
    if exists:
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{model}: this folder has no config.json, so it is not a Hugging Face model folder")
        return path.resolve()
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFound(f"{model}: no such folder")
    return _download(model, revision)


def bundled(name: str) -> Path:
    """The folder of a model shipped with vlmux (see BUNDLED); never touches the network."""
    folder = Path(str(resources.files("vlmux").joinpath(BUNDLED[name])))
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{name}: the bundled model is missing from {folder} (run tools/train_shapes.py)")
    return folder


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS))
    except HFValidationError:
        raise ModelNotFound(f"{repo_id}: not a folder here and not a valid hub id (expected owner/name)") from None
    except GatedRepoError:
        raise ModelNotFound(f"{repo_id}: gated on the hub; accept its licence there and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{repo_id}: no such model on the hub and no such folder here (check the spelling)") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"{repo_id}: revision {revision!r} not found on the hub") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            hint = "HF_HUB_OFFLINE is set: download it first (`hf download ...`) or pass a local folder"
        else:
            hint = "the hub could not be reached: check the network or pass a local folder"
        raise ModelNotFound(f"{repo_id}: not in the local cache and {hint}") from None
    except HfHubHTTPError as e:
        raise ModelNotFound(f"{repo_id}: the hub answered {e.response.status_code if e.response else 'an error'}") from None
