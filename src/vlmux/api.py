"""The public entry point: vlmux.pipeline(model) -> a captioner that gives all its VRAM back when closed."""
from __future__ import annotations

import io
import os
from dataclasses import fields, replace
from typing import Any, Iterable, Sequence

from PIL import Image

from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.errors import PoolClosed
from vlmux.images import ImageError, ImageInput
from vlmux.pool import ModelPool, vram
from vlmux.protocol import ItemResult

_GENERATION_OPTIONS = {f.name for f in fields(GenerationSpec)}
_POOL_OPTIONS = {f.name for f in fields(PoolConfig)}


class Pipeline:
    """Captions and chats with one model held in its own worker process. Use it with `with`, or call close()."""

    def __init__(self, spec: ModelSpec, pool_config: PoolConfig, generation: GenerationSpec) -> None:
        self.spec = spec
        self.generation = generation
        self.release: vram.Release | None = None
        self._pool = ModelPool(pool_config)
        try:
            self._name = self._pool.load(spec)
        except BaseException:
            self._pool.close()
            raise

    def __call__(
        self, images: ImageInput | Iterable[ImageInput], prompt: str | Sequence[str] | None = None, **options: Any
    ) -> str | list[str]:
        """One caption per image (any iterable of them); a single image gives a single string. Images are paths
        (relative to the current folder), bytes, open binary files or PIL images. An undecodable image raises
        ImageError, an image the model failed on (out of memory even alone, say) RuntimeError, once every other image
        is captioned: the exception's `captions` holds them (None where an image failed), `errors` the reasons by
        position."""
        single = _is_single(images)
        if isinstance(images, (bytearray, memoryview)):
            images = bytes(images)
        items = [_readable(item) for item in ([images] if single else images)]
        prompts = _prompts(prompt or self.generation.prompt, len(items))
        results = self._pool.caption(self._loaded(), items, prompts, self._generation(options))
        captions = [result.caption for result in results]
        failed = {index: result for index, result in enumerate(results) if result.error is not None}
        if failed:
            raise _failure(failed, captions)
        return captions[0] if single else captions

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> str:
        """OpenAI-style messages; an image item is {"type": "image", "image": path | bytes | PIL image}."""
        return self._pool.chat(self._loaded(), messages, self._generation(options))

    def close(self) -> vram.Release | None:
        """Stop the worker; returns after NVML shows the memory back. Safe to call twice."""
        if self._name is not None:
            name, self._name = self._name, None
            if self._pool.pid == os.getpid():  # a forked child's copy leaves the parent's worker alone
                self.release = self._pool.unload(name) if name in self._pool else self._pool.last_release.get(name)
            self._pool.close()
        return self.release

    @property
    def status(self):
        return self._pool.status()

    def _loaded(self) -> str:
        if self._name is None:
            raise PoolClosed("this pipeline is closed")
        return self._pool.load(self.spec, self._name)  # reloads after a worker crash, else a lookup

    def _generation(self, options: dict[str, Any]) -> GenerationSpec:
        unknown = set(options) - _GENERATION_OPTIONS
        if unknown:
            raise TypeError(f"unknown generation options {sorted(unknown)}; known: {sorted(_GENERATION_OPTIONS)}")
        return replace(self.generation, **options)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self._name = None
            self._pool.close(kill=True)  # Ctrl-C: its worker is killed, not given unload_grace
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._name is None else "open"
        return f"Pipeline({self.spec.model!r}, device={self.spec.device!r}, {state})"


def pipeline(model: str, device: str = "auto", dtype: str = "auto", **options: Any) -> Pipeline:
    """Load `model` (hub id or folder) in a worker process. Options: generation settings (prompt,
    max_new_tokens, do_sample, ...), pool settings (isolation, max_batch_size, ...) or batch_size."""
    if "batch_size" in options:
        options["max_batch_size"] = options.pop("batch_size")
    spec_options = {k: options.pop(k) for k in ("revision", "trust_remote_code", "decode", "prep_processes", "quantize") if k in options}
    pool_options = {k: options.pop(k) for k in list(options) if k in _POOL_OPTIONS}
    unknown = set(options) - _GENERATION_OPTIONS
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    return Pipeline(ModelSpec(model, device, dtype, **spec_options), PoolConfig(**pool_options), GenerationSpec(**options))


def _is_single(images: object) -> bool:
    """One image rather than a collection of them; what is neither is refused here, not captioned item by item."""
    if images is None or isinstance(images, dict):
        raise TypeError(f"images: give an image (a path, bytes, an open binary file or a PIL image) or a list of "
                        f"them, not {type(images).__name__}")
    return isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, io.IOBase, Image.Image))


def _failure(failed: dict[int, ItemResult], captions: list[str | None]) -> Exception:
    """The first failure's exception, naming every failed position, with the other images' captions attached."""
    first, result = next(iter(failed.items()))
    others = f" ({len(failed)} of {len(captions)} images failed: {sorted(failed)}; .captions has the rest)" \
        if len(captions) > 1 else ""
    error = (ImageError if result.bad_image else RuntimeError)(f"image {first}: {result.error}{others}")
    error.captions = captions
    error.errors = {index: r.error for index, r in failed.items()}
    return error


def _prompts(prompt: str | Sequence[str], count: int) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * count
    prompts = list(prompt)
    if len(prompts) != count:
        raise ValueError(f"{len(prompts)} prompts for {count} images")
    return prompts


def _readable(item: object) -> object:
    """An open file is read here: a file object cannot travel to the worker process."""
    return item.read() if isinstance(item, io.IOBase) else item
