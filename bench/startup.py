"""A caption job's start-up (issue 17): this checkout against another, side by side in one run, runs alternated:
  server_import  a fresh interpreter imports what the workers' fork server imports (vlmux.worker.preload) and exits
                 as the server would (os._exit): the seconds of the import (and its CPU seconds, less disturbed by
                 other work on the host), and server_process: the process from its start to its exit
  prep_import    the same for the preparing processes' fork server (worker/prep.py PRELOAD, in its order)
  caption        `vlmux caption` on the bundled samples with the bundled tiny model (vlmux/shapes), through the public
                 command as vlmux.testing.cli starts it, wall seconds from its start until it and its processes exit
Each checkout runs from its own src/ in this interpreter, with the same packages (--extra-path: others ahead of
them); `servers` names the large optional packages each server's imports left in memory. Medians of --runs.

Usage: python3 bench/startup.py --baseline PATH [--runs 5] [--extra-path DIR] [--out bench/results/startup-DATE-cpu.json]
  PATH: another checkout, e.g. `git archive main | tar -x -C /tmp/vlmux-main` or a `git worktree` of main
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, summarise, write_result  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
OPTIONAL = ("sklearn", "scipy", "pandas", "pyarrow", "torchao", "bitsandbytes", "torchvision", "accelerate", "sympy",
            "torch._dynamo", "torch.distributed.fsdp", "triton")
IMPORT = """
import importlib, importlib.util, json, os, sys, time
start, cpu = time.perf_counter(), time.process_time()
for module in {modules}:
    importlib.import_module(module)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({{"seconds": seconds, "cpu": cpu, "loaded": [m for m in {optional!r} if m in sys.modules],
                  "installed": [m for m in {optional!r} if "." not in m and importlib.util.find_spec(m)],
                  "versions": {{m: sys.modules[m].__version__ for m in ("torch", "transformers", "sklearn")
                               if m in sys.modules}}}}))
os._exit(0)
"""
SERVER = "['vlmux.worker.preload']"
PREP = "__import__('vlmux.worker.prep', fromlist=['PRELOAD']).PRELOAD"


def checkout_env(checkout: Path, extra_path: str | None) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(checkout / "src"), extra_path]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def time_import(env: dict[str, str], modules: str) -> tuple[dict, float]:
    """What the child reports (seconds and CPU seconds importing, the optional packages loaded and installed,
    versions), and the seconds from the interpreter's start to its exit."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", IMPORT.format(modules=modules, optional=OPTIONAL)],
                          env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"importing {modules} with {env['PYTHONPATH']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1]), wall


def time_caption(env: dict[str, str], images: Path, scratch: Path) -> float:
    """Seconds from the command's start to its exit; the command as vlmux.testing.cli starts it."""
    out = Path(tempfile.mkdtemp(dir=scratch)) / "captions.jsonl"
    command = [sys.executable, "-m", "vlmux.cli", "caption", str(images), "-m", "vlmux/shapes", "-o", str(out),
               "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"vlmux caption with {env['PYTHONPATH']} failed:\n{done.stderr[-3000:]}")
    captioned = sum(1 for line in out.read_text().splitlines() if json.loads(line)["caption"] is not None)
    if captioned != len(sample_images(images)):
        raise RuntimeError(f"{env['PYTHONPATH']}: {captioned} of {len(sample_images(images))} images captioned")
    return wall


def sample_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout (its src/vlmux is used)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-caption", action="store_true", help="the imports only")
    parser.add_argument("--extra-path", help="put after each checkout's src/ on PYTHONPATH (another transformers, "
                                             "say: pip install --target DIR --no-deps transformers==5.17.0)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    checkouts = {"this": HERE, "baseline": args.baseline.resolve()}
    for name, checkout in checkouts.items():
        if not (checkout / "src" / "vlmux" / "worker" / "preload.py").is_file():
            parser.error(f"{checkout} is not a vlmux checkout (no src/vlmux/worker/preload.py)")
    images = HERE / "src" / "vlmux" / "samples"
    measures = [f"{server}_{measure}" for server in ("server", "prep") for measure in ("import", "import_cpu", "process")]
    measures.append("caption")
    seconds = {name: {measure: [] for measure in measures} for name in checkouts}
    reported: dict[str, dict[str, dict]] = {name: {} for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="vlmux-startup-") as scratch:
        for run in range(args.runs):
            order = list(checkouts) if run % 2 == 0 else list(reversed(checkouts))  # neither always goes first
            for name in order:
                env = checkout_env(checkouts[name], args.extra_path)
                for server, modules in (("server", SERVER), ("prep", PREP)):
                    child, process = time_import(env, modules)
                    seconds[name][f"{server}_import"].append(child.pop("seconds"))
                    seconds[name][f"{server}_import_cpu"].append(child.pop("cpu"))
                    seconds[name][f"{server}_process"].append(process)
                    reported[name][server] = child
                if not args.skip_caption:
                    seconds[name]["caption"].append(time_caption(env, images, Path(scratch)))
                print(f"run {run + 1}/{args.runs} {name}: "
                      + ", ".join(f"{m} {v[-1]:.2f}s" for m, v in seconds[name].items() if v), file=sys.stderr)
    result = {
        "benchmark": "startup",
        "environment": {**environment(), **reported["this"]["server"]["versions"]},  # as the servers imported them
        "checkouts": {name: {"path": str(path), "commit": _commit(path)} for name, path in checkouts.items()},
        "extra_path": args.extra_path,
        "workload": {"runs": args.runs, "images": len(sample_images(images)), "model": "vlmux/shapes",
                     "command": "vlmux caption SAMPLES -m vlmux/shapes -o OUT.jsonl --no-progress"},
        "seconds": {name: {m: summarise(v) for m, v in per.items() if v} for name, per in seconds.items()},
        "median_saved_seconds": {m: median(seconds["baseline"][m]) - median(seconds["this"][m])
                                 for m in measures if seconds["this"][m]},
        "servers": reported,  # per checkout and server: optional packages loaded, those installed, versions
    }
    print(json.dumps(result["median_saved_seconds"], indent=2))
    write_result("startup", result, args.out)


def _commit(checkout: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


if __name__ == "__main__":
    main()
