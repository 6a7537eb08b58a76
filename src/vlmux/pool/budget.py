"""VRAM budgets as users write them."""
from __future__ import annotations


def parse_budget(budget: str | float | int, total: int) -> int:
    """0.8 -> 80 % of the device; "40GiB", "40GB", "4000MiB" -> bytes; an int above 1 -> bytes."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return int(budget * total) if budget <= 1 else int(budget)
    text = str(budget).strip()
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "TB": 10**12, "GB": 10**9, "MB": 10**6, "%": total / 100}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return parse_budget(float(text), total)
