"""The rows of bench/throughput.py. `run_row` runs inside a child process (it imports torch); `vlmux_api` runs in
the bench's own process, which, like any vlmux user, never touches CUDA itself."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def run_row(row: str, args: argparse.Namespace, prompt: str) -> dict:
    files = sorted((args.work / f"files-{args.files}").glob("*.jpg"))
    rows = {"hf_batch1": hf_batch1, "hf_script": hf_script, "hf_dynamic": hf_dynamic,
            "hf_static_compile": hf_static_compile, "vlmux_gpu": vlmux_gpu}
    return rows[row](args, files, prompt)


def _hf(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, device_map=args.device).eval()
    return processor, model, dtype


def _inputs(processor, paths: list[Path], prompt: str, device: str, dtype):
    from PIL import Image

    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    images = [[Image.open(path).convert("RGB")] for path in paths]
    return processor(text=[text] * len(paths), images=images, padding=True, return_tensors="pt").to(device, dtype=dtype)


def _generate(model, inputs, new_tokens: int, **options) -> tuple[float, int]:
    """Seconds for one generate call (device synchronised) and new tokens per row."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options)
    if output.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, output.shape[1] - inputs["input_ids"].shape[1]


def hf_batch1(args: argparse.Namespace, files: list[Path], prompt: str) -> dict:
    processor, model, dtype = _hf(args)
    times, tokens = [], 0
    for path in files:  # files in: open, processor, generate, one image at a time
        start = time.perf_counter()
        _, tokens = _generate(model, _inputs(processor, [path], prompt, args.device, dtype), args.new_tokens)
        times.append(time.perf_counter() - start)
        if time.time() > args.deadline and len(times) >= 3:
            break
    steady = times[1:]  # the first call loads kernels
    return {"images_per_s": round(len(steady) / sum(steady), 2), "batch": 1, "images": len(steady),
            "tokens_per_image": tokens, "kind": "end to end (files in)"}


def hf_script(args: argparse.Namespace, files: list[Path], prompt: str) -> dict:
    """The script a user writes: files in batches of 128 (--batch if smaller), the processor on the host, generate,
    decode the text."""
    import torch

    batch = min(128, args.batch)
    processor, model, dtype = _hf(args)
    done, started, tokens = 0, None, 0
    for offset in range(0, len(files), batch):
        chunk = files[offset: offset + batch]
        inputs = _inputs(processor, chunk, prompt, args.device, dtype)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False)
        answers = output[:, inputs["input_ids"].shape[1]:]
        processor.batch_decode(answers, skip_special_tokens=True)  # the captions, as the script writes them out
        tokens = answers.shape[1]
        if started is None:  # the first batch loads kernels: timed from its end
            started = time.perf_counter()
            continue
        done += len(chunk)
        if time.time() > args.deadline:
            break
    seconds = time.perf_counter() - started
    return {"images_per_s": round(done / seconds, 2) if done else None, "batch": batch, "images": done,
            "tokens_per_image": tokens, "kind": "end to end (files in)"}


def hf_dynamic(args: argparse.Namespace, files: list[Path], prompt: str) -> dict:
    processor, model, dtype = _hf(args)
    sweep = {}
    for batch in sorted(int(b) for b in args.sweep.split(",")):
        if time.time() > args.deadline and sweep:
            break
        inputs = _inputs(processor, files[:batch], prompt, args.device, dtype)
        seconds, tokens = _generate(model, inputs, args.new_tokens)
        if time.time() < args.deadline:
            seconds = min(seconds, _generate(model, inputs, args.new_tokens)[0])  # the first one warmed kernels up
        sweep[batch] = round(batch / seconds, 2)
        del inputs
    best = max(sweep, key=sweep.get)
    return {"images_per_s": sweep[best], "batch": best, "sweep": sweep, "tokens_per_image": tokens,
            "kind": "GPU only (inputs on the device)"}


def hf_static_compile(args: argparse.Namespace, files: list[Path], prompt: str) -> dict:
    from transformers import CompileConfig

    processor, model, dtype = _hf(args)
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # on the CPU check too; on CUDA generate compiles anyway
    options = {"cache_implementation": "static", "compile_config": compile_config}
    inputs = _inputs(processor, files[: args.batch], prompt, args.device, dtype)
    first, tokens = _generate(model, inputs, args.new_tokens, **options)
    times = []
    while not times or (time.time() < args.deadline and len(times) < 5):
        times.append(_generate(model, inputs, args.new_tokens, **options)[0])
    return {"images_per_s": round(args.batch / statistics.median(times), 2), "batch": args.batch,
            "compile_seconds": round(first, 1), "calls": len(times), "tokens_per_image": tokens,
            "kind": "GPU only (inputs on the device)"}


def vlmux_gpu(args: argparse.Namespace, files: list[Path], prompt: str) -> dict:
    import torch

    from vlmux.backends.transformers import TransformersBackend
    from vlmux.config import GenerationSpec, ModelSpec
    from vlmux.images import load_image

    backend = TransformersBackend(ModelSpec(str(args.model), device=args.device, decode=args.decode), str(args.model))
    gen = GenerationSpec(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
    batch = min(args.batch, backend.largest_batch(gen.max_new_tokens, None) or args.batch)
    prepared, prepare_seconds = [], []
    for offset in (0, batch):  # two distinct batches, prepared before the clock starts
        start = time.perf_counter()
        images = [load_image(str(path)) for path in files[offset : offset + batch]]
        prepared.append(backend.prepare(images, [prompt] * len(images), pad_to=batch))
        prepare_seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    backend.generate(prepared[0], gen)
    first = time.perf_counter() - start
    times = []
    while not times or (time.time() < args.deadline and len(times) < 6):
        start = time.perf_counter()
        backend.generate(prepared[len(times) % 2], gen)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tokens = backend.generated_tokens / (len(times) + 1) / batch
    return {"images_per_s": round(batch / statistics.median(times), 2), "batch": batch, "decode": args.decode,
            "fast": str(backend.fast), "compile_seconds": round(first, 1), "calls": len(times),
            "host_prepare_seconds_per_batch": round(max(prepare_seconds), 2), "tokens_per_image": round(tokens, 1),
            "kind": "GPU only (prepared inputs); host_prepare is what the overlapped thread must keep under a batch"}


def vlmux_api(args: argparse.Namespace, model: Path, files: list[Path], prompt: str, new_tokens: int,
              deadline: float) -> dict:
    """Files in, JSONL out, through vlmux.pipeline: one call, which the worker runs in chunks of --batch with the
    next chunk decoded and preprocessed while the current one generates. A first call of one chunk pays the load's
    compile before the clock starts (reported as warm_seconds)."""
    import vlmux

    out = args.work / "api-captions.jsonl"
    start = time.perf_counter()
    with vlmux.pipeline(str(model), device=args.device, batch_size=args.batch, max_new_tokens=new_tokens,
                        ignore_eos=True, decode=args.decode) as pipe:
        load = time.perf_counter() - start
        pipe([str(path) for path in files[: args.batch]], prompt)
        warm = time.perf_counter() - start - load
        start = time.perf_counter()
        captions = pipe([str(path) for path in files], prompt)
        with out.open("w") as sink:
            for path, caption in zip(files, captions):
                sink.write(json.dumps({"file": path.name, "caption": caption}) + "\n")
        seconds = time.perf_counter() - start
    return {"images_per_s": round(len(files) / seconds, 2), "images": len(files), "batch": args.batch,
            "load_seconds": round(load, 1), "warm_seconds": round(warm, 1), "decode": args.decode,
            "over_deadline": time.time() > deadline, "kind": "end to end (files in, JSONL out), after a warm call"}
