"""Weight streaming: build the model with empty device tensors, then read the safetensors bytes from the page
cache straight into them, several reader threads at once, each through two small pinned staging buffers.

Why our own and not from_pretrained: it reads tensor by tensor through pageable memory, far slower than copies
from pinned memory (docs/BENCHMARKS.md); and building the model empty first lets the caller warm the kernels up
while the bytes are still arriving.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmux.backends.pinned import pinned_views, registered_ranges
from vlmux.checkpoint import TensorEntry, read_index

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StreamConfig:
    readers: int = 16
    # Per staging buffer, two per reader: larger ones cost more to pin than they gain (docs/BENCHMARKS.md).
    chunk_bytes: int = 16 << 20


class Unsupported(Exception):
    """This checkpoint needs from_pretrained (renamed or missing tensors, remote code, quantisation)."""


def empty_model(path: Path, dtype: torch.dtype, device: str, trust_remote_code: bool, shallow: bool = False) -> nn.Module:
    """The model with uninitialised parameters on `device` and its computed buffers (rotary tables) in place.

    shallow: one layer deep at full width (see `shrink`), to run the model's kernels once without its weights."""
    model = None
    if not shallow:
        model = _prebuilt.pop((str(path), dtype), None)
        _prebuilt.clear()  # a worker loads one model: what was built for the others is not needed
    if model is None:
        model = meta_model(path, dtype, trust_remote_code, shallow)
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in replaced:  # tied weights share one tensor, and keep sharing it
                    empty = torch.empty(param.shape, dtype=param.dtype, device=device)
                    replaced[id(param)] = nn.Parameter(empty, requires_grad=False)
                module._parameters[name] = replaced[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    model.tie_weights()  # some transformers versions tie only when loading weights, not in from_config
    return model.eval()


def meta_model(path: Path, dtype: torch.dtype, trust_remote_code: bool, shallow: bool = False) -> nn.Module:
    """The model's structure with its parameters on the meta device (no memory), its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    if trust_remote_code:
        raise Unsupported("remote code may initialise weights its own way")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        raise Unsupported("quantised checkpoint")
    # Buffers (rotary tables) are computed in __init__ and stay real; init_weights is skipped, since it walks every
    # module to initialise weights that the checkpoint overwrites anyway.
    with init_empty_weights(include_buffers=False), _no_init_weights():
        model = AutoModelForImageTextToText.from_config(shrink(config) if shallow else config, dtype=dtype)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model


_prebuilt: dict[tuple[str, torch.dtype], nn.Module] = {}


def prebuild(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """Build the model's structure now (a warm spare, before the load is asked for: its Python then costs the load
    nothing) for the next `empty_model` of this path and dtype to take."""
    _prebuilt[(str(path), dtype)] = model = meta_model(path, dtype, trust_remote_code)
    return model


_DEPTH_KEYS = ("num_hidden_layers", "depth", "num_layers", "encoder_layers", "decoder_layers")


def shrink(config):
    """The same model one layer deep in every part: every matrix keeps its shape, so running it loads the kernels
    and library handles the full model will use, at a fraction of its memory."""
    config = copy.deepcopy(config)
    parts = [config, *(getattr(config, key) for key in vars(config) if key.endswith("_config"))]
    for part in parts:
        if not hasattr(part, "to_dict"):
            continue
        for key in _DEPTH_KEYS:
            if isinstance(getattr(part, key, None), int):
                setattr(part, key, 1)
        if isinstance(getattr(part, "layer_types", None), list):
            part.layer_types = part.layer_types[:1]
    return config


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5.x kept it in modeling_utils
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


Matched = dict[str, tuple[TensorEntry, torch.Tensor]]


def match_checkpoint(model: nn.Module, path: Path) -> Matched:
    """Pair every checkpoint tensor with the model tensor it fills; raises Unsupported before anything is read."""
    matched = _match(model, read_index(path))
    for name, (entry, _) in matched.items():
        if entry.dtype not in TORCH_DTYPES:
            raise Unsupported(f"{name}: dtype {entry.dtype}")
    return matched


def stream_weights(model: nn.Module, path: Path, config: StreamConfig = StreamConfig(),
                   timings: dict[str, float] | None = None) -> int:
    """Fill the model's tensors from the folder's safetensors files; returns the bytes read. timings: filled with
    the seconds of each phase (match, plan, read, finish)."""
    clock = _Clock(timings)
    matched = match_checkpoint(model, path)
    clock.mark("match")
    casts: list[tuple[torch.Tensor, torch.Tensor]] = []
    pieces: list[tuple[Path, int, torch.Tensor]] = []
    for entry, target in matched.values():
        source_dtype = TORCH_DTYPES[entry.dtype]
        if source_dtype != target.dtype:  # read as stored, cast on the device
            staged = torch.empty(entry.shape, dtype=source_dtype, device=target.device)
            casts.append((target, staged))
            target = staged
        flat = target.reshape(-1).view(torch.uint8)
        for offset in range(0, entry.end - entry.start, config.chunk_bytes):
            length = min(config.chunk_bytes, entry.end - entry.start - offset)
            pieces.append((entry.file, entry.start + offset, flat[offset : offset + length]))
    pieces.sort(key=lambda piece: (str(piece[0]), piece[1]))
    device = next(iter(matched.values()))[1].device
    views = pinned_views(path) if device.type == "cuda" else None
    if timings is not None:
        timings["pinned"] = float(views is not None)
    if views is not None:  # pinned by a warm spare: DMA straight from the page cache
        clock.mark("plan")
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            for file, offset, target in pieces:
                for start, stop in registered_ranges(offset, target.numel()):
                    target[start - offset : stop - offset].copy_(views[file][start:stop], non_blocking=True)
        stream.synchronize()
        return _finish(matched, casts, device, clock)
    errors: list[BaseException] = []
    buffers = staging_buffers(config) if device.type == "cuda" else []
    clock.mark("plan")
    readers = [
        threading.Thread(target=_read, args=(pieces[i :: config.readers], device, buffers[2 * i : 2 * i + 2], errors),
                         daemon=True)
        for i in range(min(config.readers, len(pieces)))
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    if errors:
        raise errors[0]
    return _finish(matched, casts, device, clock)


def _finish(matched: Matched, casts: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, clock: _Clock) -> int:
    clock.mark("read")
    with torch.no_grad():
        for target, staged in casts:
            target.copy_(staged)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clock.mark("finish")
    return sum(entry.end - entry.start for entry, _ in matched.values())


class _Clock:
    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings, self.last = timings, time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[phase] = now - self.last
        self.last = now


def _renamed(model: nn.Module, index: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """Checkpoint names as the model calls them, through transformers' own renaming rules (hub checkpoints keep
    older layouts). Rules that transform tensors, not just names, are left to from_pretrained."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        renamed = {}
        for key, entry in index.items():
            name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if converter is not None:
                raise Unsupported(f"{key} needs a tensor conversion")
            renamed[name] = entry
        return renamed
    except (ImportError, TypeError, AttributeError) as e:  # another transformers version's internals
        raise Unsupported(f"cannot map checkpoint names with this transformers: {e}") from None


def _match(model: nn.Module, index: dict[str, TensorEntry]) -> dict[str, tuple[TensorEntry, torch.Tensor]]:
    """Pair each checkpoint tensor with the model tensor it fills, by the model's names."""
    state = model.state_dict(keep_vars=True)
    if any(name not in state for name in index):
        index = _renamed(model, index)
    unexpected = [name for name in index if name not in state]
    covered = {id(state[name]) for name in index if name in state}
    missing = [name for name, tensor in state.items() if name not in index and id(tensor) not in covered]
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise Unsupported(f"checkpoint names differ from the model's ({len(unexpected)} unexpected, "
                          f"{len(missing)} missing, e.g. {example})")
    filled = [id(state[name]) for name in index]
    if len(set(filled)) != len(filled):
        raise Unsupported("the checkpoint stores tied weights twice; from_pretrained decides which to keep")
    for name, entry in index.items():
        if tuple(state[name].shape) != entry.shape:
            raise Unsupported(f"{name}: shape {entry.shape} in the checkpoint, {tuple(state[name].shape)} in the model")
    return {name: (entry, state[name].data) for name, entry in index.items()}


def _read(pieces: list[tuple[Path, int, torch.Tensor]], device: torch.device, buffers: list[torch.Tensor],
          errors: list[BaseException]) -> None:
    files: dict[Path, int] = {}
    try:
        if device.type != "cuda":
            for file, offset, target in pieces:
                _pread_into(_fd(files, file), memoryview(target.numpy()), offset)
            return
        stream = torch.cuda.Stream(device)
        # Python work per piece holds the GIL that the other readers need: one stream context and two reusable
        # events per reader, not one of each per piece.
        done = [torch.cuda.Event(), torch.cuda.Event()]
        with torch.cuda.stream(stream):
            for step, (file, offset, target) in enumerate(pieces):
                slot = step % 2
                if step >= 2:
                    done[slot].synchronize()  # the copy out of this buffer has finished: it may be refilled
                staging = buffers[slot][: target.numel()]
                _pread_into(_fd(files, file), memoryview(staging.numpy()), offset)
                target.copy_(staging, non_blocking=True)
                done[slot].record(stream)
        stream.synchronize()
    except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
        errors.append(e)
    finally:
        for fd in files.values():
            os.close(fd)


_staging: dict[tuple[int, int], list[torch.Tensor]] = {}


def staging_buffers(config: StreamConfig) -> list[torch.Tensor]:
    """Pinned staging memory, two chunks per reader, allocated once per process: pinning is slow, and a warm spare
    worker pays it before it is needed (see `prepare_staging`)."""
    key = (config.readers, config.chunk_bytes)
    if key not in _staging:
        block = torch.empty(2 * config.readers * config.chunk_bytes, dtype=torch.uint8, pin_memory=True)
        _staging[key] = list(block.view(2 * config.readers, config.chunk_bytes))
    return _staging[key]


def release_staging() -> None:
    _staging.clear()


def _fd(files: dict[Path, int], file: Path) -> int:
    if file not in files:
        files[file] = os.open(file, os.O_RDONLY)
    return files[file]


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    view = view.cast("B")
    while view.nbytes:
        count = os.preadv(fd, [view], offset)
        if count == 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        view, offset = view[count:], offset + count
