"""Which backend loads a model folder: its own code (`auto_map` in config.json, with trust_remote_code) goes to the
remote-code backend and its adapters, everything else to transformers' own classes."""
from __future__ import annotations

from pathlib import Path

from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from vlmux.backends.base import Backend
from vlmux.backends.engine.captioner import EngineUnsupported, check_family
from vlmux.config import ModelSpec
from vlmux.estimate import read_json


class RemoteCodeRefused(ValueError):
    """The model needs the code in its folder, and running it was not allowed."""


def backend_for(spec: ModelSpec, path: str) -> Backend:
    config = read_json(Path(path) / "config.json")
    if spec.runs_remote_code(config):
        if spec.decode == "engine":
            check_family(config.get("model_type", ""))
            raise EngineUnsupported("decode 'engine' runs transformers' own classes, not a model's remote code")
        from vlmux.backends.remote import RemoteCodeBackend

        return RemoteCodeBackend(spec, path)
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        # Asked here, before transformers, which would otherwise prompt on a terminal nobody reads.
        raise RemoteCodeRefused(
            f"{spec.model} ships its own model code (model_type {config.get('model_type')!r}, auto_map in "
            f"config.json), which transformers does not have; run it with --trust-remote-code "
            f"(trust_remote_code=True) if you trust that code")
    from vlmux.backends.transformers import TransformersBackend

    return TransformersBackend(spec, path)
