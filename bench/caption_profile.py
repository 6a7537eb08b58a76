"""Where one caption batch's time goes (issue 6): the host's share (JPEG decode, the processor) and the GPU's
(vision encoder with transformers' per-image attention and with vlmux's packed attention, the prefill, the decode
steps with the dynamic and the static + compiled cache), and a torch.profiler table of one generate call.

Steps (--steps): host, vision (per-image against packed attention), vision_compiled, prefill, dynamic, overlap
(generate alone against generate while the next batch is decoded and prepared in threads, as the worker does),
compiled, engine (decode mode `engine`'s batch in parts: vision and positions, prefill, decode steps, each against
its floor), profile (torch.profiler table of a dynamic generate), text_compiled (last: the language model's layers
compiled too, prefill before and after).

Device command (one H200, ~5 minutes, builds the 2B shape like bench/throughput.py):
  PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 python3 bench/caption_profile.py --out $OUT/caption_profile.json
CPU check: PYTHONPATH=src python3 bench/caption_profile.py --model /tmp/tiny-qwen --device cpu --batch 4 --new-tokens 4
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402
from throughput import PROMPT, WORKLOADS, bench_copy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2b")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workload", choices=WORKLOADS, default="caption")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--steps", default="host,vision,vision_compiled,prefill,dynamic,overlap,compiled,engine,profile,"
                                           "text_compiled")
    parser.add_argument("--tflops", type=float, default=790.0, help="the floors' bf16 compute (DESIGN.md: H200)")
    parser.add_argument("--hbm-tbs", type=float, default=4.8, help="the floors' memory bandwidth, TB/s (H200)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlmux-bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    max_pixels, new_tokens = WORKLOADS[args.workload]
    new_tokens = args.new_tokens or new_tokens
    source = args.model
    if source is None:
        subprocess.run([sys.executable, str(Path(__file__).parent / "shapes.py"), str(args.work), args.shape], check=True)
        source = args.work / f"qwen2-vl-{args.shape}"
    model_path = bench_copy(source, args.work / f"{source.name}-{args.workload}-noeos", max_pixels)
    from shapes import write_jpegs

    jpegs = write_jpegs(args.work / "jpegs", max(args.batch, 8))
    files = [jpegs[i % len(jpegs)] for i in range(args.batch)]
    result = {"benchmark": "caption_profile", "environment": environment(), "model": str(source), "batch": args.batch,
              "workload": args.workload, "new_tokens": new_tokens, "steps": {}}
    steps = args.steps.split(",")
    profile(args, model_path, files, new_tokens, steps, result)
    write_result("caption_profile", result, args.out)


def timed(function, device: str, repeat: int = 3) -> tuple[float, object]:
    """Best of `repeat` synchronised calls, after one warm-up call."""
    import torch

    value = function()
    best = float("inf")
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, value


def profile(args, model_path: Path, files: list[Path], new_tokens: int, steps: list[str], result: dict) -> None:
    import torch

    from vlmux.backends.fast import FastConfig, generate_options
    from vlmux.backends.transformers import TransformersBackend
    from vlmux.config import GenerationSpec, ModelSpec
    from vlmux.images import load_image

    out = result["steps"]
    backend = TransformersBackend(ModelSpec(str(model_path), device=args.device, decode="dynamic"), str(model_path))
    model, device = backend.model, backend.device
    out["load"] = {k: round(v, 3) for k, v in backend.timings.items()}
    out["vision_attention"] = model.config.vision_config._attn_implementation

    start = time.perf_counter()
    images = [load_image(str(path)) for path in files]
    decode_seconds = time.perf_counter() - start
    backend.prepare(images[:4], [PROMPT] * 4)  # the first call loads the processor's code paths
    start = time.perf_counter()
    prepared = backend.prepare(images, [PROMPT] * len(images))
    if prepared.ready is not None:
        prepared.ready.synchronize()
    prepare_seconds = time.perf_counter() - start
    if "host" in steps:
        with ThreadPoolExecutor(8) as pool:
            start = time.perf_counter()
            list(pool.map(lambda p: load_image(str(p)), files))
            decode_8 = time.perf_counter() - start
        out["host"] = {"decode_jpegs_s": round(decode_seconds, 3), "decode_jpegs_8_threads_s": round(decode_8, 3),
                       "prepare_s": round(prepare_seconds, 3), "preprocess_on_device": backend.preprocess_on_device,
                       "torch_threads": torch.get_num_threads(), "attention": backend.attention,
                       "prompt_tokens": prepared.inputs["input_ids"].shape[1]}
        print("host", out["host"], flush=True)
    if prepared.ready is not None:
        torch.cuda.current_stream().wait_event(prepared.ready)
    inputs = prepared.inputs.to(device)
    gen = GenerationSpec(PROMPT, max_new_tokens=new_tokens, ignore_eos=True)
    vision_config = model.config.vision_config

    from vlmux.backends.attention import NAME as PACKED, use_fast_attention

    use_fast_attention(model, packed_vision=True)  # registers packed attention; the loop below picks per run
    vision_config._attn_implementation = out["vision_attention"]
    if "vision" in steps:
        visual = model.model.visual
        for name in ("sdpa", PACKED):
            vision_config._attn_implementation = name
            with torch.inference_mode():
                seconds, _ = timed(lambda: visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]), device)
            out[f"vision_{name}_s"] = round(seconds, 4)
            print("vision", name, seconds, flush=True)
        vision_config._attn_implementation = out["vision_attention"]

    if "vision_compiled" in steps:  # each vision block compiled with packed attention, as decode "compiled" runs it
        visual = model.model.visual
        vision_config._attn_implementation = PACKED
        for block in visual.blocks:
            block.compile()
        start = time.perf_counter()
        with torch.inference_mode():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            out["vision_compile_first_call_s"] = round(time.perf_counter() - start, 1)
            seconds, _ = timed(lambda: visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]), device)
        out["vision_compiled_s"] = round(seconds, 4)
        print("vision compiled", seconds, flush=True)

    if "prefill" in steps:
        with torch.inference_mode():
            seconds, _ = timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device)
        out["prefill_s"] = round(seconds, 4)
        print("prefill", seconds, flush=True)

    def run(fast: dict) -> None:
        backend._generate(inputs, gen, fast, inputs["input_ids"].shape[0])

    if "dynamic" in steps:
        seconds, _ = timed(lambda: run({}), device, repeat=2)
        out["generate_dynamic_s"] = round(seconds, 3)
        out["generate_dynamic_images_per_s"] = round(args.batch / seconds, 1)
        print("dynamic", seconds, flush=True)

    if "compiled" in steps:
        options = generate_options(FastConfig(static_cache=True, compile=True), inputs["input_ids"].shape[1], new_tokens)
        start = time.perf_counter()
        run(options)
        out["compile_first_call_s"] = round(time.perf_counter() - start, 1)
        seconds, _ = timed(lambda: run(options), device, repeat=2)
        out["generate_compiled_s"] = round(seconds, 3)
        out["generate_compiled_images_per_s"] = round(args.batch / seconds, 1)
        print("compiled", seconds, flush=True)

    if "overlap" in steps:  # the worker's pattern: the next batch decoded and prepared while this one generates
        import threading

        alone, _ = timed(lambda: run({}), device, repeat=1)
        busy = threading.Event()

        def prepare_meanwhile() -> None:
            with ThreadPoolExecutor(8) as decoders:
                while not busy.is_set():
                    decoded = list(decoders.map(lambda p: load_image(str(p)), files))
                    ready = backend.prepare(decoded, [PROMPT] * len(decoded)).ready
                    if ready is not None:
                        ready.synchronize()

        thread = threading.Thread(target=prepare_meanwhile)
        thread.start()
        try:
            together, _ = timed(lambda: run({}), device, repeat=1)
        finally:
            busy.set()
            thread.join()
        out["overlap"] = {"generate_alone_s": round(alone, 3), "generate_while_preparing_s": round(together, 3)}
        print("overlap", out["overlap"], flush=True)

    if "engine" in steps:
        out["engine"] = engine_parts(model, backend.tokenizer.pad_token_id, inputs, gen, device, args)
        print("engine", out["engine"], flush=True)

    if "profile" in steps:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with torch_profile(activities=activities) as prof:
            run({})
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)
        out["profile_dynamic_table"] = table.splitlines()
        print(table, flush=True)

    if "text_compiled" in steps:  # an experiment, last: the language model's layers compiled for the prefill
        with torch.inference_mode():
            seconds, _ = timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device)
            out["prefill_before_text_compiled_s"] = round(seconds, 4)
            for layer in model.model.language_model.layers:
                layer.compile(dynamic=True)
            start = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            out["text_compile_first_call_s"] = round(time.perf_counter() - start, 1)
            seconds, _ = timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device)
        out["prefill_text_compiled_s"] = round(seconds, 4)
        print("prefill, text layers compiled", seconds, flush=True)


def engine_parts(model, pad_token_id: int, inputs, gen, device: str, args) -> dict:
    """One batch through decode mode `engine`, whole and in parts, each part beside its floor: compute at --tflops for
    the vision tower and the prefill, the weights and the cache read once per decode step at --hbm-tbs."""
    from dataclasses import replace

    from vlmux.backends.engine.captioner import EngineCaptioner
    from vlmux.backends.engine.config import TextShape
    from vlmux.backends.engine.prompts import prompts_from_inputs
    from vlmux.backends.engine.sampling import Sampling

    captioner = EngineCaptioner(model, pad_token_id)
    whole, _ = timed(lambda: captioner.generate(inputs, gen), device, repeat=2)  # grows the runner, captures graphs
    stats = captioner.stats
    embed, prompts = timed(lambda: prompts_from_inputs(model, inputs), device)
    sampling = Sampling.of(gen, model.generation_config)
    first_token = replace(sampling, max_new_tokens=1)  # prefill and its first token: no decode step
    prefill, _ = timed(lambda: captioner.runner.run(list(prompts), first_token), device)
    answer, _ = timed(lambda: captioner.runner.run(list(prompts), sampling), device)
    steps = max(stats.decode_steps, 1)
    language = model.model.language_model
    lm_params = sum(p.numel() for p in language.parameters()) + model.lm_head.weight.numel()
    lm_bytes = lm_params * model.lm_head.weight.element_size()
    vision_params = sum(p.numel() for p in model.model.visual.parameters())
    patches = inputs["pixel_values"].shape[0]
    prompt_tokens = int(inputs["attention_mask"].sum())
    shape = TextShape.from_config(model.config.get_text_config())
    rows = inputs["input_ids"].shape[0]
    mean_length = prompt_tokens / rows + gen.max_new_tokens / 2
    kv_bytes = rows * mean_length * shape.layers * 2 * shape.kv_heads * shape.head_dim * model.lm_head.weight.element_size()
    flops = args.tflops * 1e12
    decode_s = answer - prefill
    return {"rows": rows, "vision_attention": model.config.vision_config._attn_implementation,
            "whole_s": round(whole, 3), "images_per_s": round(rows / whole, 1),
            "vision_and_positions_s": round(embed, 3), "vision_floor_s": round(2 * vision_params * patches / flops, 3),
            "prefill_s": round(prefill, 3), "prefill_floor_s": round(2 * lm_params * prompt_tokens / flops, 3),
            "decode_s": round(decode_s, 3), "decode_steps": steps, "decode_step_ms": round(1000 * decode_s / steps, 2),
            "decode_step_floor_ms": round(1000 * (lm_bytes + kv_bytes) / (args.hbm_tbs * 1e12), 2),
            "widest_step": stats.widest_step, "prefills": stats.prefills}


if __name__ == "__main__":
    main()
