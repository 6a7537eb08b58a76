"""Helpers shared by the benchmarks: environment facts and JSON results."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    from importlib.metadata import version

    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "host_cpus": _cpus()}
    for package in ("torch", "transformers", "vlmux", "nvidia-ml-py"):
        try:
            info[package] = version(package)
        except Exception:  # noqa: BLE001 - not installed, or run from a source tree
            info[package] = None
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        info["gpu"] = None
    return info


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def summarise(values: list[float]) -> dict:
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def write_result(name: str, data: dict, out: Path | None = None) -> Path:
    out = out or RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return out
