"""The hot tier: models asleep in host RAM (weights pinned there, worker and CUDA context alive, no weights on the
GPU) under a host-RAM budget, so waking one is a copy over PCIe instead of a load from disk."""
from __future__ import annotations

from typing import Sequence

from vlmux.hostmem import host_ram
from vlmux.budget import parse_budget


def host_budget(budget: str | float | int | None) -> int | None:
    """PoolConfig.host_ram_budget in bytes ("64GiB", 0.5 of the host's RAM), or None for no limit."""
    return None if budget is None else parse_budget(budget, host_ram())


def to_evict(name: str, need: int, sleeping: Sequence[tuple[str, int, float]], budget: int) -> list[str]:
    """Sleeping models to unload, least recently used first, so that `name` (`need` bytes) fits asleep under
    `budget` beside the rest. sleeping: (name, bytes, last used) of the models asleep now."""
    if need > budget:
        raise ValueError(
            f"{name} needs ~{need / 2**30:.1f} GiB of host RAM to sleep; host_ram_budget is {budget / 2**30:.1f} GiB. "
            "Raise host_ram_budget, or unload the model instead (its next load reads the disk or the page cache)."
        )
    held = sum(size for _, size, _ in sleeping)
    evict = []
    for other, size, _ in sorted(sleeping, key=lambda entry: entry[2]):
        if held + need <= budget:
            break
        evict.append(other)
        held -= size
    return evict
