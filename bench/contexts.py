"""How NVML books device memory while several CUDA contexts live (run on a GPU): device used, each process's
entry and the memory booked to no process, as contexts come and go. vlmux's release check relies on the last
figure staying put while another worker's context exists (a warm spare, a model loading during a switch).

Usage: python bench/contexts.py [--out FILE]   (prints JSON)
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from vlmux.pool import vram

CHILD = """
import os, sys, torch
torch.empty(1, device="cuda")
x = torch.empty(int(sys.argv[1]) << 20, dtype=torch.uint8, device="cuda")
torch.matmul(torch.ones(256, 256, device="cuda", dtype=torch.bfloat16), torch.ones(256, 256, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.read()
"""


def snapshot(label: str) -> dict:
    time.sleep(0.3)
    memory = vram.gpu_memory(0)
    return {"label": label, "used_mib": memory.used / vram.MIB, "processes_mib": {str(pid): used / vram.MIB for pid, used in vram.process_memory(0).items()},
            "unattributed_mib": vram.unattributed(0) / vram.MIB}


def start(mib: int, env: dict | None = None) -> subprocess.Popen:
    import os

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, **(env or {})})
    assert child.stdout.readline().strip() == "ready"
    return child


def main() -> list[dict]:
    steps = [snapshot("idle")]
    a = start(1024)
    steps.append(snapshot("A: context + 1 GiB"))
    b = start(0)
    steps.append(snapshot("A + B: B context only"))
    c = start(0, {"CUDA_MODULE_LOADING": "EAGER"})
    steps.append(snapshot("A + B + C: C context, eager module loading"))
    a.kill(), a.wait()
    steps.append(snapshot("A killed"))
    b.kill(), b.wait(), c.kill(), c.wait()
    steps.append(snapshot("all gone"))
    for step in steps:
        print(json.dumps(step))
    return steps


if __name__ == "__main__":
    result = main()
    if len(sys.argv) > 2 and sys.argv[1] == "--out":
        with open(sys.argv[2], "w") as f:
            json.dump(result, f, indent=1)
