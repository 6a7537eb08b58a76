"""Making room on one GPU for a load: the idle runners to evict, least recently used first; or the releases under way
to wait for; or, when only busy runners hold the room, `MustWait` (with when the wait for them starts to count: once
their minimum residencies ended); or, when the model cannot fit at all, PoolFull. Called by the scheduler with its
lock held."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from vlmux.config import ModelSpec
from vlmux.errors import PoolFull
from vlmux.estimate import MAX_AUTO_BATCH, Estimate, estimate
from vlmux.pool.runner import SERVING, Runner, State

GIB = 2**30


class MustWait(PoolFull):
    """Busy runners hold the room: a load waits for one to go idle, and raises this as PoolFull if none does."""

    def __init__(self, message: str, holders: tuple[str, ...] = (), counts_from: float = 0.0) -> None:
        super().__init__(message)
        self.holders = holders  # the busy models whose going idle would make the room
        self.counts_from = counts_from  # when the wait for them starts to count: their minimum residencies' end


@dataclass(frozen=True)
class Needs:
    """What a model takes on a GPU with its smallest and its largest batch."""

    smallest: Estimate
    largest: Estimate

    @classmethod
    def of(cls, spec: ModelSpec, path: Path, tokens: int, on_gpu: bool, fixed_batch: int | None) -> "Needs":
        """Both the fixed batch size when one is set."""
        return cls(estimate(path, spec.dtype, fixed_batch or 1, tokens, on_gpu, spec.quantize),
                   estimate(path, spec.dtype, fixed_batch or MAX_AUTO_BATCH, tokens, on_gpu, spec.quantize))

    def charge(self, room: int) -> int:
        """What a new runner books: room for its largest batch if `room` holds it, else for the most images `room`
        holds (the estimate grows by the same bytes per image), at least its smallest batch. A budget tighter than
        the largest batch must not leave a model answering one request at a time."""
        if self.largest.total <= room:
            return self.largest.total
        per_image = (self.largest.total - self.smallest.total) // max(1, MAX_AUTO_BATCH - 1)
        if per_image <= 0 or room <= self.smallest.total:  # a fixed batch size, or no room beyond the smallest
            return self.smallest.total
        return self.smallest.total + (room - self.smallest.total) // per_image * per_image


@dataclass(frozen=True)
class GpuRoom:
    index: int
    budget: int  # what the pool may book on it
    booked: int  # what its runners are booked for now
    free: int  # what NVML says is free


def charge_on(gpu: GpuRoom, needs: Needs, name: str, runners: Sequence[Runner], stopping: Sequence[Runner]) -> int:
    """What a new runner books on `gpu`: it evicts only what its smallest batch needs, then fills the room that
    leaves. Filling only the room beside the runners it evicts anyway would book one image (the model resident
    before it filled the budget) and leave it answering one request at a time."""
    victims, _ = make_room(gpu, needs.smallest.total, name, runners, stopping, ())
    freed = sum(victim.placement.booked()[gpu.index] for victim in victims)
    return needs.charge(min(gpu.budget - gpu.booked, gpu.free) + freed)


def make_room(gpu: GpuRoom, need: int, name: str, runners: Sequence[Runner], stopping: Sequence[Runner],
              chosen: Sequence[Runner]) -> tuple[list[Runner], list[Future]]:
    """`runners`: the scheduler's table; `stopping`: runners off it whose release is not verified; `chosen`: victims
    already chosen for this load on other GPUs."""
    here = [r for r in runners if gpu.index in r.placement.gpus and r not in chosen]
    booked = gpu.booked - sum(r.placement.booked().get(gpu.index, 0) for r in chosen)
    free = gpu.free
    now = time.monotonic()
    idle = sorted((r for r in here if r.evictable(now)), key=lambda r: r.last_used)
    victims: list[Runner] = []
    while booked + need > gpu.budget or need > free:
        if idle:
            victim = idle.pop(0)
            victims.append(victim)
            booked -= victim.placement.booked()[gpu.index]
            free += victim.placement.booked()[gpu.index]
            continue
        releasing = [r.stopped for r in [*here, *stopping] if gpu.index in r.placement.gpus
                     and r.state in (State.STOPPING, State.DEAD) and not r.stopped.done()]
        if releasing:
            return [], releasing
        busy = [r for r in here if r.state in (*SERVING, State.LOADING) and r not in victims and r.name != name]
        held = ", ".join(f"{r.name} (~{r.placement.booked()[gpu.index] / GIB:.1f} GiB, {r.state.value}"
                         f"{', busy' if r.in_flight else ''}{', pinned' if r.pinned else ''})" for r in busy)
        message = (f"{name} needs ~{need / GIB:.1f} GiB on GPU {gpu.index}; budget {gpu.budget / GIB:.1f} GiB, "
                   f"free {free / GIB:.1f} GiB; resident: {held or 'none'}. "
                   "Raise --vram-budget, lower --batch-size, or unload a model.")
        room_once_idle = sum(r.placement.booked()[gpu.index] for r in busy if not r.pinned)
        if busy and booked - room_once_idle + need <= gpu.budget:
            kept = max((r.kept_until() for r in busy if not r.pinned), default=0.0)  # one still loading: inf
            raise MustWait(message, tuple(r.name for r in busy if not r.pinned), now if math.isinf(kept) else kept)
        raise PoolFull(message)
    return victims, []
