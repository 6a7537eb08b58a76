"""VRAM and host-RAM budgets as users write them, checked where they are made and resolved against a total."""
from __future__ import annotations

import math

# Longest first: "GiB" must not be read as "B" after a number "40Gi".
_UNITS = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
FORMS = "a fraction of the whole (0.8), a percentage (80%) or a size (40GiB, 4000MiB)"


def check_budget(budget: str | float | int, name: str = "vram_budget") -> tuple[float, int]:
    """(fraction of the whole, bytes), one of them 0; a ValueError naming `name` and the value for anything else. A
    bare number is a fraction (<= 1): "40" would be 40 bytes, so it is refused with the forms to write instead. An
    int above 1 (the Python API's) is bytes."""

    def wrong(why: str) -> ValueError:
        return ValueError(f"{name} {budget!r}: {why}; write {FORMS}".lstrip())

    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise wrong("not a budget")
    if isinstance(budget, int):
        if budget < 1:
            raise wrong("must be more than 0")
        return (1.0, 0) if budget == 1 else (0.0, budget)
    text = budget.strip().upper() if isinstance(budget, str) else ""
    unit = next((u for u in (*_UNITS, "%") if text.endswith(u)), "")
    try:
        number = float(text[: len(text) - len(unit)].strip()) if isinstance(budget, str) else budget
    except ValueError:
        raise wrong("not a number with a unit") from None
    if not math.isfinite(number) or number <= 0:
        raise wrong("must be a finite amount more than 0")
    if unit == "%":
        if number > 100:
            raise wrong("more than 100%")
        return number / 100, 0
    if unit:
        return 0.0, int(number * _UNITS[unit])
    if number > 1:
        raise wrong(f"a bare number is a fraction of at most 1 (did you mean {number:g}GiB?)")
    return number, 0


def parse_budget(budget: str | float | int, total: int, name: str = "vram_budget") -> int:
    """0.8 -> 80 % of `total`; "40GiB", "40GB", "4000MiB" -> bytes; "80%"; an int above 1 -> bytes."""
    fraction, size = check_budget(budget, name)
    return int(fraction * total) if fraction else size
