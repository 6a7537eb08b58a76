"""Checkpoints pinned where they already are: the safetensors files mapped read-only and their page-cache pages
registered with CUDA (cudaHostRegister), so that loading copies them to the GPU by DMA, with no read into a staging
buffer. A warm spare pins its recent models' files this way while it waits for a switch.

Why: threads reading the page cache into pinned buffers are slower than pinned memory's copy to the GPU
(docs/BENCHMARKS.md). Registering costs about what reading does and pins those pages in RAM: a spare pays that
before it is needed, and only for models that fit in half of the host's available memory.
"""
from __future__ import annotations

import mmap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmux.checkpoint import read_index
from vlmux.hostmem import available_host_bytes

REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: a read-only file mapping is pinned without copy-on-write
SLICE_BYTES = 64 << 20  # registered in slices, on threads: pinning pages is the slow part
AVAILABLE_SHARE = 0.5  # pin a checkpoint only if it fits in this share of the host's available memory


class PinFailed(RuntimeError):
    pass


@dataclass
class PinnedFile:
    mapping: mmap.mmap
    view: torch.Tensor  # uint8 over the whole file
    slices: list[tuple[int, int]]  # (address, bytes) registered


_pinned: dict[Path, dict[Path, PinnedFile]] = {}
_lock = threading.Lock()


def pin_checkpoint(path: Path, threads: int = 16) -> int:
    """Register the checkpoint's files for DMA; returns the bytes pinned (0 if it would not fit, see
    AVAILABLE_SHARE). Raises PinFailed if CUDA refuses."""
    path = Path(path)
    with _lock:
        if path in _pinned:
            return _bytes(_pinned[path])
        held = sum(_bytes(files) for files in _pinned.values())  # pinned pages still count as available in meminfo
    files = sorted({entry.file for entry in read_index(path).values()})
    size = sum(file.stat().st_size for file in files)
    if held + size > AVAILABLE_SHARE * available_host_bytes():
        return 0
    pinned: dict[Path, PinnedFile] = {}
    try:
        for file in files:
            with open(file, "rb") as handle:
                mapping = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
            with warnings.catch_warnings():  # "not writable": nothing writes through this view
                warnings.simplefilter("ignore")
                view = torch.frombuffer(mapping, dtype=torch.uint8)
            base = view.data_ptr()
            slices = [(base + start, min(SLICE_BYTES, view.numel() - start)) for start in range(0, view.numel(), SLICE_BYTES)]
            pinned[file] = PinnedFile(mapping, view, [])
            with ThreadPoolExecutor(threads) as pool:
                outcomes = list(pool.map(_register, slices))
            pinned[file].slices = [piece for piece, error in outcomes if error is None]
            errors = [error for _, error in outcomes if error is not None]
            if errors:
                raise PinFailed(errors[0])
    except BaseException:
        _release(pinned)
        raise
    with _lock:
        _pinned[path] = pinned
    return size


def registered_ranges(offset: int, length: int) -> list[tuple[int, int]]:
    """[offset, offset + length) of a pinned file cut where its registered slices meet: CUDA takes each slice as an
    allocation of its own, and a copy reaching across two fails with "invalid argument"."""
    ranges, end = [], offset + length
    while offset < end:
        stop = min(end, (offset // SLICE_BYTES + 1) * SLICE_BYTES)
        ranges.append((offset, stop))
        offset = stop
    return ranges


def pinned_views(path: Path) -> dict[Path, torch.Tensor] | None:
    with _lock:
        files = _pinned.get(Path(path))
        return None if files is None else {file: pinned.view for file, pinned in files.items()}


def unpin_all() -> None:
    with _lock:
        checkpoints = list(_pinned.values())
        _pinned.clear()
    for files in checkpoints:
        _release(files)


def _bytes(files: dict[Path, PinnedFile]) -> int:
    return sum(pinned.view.numel() for pinned in files.values())


def _register(piece: tuple[int, int]) -> tuple[tuple[int, int], str | None]:
    address, size = piece
    status = torch.cuda.cudart().cudaHostRegister(address, size, REGISTER_READ_ONLY)
    return piece, None if int(status) == 0 else f"cudaHostRegister refused {size} bytes: {status}"


def _release(files: dict[Path, PinnedFile]) -> None:
    for pinned in files.values():
        for address, _ in pinned.slices:
            torch.cuda.cudart().cudaHostUnregister(address)
        pinned.slices.clear()
        del pinned.view
        try:
            pinned.mapping.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes with it
            pass
