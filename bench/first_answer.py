"""Where a fresh worker's first answer spends its time (run on a GPU).

Each variant runs in a child forked from this process after it imported what the fork server preloads (never
CUDA), so the child starts where a vlmux worker starts. The child loads the model, answers twice, and writes
its timings and a cProfile of load + first answer (top functions by own time) as JSON lines.

Usage: python bench/first_answer.py MODEL_DIR IMAGE [VARIANT ...]
"""
from __future__ import annotations

import cProfile
import io
import json
import multiprocessing
import os
import pstats
import sys
import time

import vlmux.worker.preload  # noqa: F401  (what every worker starts with)

# warm_spare_no_cudnn_sdpa: whether the first answer's extra time is cuDNN attention building an execution plan for
# each new shape (every decode step's key length is new in a first answer), which flash/efficient kernels skip.
VARIANTS = ("cold", "warm_spare", "warm_spare_no_cudnn_sdpa", "eager_modules", "preimport_model")


def _top(profile: cProfile.Profile, sort: str, count: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(sort).print_stats(count)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())[-6000:]


def child(model: str, image: str, variant: str, queue: multiprocessing.Queue) -> None:
    import torch

    from vlmux.backends.transformers import TransformersBackend
    from vlmux.config import GenerationSpec, ModelSpec
    from vlmux.images import load_image

    if variant == "eager_modules":
        os.environ["CUDA_MODULE_LOADING"] = "EAGER"
    result: dict = {"variant": variant}
    if variant.endswith("no_cudnn_sdpa"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    if variant.startswith("warm_spare"):  # what a warm spare did before the load was asked for: not timed here
        from vlmux.backends.warm import warm_up

        result["warm_up"] = {k: round(v, 3) for k, v in warm_up(ModelSpec(model, device="cuda"), model).items()}
    gen = GenerationSpec("Describe this image in one short sentence for a caption dataset, please.", max_new_tokens=8)
    profile = cProfile.Profile()
    profile.enable()
    start = time.perf_counter()
    backend = TransformersBackend(ModelSpec(model, device="cuda"), model)
    result["load"] = round(time.perf_counter() - start, 3)
    result["load_parts"] = {k: round(v, 3) for k, v in backend.timings.items()}
    for attempt in ("first", "second", "third"):
        begin = time.perf_counter()
        backend.caption([load_image(image)], [gen.prompt], gen)
        torch.cuda.synchronize()
        result[f"{attempt}_answer"] = round(time.perf_counter() - begin, 3)
        if attempt == "first":
            profile.disable()
    result["load_to_first_answer"] = round(result["load"] + result["first_answer"], 3)
    result["top_tottime"] = _top(profile, "tottime")
    result["top_cumtime"] = _top(profile, "cumulative", 40)
    queue.put(result)


def main(model: str, image: str, variants: list[str]) -> list[dict]:
    context = multiprocessing.get_context("fork")
    results = []
    for variant in variants or VARIANTS:
        if variant == "preimport_model":
            # What a fork server could import for known architectures: the model's modules, processor included.
            import transformers.models.qwen2_vl.image_processing_qwen2_vl  # noqa: F401
            import transformers.models.qwen2_vl.modeling_qwen2_vl  # noqa: F401
            import transformers.models.qwen2_vl.processing_qwen2_vl  # noqa: F401
            try:
                import transformers.models.qwen2_vl.image_processing_qwen2_vl_fast  # noqa: F401
            except ImportError:
                pass
        queue = context.Queue()
        process = context.Process(target=child, args=(model, image, variant, queue))
        process.start()
        result = queue.get()
        process.join()
        summary = {k: v for k, v in result.items() if not k.startswith("top_")}
        print(json.dumps(summary), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    out = main(sys.argv[1], sys.argv[2], sys.argv[3:])
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "first_answer.json"), "w") as f:
            json.dump(out, f, indent=1)
