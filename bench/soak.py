"""Soak (issue 22): CYCLES load / caption / unload cycles of two models, one after the other, in one process (one
ModelPool). Every unload's release is recorded (on a GPU: verified by NVML, with its residue in MiB); this process's
RSS, threads, file descriptors and /dev/shm segments are read at the start, every 50 cycles and at the end, and the
workers seen and every process under this one but its fork server (one per process, by design) are checked gone
once the pool is closed. The pool runs with its defaults (a spare worker started ahead of each load, as a user gets
it): each load still takes a fresh worker process and each unload ends it. --cold-workers turns the spare off, so
each load also waits for its worker's start. On the CPU (--tiny) it runs with two tiny models.

Usage: python3 bench/soak.py --tiny [--cycles 200] [--out FILE]                       (CPU)
       python3 bench/soak.py --tiny --device cuda [--cycles 200] [--out FILE]         (a GPU: two tiny models)
       python3 bench/soak.py --models /tmp/vlmux-bench [--cycles 200] [--out FILE]     (a GPU: the 2B and 7B shapes)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from PIL import Image  # noqa: E402

from vlmux import GenerationSpec, ModelPool, ModelSpec, PoolConfig  # noqa: E402
from vlmux.testing.load import host_figures  # noqa: E402
from vlmux.testing.processes import descendants, fork_servers, process_gone  # noqa: E402
from vlmux.tiny import build_tiny  # noqa: E402

GEN = GenerationSpec(max_new_tokens=4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=200, help="load/unload cycles of each of the two models")
    parser.add_argument("--tiny", action="store_true", help="two tiny models (on the CPU unless --device cuda)")
    parser.add_argument("--device", help="cpu or cuda (default: cpu with --tiny, else cuda)")
    parser.add_argument("--models", type=Path, default=Path("/tmp/vlmux-bench"), help="holds qwen2-vl-2b and -7b")
    parser.add_argument("--minutes", type=float, help="stop after the cycle that passes this (a device call's limit)")
    parser.add_argument("--cold-workers", action="store_true", help="no spare worker: each load starts its worker")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            paths = [build_tiny(Path(scratch) / arch, arch, seed=0) for arch in ("llava", "qwen2_vl")]
        else:
            paths = [args.models / "qwen2-vl-2b", args.models / "qwen2-vl-7b"]
        device = args.device or ("cpu" if args.tiny else "cuda")
        data = soak(paths, device, args.cycles, args.minutes, spare_worker=not args.cold_workers)
    path = write_result("soak", {"environment": environment(), **data}, args.out)
    print(json.dumps({k: v for k, v in data.items() if k != "releases"}, indent=1))
    print(f"written to {path}")


def soak(paths: list[Path], device: str, cycles: int, minutes: float | None = None, spare_worker: bool = True) -> dict:
    image = Image.new("RGB", (64, 48), "orange")
    releases, samples, pids = [], [], set()
    started = time.perf_counter()
    with ModelPool(PoolConfig(spare_worker=spare_worker)) as pool:
        samples.append({"cycle": 0, **host_figures()})
        for cycle in range(1, cycles + 1):
            for path in paths:
                begun = time.perf_counter()
                name = pool.load(ModelSpec(str(path), device=device))
                loaded = time.perf_counter()
                pids.add(pool.status()[0].pid)
                assert pool.caption(name, [image], ["Describe."], GEN)[0].caption is not None
                captioned = time.perf_counter()
                release = pool.unload(name)
                releases.append({"cycle": cycle, "model": path.name, "verified": release.verified,
                                 "process_gone": release.process_gone, "residue_mib": release.residue_mib,
                                 "seconds": round(release.seconds, 3), "load_s": round(loaded - begun, 3),
                                 "caption_s": round(captioned - loaded, 3),
                                 "unload_s": round(time.perf_counter() - captioned, 3)})
            over = minutes is not None and time.perf_counter() - started > minutes * 60
            if cycle == 1 or cycle % 50 == 0 or cycle == cycles or over:  # cycle 1: once lazy threads exist
                samples.append({"cycle": cycle, **host_figures()})
                print(f"cycle {cycle}: {samples[-1]}", file=sys.stderr, flush=True)
            if over:
                break
    servers = fork_servers(os.getpid())  # the process's one fork server outlives its pools by design
    left = [pid for pid in descendants(os.getpid()) if pid not in servers and not process_gone(pid, within=5)]
    residues = [r["residue_mib"] for r in releases if r["residue_mib"] is not None]
    phases = {phase: round(statistics.median(r[phase] for r in releases), 3) for phase in ("load_s", "caption_s", "unload_s")}
    return {"cycles": samples[-1]["cycle"], "median_seconds": phases, "models": [p.name for p in paths], "device": device,
            "wall_s": time.perf_counter() - started, "unloads": len(releases),
            "unverified": sum(1 for r in releases if r["verified"] is False),
            "max_residue_mib": max(residues) if residues else None,
            "spare_worker": spare_worker, "workers_left": sorted(pid for pid in pids if not process_gone(pid)),
            "processes_left": left, "fork_servers": len(servers),
            "start": samples[0], "end": samples[-1], "samples": samples, "releases": releases}


if __name__ == "__main__":
    main()
