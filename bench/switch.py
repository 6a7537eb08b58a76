"""Switch benchmark (DESIGN.md section 5): A (2B shape) -> B (7B shape) -> A ..., seconds from "unload the
current model" to "the next one answered its first request", and NVML residue after every unload.

The ways, in one run:
  pool_switch  exactly what a user writes: ModelPool() with its defaults, pool.switch(current, ModelSpec(other,
               device="cuda")), then pool.chat(...) with one JPEG and 8 new tokens; seconds from switch() to the answer
               (issue 20's row). The first switch of the pool is in the list (`first`).
  pool_switch_prewarm  the same with PoolConfig(prewarm=[both models]): the spare is warm before the first switch
  pool_switch_pinned   the same as prewarm, the spare also pinning the checkpoints' pages (warm_spare_pins_weights)
  vlmux        ModelPool: A's worker exits while B loads in the spare worker, which is warm (CUDA context and
               B's kernels ready, see PoolConfig.warm_spare); A's release is verified by NVML
  vlmux_pinned the same, the spare also pinning the recent checkpoints' page-cache pages for DMA
               (PoolConfig.warm_spare_pins_weights)
  vlmux_cold_spare  the same with a spare that has imported torch and transformers but never touched CUDA
  in_process   one process: del + gc.collect() + torch.cuda.empty_cache(), then from_pretrained (what users do)
  cold_worker  a fresh Python process per model, as a naive isolation would do (pays the imports every time)
  vlmux_hot    the hot tier: both models stay in their workers; A sleeps (weights to pinned host RAM) and B wakes
               (weights back over PCIe): like vLLM's sleep mode, so the sleeper keeps its CUDA context on the GPU

Usage (on a GPU machine): python bench/switch.py [--rounds 10] [--baseline-rounds 3] [--models /tmp/vlmux-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, summarise, write_result  # noqa: E402

from vlmux.pool import vram  # noqa: E402
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig  # noqa: E402

PROMPT = "Describe this image in one short sentence for a caption dataset, please."
FIRST_ANSWER = GenerationSpec(PROMPT, max_new_tokens=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--baseline-rounds", type=int, default=3)
    parser.add_argument("--models", type=Path, default=Path("/tmp/vlmux-bench"))
    parser.add_argument("--shapes", default="2b,7b")
    parser.add_argument("--methods", default="vlmux,vlmux_cold_spare,in_process,cold_worker,vlmux_hot")
    parser.add_argument("--cold", action="store_true",
                        help="pool_switch rows: drop the next model's checkpoint from the page cache before each switch")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).parent / "shapes.py"), str(args.models), *shapes], check=True)
    build_seconds = time.perf_counter() - start
    models = [args.models / f"qwen2-vl-{shape}" for shape in shapes]
    from shapes import write_jpegs

    image = write_jpegs(args.models / "images", 1)[0]
    for model in models:  # warm page cache: the benchmark is about the switch, not the disk
        for file in model.glob("*.safetensors"):
            with open(file, "rb") as f:
                while f.read(64 << 20):
                    pass
    result = {"benchmark": "switch", "environment": environment(), "shapes": shapes, "build_seconds": build_seconds,
              "rounds": args.rounds, "baseline_rounds": args.baseline_rounds}
    wanted = args.methods.split(",")
    methods = tuple(m for m in ("pool_switch", "pool_switch_prewarm", "pool_switch_pinned", "vlmux", "vlmux_pinned",
                                "vlmux_cold_spare", "in_process", "cold_worker", "vlmux_hot") if m in wanted)
    result["cold_page_cache"] = args.cold
    runs = {
        "pool_switch": lambda: run_pool_switch(models, image, args.baseline_rounds, PoolConfig(), args.cold),
        "pool_switch_prewarm": lambda: run_pool_switch(models, image, args.rounds,
                                                       PoolConfig(prewarm=[str(m) for m in models]), args.cold),
        "pool_switch_pinned": lambda: run_pool_switch(
            models, image, args.rounds, PoolConfig(prewarm=[str(m) for m in models], warm_spare_pins_weights=True),
            args.cold),
        "vlmux": lambda: run_vlmux(models, image, args.rounds),
        "vlmux_cold_spare": lambda: run_vlmux(models, image, args.baseline_rounds, warm_spare=False),
        "vlmux_pinned": lambda: run_vlmux(models, image, args.rounds, pins=True),  # spare pins the recent checkpoints
        "in_process": lambda: run_child("in_process", models, image, args.baseline_rounds),
        "cold_worker": lambda: run_cold(models, image, args.baseline_rounds),
        "vlmux_hot": lambda: run_hot(models, image, args.rounds),
    }
    for method in methods:
        result[method] = runs[method]()
        switches = result[method]["switches"]
        result[method]["summary"] = {
            shape: summarise([s["switch_seconds"] for s in switches if s["to"] == shape]) for shape in shapes
        }
        result[method]["max_residue_mib"] = max([s["residue_mib"] or 0 for s in switches] or [float("nan")])
        if switches and "first" in switches[0]:
            result[method]["first_switch_seconds"] = switches[0]["switch_seconds"]
        write_result("switch", result, args.out)  # after each method, so a run cut short keeps what it measured
    print(f"{'method':<17} {'to':<4} {'median s':>9} {'min s':>7} {'max s':>7} {'max residue MiB':>16}")
    for method in methods:
        for shape, stats in result[method]["summary"].items():
            if not stats:
                continue
            print(f"{method:<17} {shape:<4} {stats['median']:>9.3f} {stats['min']:>7.3f} {stats['max']:>7.3f} "
                  f"{result[method]['max_residue_mib']:>16.0f}")


def _order(models: list[Path], rounds: int) -> list[tuple[Path, Path]]:
    pairs = []
    for _ in range(rounds):
        pairs += [(models[0], models[1]), (models[1], models[0])]
    return pairs


def _shape(model: Path) -> str:
    return model.name.rsplit("-", 1)[-1]


def drop_page_cache(model: Path) -> None:
    """Evict a checkpoint's pages from the page cache (pinned pages stay: they cannot be evicted)."""
    for file in model.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_pool_switch(models: list[Path], image: Path, rounds: int, config: PoolConfig, cold: bool) -> dict:
    """Issue 20's row, public API only: switch(), then chat() with one image; the spare is waited for between
    switches, as a server or a job has seconds between them."""
    from vlmux import ModelPool

    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": PROMPT}]}]
    switches = []
    with ModelPool(config) as pool:
        current = pool.load(ModelSpec(str(models[0]), device="cuda"))
        pool.chat(current, messages, FIRST_ANSWER)
        for number, (source, target) in enumerate(_order(models, rounds)):
            spare_ready = pool.wait_for_spare(120)
            if cold:
                drop_page_cache(target)
            t0 = time.perf_counter()
            current, release = pool.switch(current, ModelSpec(str(target), device="cuda"))
            t1 = time.perf_counter()
            answer = pool.chat(current, messages, FIRST_ANSWER)
            t2 = time.perf_counter()
            switch = {"from": _shape(source), "to": _shape(target), "first": number == 0, "switch_seconds": t2 - t0,
                      "switch_call_seconds": t1 - t0, "answer_seconds": t2 - t1, "worker_load": pool.load_info(current),
                      "release_wait_seconds": release.seconds, "spare_ready": spare_ready,
                      "residue_mib": release.residue_mib, "release_verified": release.verified, "answer": answer[:40]}
            switches.append(switch)
            print(f"pool.switch {switch['from']}->{switch['to']}: {t2 - t0:.3f} s (switch() {t1 - t0:.3f}, chat "
                  f"{t2 - t1:.3f}), {release}", file=sys.stderr)
    return {"config": repr(config), "cold_page_cache": cold, "switches": switches}


def run_vlmux(models: list[Path], image: Path, rounds: int, warm_spare: bool = True, pins: bool = False) -> dict:
    """The steps of ModelPool.switch, timed one by one: unload_async(A), load(B) (in the spare, at the same time
    when both fit), B's first answer. Between switches the bench waits for the spare to be ready again, as a job
    or a server has seconds between switches."""
    from vlmux.pool import ModelPool
    from vlmux.pool.forks import warm_fork_server

    start = time.perf_counter()
    warm_fork_server()
    fork_server_seconds = time.perf_counter() - start
    sizes = {model: sum(f.stat().st_size for f in model.glob("*.safetensors")) for model in models}
    switches = []
    with ModelPool(PoolConfig(max_batch_size=1, warm_spare=warm_spare, warm_spare_pins_weights=pins)) as pool:
        current = pool.load(ModelSpec(str(models[0]), device="cuda"))
        pool.caption(current, [str(image)], [PROMPT], FIRST_ANSWER)
        for source, target in _order(models, rounds):
            spare_ready = pool.wait_for_spare(120)
            marks: dict[str, float] = {}
            t0 = time.perf_counter()
            releasing = pool.unload_async(str(source))
            releasing.add_done_callback(lambda _: marks.setdefault("released", time.perf_counter()))
            current = pool.load(ModelSpec(str(target), device="cuda"))
            t1 = time.perf_counter()
            release = releasing.result()
            pool.caption(current, [str(image)], [PROMPT], FIRST_ANSWER)
            t2 = time.perf_counter()
            load = pool.load_info(current)
            switch = {"from": _shape(source), "to": _shape(target), "switch_seconds": t2 - t0,
                      "unload_and_verify_seconds": marks["released"] - t0, "release_wait_seconds": release.seconds,
                      "load_seconds": t1 - t0, "first_answer_seconds": t2 - t1, "worker_load": load,
                      # the copy alone (`stream`), without building the empty model; `weights` has both
                      "load_gb_per_s": round(sizes[target] / 1e9 / max(load.get("stream", load.get("weights", 0)), 1e-9), 1),
                      "spare_ready": spare_ready, "residue_mib": release.residue_mib,
                      "release_verified": release.verified}
            switches.append(switch)
            print(f"vlmux{'' if warm_spare else ' (cold spare)'}{' (pinned)' if pins else ''} {switch['from']}->{switch['to']}: {t2 - t0:.3f} s "
                  f"(unload+verify {switch['unload_and_verify_seconds']:.3f}, load {t1 - t0:.3f} {load}, "
                  f"{switch['load_gb_per_s']} GB/s, answer {t2 - t1:.3f}), {release}", file=sys.stderr)
    return {"fork_server_start_seconds": fork_server_seconds, "warm_spare": warm_spare, "pins": pins, "switches": switches}


def run_hot(models: list[Path], image: Path, rounds: int) -> dict:
    """Sleep the current model, wake the next by asking it: seconds to B's first answer, and what the sleeping
    worker keeps on the GPU (its CUDA context: no weights)."""
    from vlmux.pool import ModelPool

    switches = []
    with ModelPool(PoolConfig(max_batch_size=1, warm_spare=False)) as pool:
        names = {model: pool.load(ModelSpec(str(model), device="cuda")) for model in models}
        for model in models:
            pool.caption(names[model], [str(image)], [PROMPT], FIRST_ANSWER)
        pool.sleep(names[models[1]])
        pids = {status.name: status.pid for status in pool.status()}
        for source, target in _order(models, rounds):
            t0 = time.perf_counter()
            pool.sleep(names[source])
            t1 = time.perf_counter()
            pool.caption(names[target], [str(image)], [PROMPT], FIRST_ANSWER)  # wakes it first
            t2 = time.perf_counter()
            kept = vram.process_memory(0).get(pids[names[source]], 0)
            switches.append({"from": _shape(source), "to": _shape(target), "switch_seconds": t2 - t0,
                             "sleep_seconds": t1 - t0, "wake_and_first_answer_seconds": t2 - t1,
                             "sleeper_keeps_mib": kept / 2**20, "residue_mib": None})
            print(f"hot {_shape(source)}->{_shape(target)}: {t2 - t0:.3f} s (sleep {t1 - t0:.3f}, wake+answer "
                  f"{t2 - t1:.3f}), the sleeper keeps {kept / 2**20:.0f} MiB", file=sys.stderr)
    return {"switches": switches}


def run_child(mode: str, models: list[Path], image: Path, rounds: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(image), str(rounds), *map(str, models)]
    output = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(output.stderr[-3000:])
    if output.returncode != 0:
        return {"error": output.stderr[-1000:], "switches": []}
    return json.loads(output.stdout.strip().splitlines()[-1])


def in_process_child(image: Path, rounds: int, models: list[Path]) -> dict:
    """What users do today in one process: from_pretrained, generate, then del + gc.collect() + empty_cache()."""
    import gc

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmux.images import load_image

    picture = load_image(image)
    gpu = vram.physical_index("cuda:0")
    baseline = vram.gpu_memory(gpu).used

    def load_and_answer(path: Path):
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda:0")
        loaded = time.perf_counter()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[[picture]], return_tensors="pt").to("cuda:0", dtype=torch.bfloat16)
        model.generate(**inputs, max_new_tokens=FIRST_ANSWER.max_new_tokens, do_sample=False)
        return model, processor, loaded

    model, processor, _ = load_and_answer(models[0])
    switches = []
    for source, target in _order(models, rounds):
        t0 = time.perf_counter()
        del model, processor
        gc.collect()
        torch.cuda.empty_cache()
        t1 = time.perf_counter()
        residue = (vram.gpu_memory(gpu).used - baseline) / vram.MIB
        model, processor, t2 = load_and_answer(target)
        t3 = time.perf_counter()
        switches.append({"from": _shape(source), "to": _shape(target), "switch_seconds": t3 - t0,
                         "unload_seconds": t1 - t0, "load_seconds": t2 - t1, "first_answer_seconds": t3 - t2,
                         "residue_mib": residue})
        print(f"in_process {_shape(source)}->{_shape(target)}: {t3 - t0:.3f} s, residue {residue:.0f} MiB", file=sys.stderr)
    return {"switches": switches}


COLD_CHILD = """
import sys, time
from vlmux.backends.transformers import TransformersBackend
from vlmux.config import GenerationSpec, ModelSpec
from vlmux.images import load_image
backend = TransformersBackend(ModelSpec(sys.argv[1], device="cuda"), sys.argv[1])
backend.caption([load_image(sys.argv[2])], [sys.argv[3]], GenerationSpec(sys.argv[3], max_new_tokens=8))
print("ready", flush=True)
sys.stdin.read()
"""


def run_cold(models: list[Path], image: Path, rounds: int) -> dict:
    gpu = vram.physical_index("cuda:0")
    baseline = vram.unattributed(gpu)

    def start(model: Path) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", COLD_CHILD, str(model), str(image), PROMPT],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        return child

    current = start(models[0])
    switches = []
    for source, target in _order(models, rounds):
        t0 = time.perf_counter()
        current.kill()
        current.wait()
        release = vram.wait_for_release(gpu, current.pid, baseline, timeout=10)
        t1 = time.perf_counter()
        current = start(target)
        t2 = time.perf_counter()
        switches.append({"from": _shape(source), "to": _shape(target), "switch_seconds": t2 - t0,
                         "unload_seconds": t1 - t0, "load_and_first_answer_seconds": t2 - t1,
                         "residue_mib": release.residue_mib, "release_verified": release.verified})
        print(f"cold {_shape(source)}->{_shape(target)}: {t2 - t0:.3f} s, {release}", file=sys.stderr)
    current.kill()
    return {"switches": switches}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _, _, mode, image, rounds, *models = sys.argv
        print(json.dumps(in_process_child(Path(image), int(rounds), [Path(m) for m in models])))
    else:
        main()
