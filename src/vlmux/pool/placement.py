"""Where a model's workers go: which GPUs each one sees, how many replicas fit, and how a model too large for any
one GPU is split across several inside one worker. A pure function of the GPU inventory and the estimate, so it
can be tested with any inventory and no hardware."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vlmux.budget import parse_budget
from vlmux.errors import ModelLoadError
from vlmux.estimate import Estimate
from vlmux.pool.vram import GpuMemory
from vlmux.pool.workers import GpuInventory

GIB = 2**30


class PlacementError(ValueError):
    """Nothing fits: the message says what was needed, what each GPU had, and what to change."""


@dataclass(frozen=True)
class WorkerPlacement:
    """One worker: the GPUs it sees (NVML indices, in the order it will number them), or none for the CPU."""

    gpus: tuple[int, ...] = ()
    max_memory: tuple[int, ...] = ()  # a split model: bytes of weights device_map may put on each visible GPU
    charges: tuple[int, ...] = ()  # bytes booked against each of `gpus` in its budget

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(gpu) for gpu in self.gpus)

    @property
    def split(self) -> bool:
        return len(self.gpus) > 1

    @property
    def device(self) -> str:
        """The device as the worker names it: its first visible GPU is always cuda:0."""
        return "cuda:0" if self.gpus else "cpu"

    def booked(self) -> dict[int, int]:
        return dict(zip(self.gpus, self.charges))

    @property
    def env(self) -> dict[str, str]:
        # A worker sees only its own GPUs, numbered from cuda:0, and a CPU worker sees none, so it cannot create
        # a context.
        return {"CUDA_VISIBLE_DEVICES": self.cuda_visible_devices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def host_device(inventory: GpuInventory, device: str) -> str:
    """A spec's device as this host has it: auto is the first GPU if there is one."""
    status = inventory.status()
    if device == "auto":
        return "cuda:0" if status is None else "cpu"
    if device.startswith("cuda") and status is not None:
        raise ModelLoadError(f"device {device} asked for, but {status}; use device='cpu' (--device cpu)")
    return "cuda:0" if device == "cuda" else device


def select_gpus(inventory: Sequence[GpuMemory], wanted: str | Sequence[int]) -> list[GpuMemory]:
    """`wanted` is "all", "0,1,3" or a list of NVML indices."""
    by_index = {gpu.index: gpu for gpu in inventory}
    if isinstance(wanted, str):
        if wanted.strip() == "all":
            return list(inventory)
        try:
            wanted = [int(part) for part in wanted.split(",") if part.strip()]
        except ValueError:
            raise PlacementError(f"--gpus {wanted!r}: give 'all' or GPU indices such as 0,1") from None
    if not wanted:
        raise PlacementError("no GPU selected: give 'all' or GPU indices such as 0,1")
    missing = [index for index in wanted if index not in by_index]
    if missing:
        have = ", ".join(str(index) for index in by_index) or "none"
        raise PlacementError(f"GPU {missing[0]} does not exist; this host has GPUs {have}")
    if len(set(wanted)) != len(wanted):
        raise PlacementError("a GPU is listed twice")
    return [by_index[index] for index in wanted]


def capacity(gpu: GpuMemory, budget: str | float | int | None, booked: int = 0) -> int:
    """What one more worker may take on `gpu`: its free memory, and no more than the budget leaves."""
    limit = gpu.total if budget is None else parse_budget(budget, gpu.total)
    return max(0, min(gpu.free, limit - booked))


def place(need: Estimate, inventory: Sequence[GpuMemory], replicas: int | None = None,
          budget: str | float | int | None = None, booked: Mapping[int, int] | None = None) -> tuple[WorkerPlacement, ...]:
    """Workers for one model. A model that fits one GPU gets a replica per GPU (or `replicas`, spread over the GPUs
    first and then stacked while memory lasts); one that fits no single GPU is split over the fewest GPUs that hold
    it, and each disjoint group of that many GPUs can run a replica. No inventory means CPU workers."""
    if replicas is not None and replicas < 1:
        raise PlacementError("--replicas must be at least 1")
    if not inventory:
        return tuple(WorkerPlacement() for _ in range(replicas or 1))
    booked = booked or {}
    room = {gpu.index: capacity(gpu, budget, booked.get(gpu.index, 0)) for gpu in inventory}
    if need.total <= max(room.values()):
        return _replicate(need, room, replicas)
    return _split(need, room, replicas)


def _replicate(need: Estimate, room: dict[int, int], replicas: int | None) -> tuple[WorkerPlacement, ...]:
    left = dict(room)
    count = {index: 0 for index in room}
    wanted = replicas or sum(1 for free in room.values() if free >= need.total)
    placed = []
    for _ in range(wanted):
        fits = [index for index in left if left[index] >= need.total]
        if not fits:
            raise PlacementError(
                f"{wanted} replicas of ~{_gib(need.total)} wanted, only {len(placed)} fit "
                f"({_rooms(room)}); ask for fewer --replicas, lower --batch-size or raise --vram-budget")
        index = min(fits, key=lambda i: (count[i], -left[i], i))  # spread before stacking
        left[index] -= need.total
        count[index] += 1
        placed.append(WorkerPlacement((index,), (), (need.total,)))
    return tuple(placed)


def _split(need: Estimate, room: dict[int, int], replicas: int | None) -> tuple[WorkerPlacement, ...]:
    """Each GPU of a split worker pays a CUDA context and its share of the KV cache and activations; what is left
    on it may hold weights, and device_map="auto" balances the weights over those limits."""
    order = sorted(room, key=lambda i: (-room[i], i))
    runtime = need.kv_cache + need.activations
    for size in range(2, len(order) + 1):
        groups = []
        for start in range(0, len(order) - size + 1, size):
            group = order[start : start + size]
            weights_room = [room[i] - need.context - runtime // size for i in group]
            if min(weights_room) > 0 and sum(weights_room) >= need.weights:
                groups.append((tuple(group), tuple(weights_room)))
        if not groups:
            continue
        wanted = replicas or len(groups)
        if wanted > len(groups):
            raise PlacementError(
                f"the model needs {size} GPUs per replica (~{_gib(need.total)} in all); {wanted} replicas wanted, "
                f"only {len(groups)} fit ({_rooms(room)})")
        share = need.context + runtime // size
        return tuple(
            WorkerPlacement(group, weights_room, tuple(share + min(r, -(-need.weights // size)) for r in weights_room))
            for group, weights_room in groups[:wanted]
        )
    together = sum(room.values())
    raise PlacementError(
        f"the model needs ~{_gib(need.total)} (weights {_gib(need.weights)}, KV cache and activations "
        f"{_gib(runtime)}); no GPU has room for it and {'the ' + str(len(room)) + ' GPUs together' if len(room) > 1 else 'it'} "
        f"cannot hold it either ({_rooms(room)}, {_gib(together)} in all). "
        + ("Use --gpus all to split it across this host's GPUs, " if len(room) == 1 else "")
        + "lower --batch-size, use a smaller --dtype or raise --vram-budget")


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def _rooms(room: Mapping[int, int]) -> str:
    return ", ".join(f"GPU {index}: {_gib(free)} usable" for index, free in room.items())
