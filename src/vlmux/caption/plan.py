"""What runs with which settings: per-model prompts from the command line or a TOML job file, and prompt
templates with {file}, {folder} and {existing}."""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from vlmux.backends.engine.config import refusal
from vlmux.caption.sources import ImageRef, UsageError
from vlmux.config import MAX_PIXELS, GenerationSpec, ModelSpec
from vlmux.estimate import read_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PER_MODEL = ("prompt", "max_new_tokens", "batch_size", "dtype", "decode", "quantize")
# Decode auto becomes "compiled" on a GPU from this many images per model: enough to win back even a cold compile.
COMPILE_MIN_IMAGES = 5000
# ... and "engine", where it runs the model, from this many: its CUDA graphs' capture takes seconds, not a compile's
# minute, and pays back within a few hundred images (docs/BENCHMARKS.md, issue 17).
ENGINE_MIN_IMAGES = 512


@dataclass(frozen=True)
class ModelPlan:
    spec: ModelSpec
    generation: GenerationSpec
    batch_size: int | None = None  # images per model batch; None ("auto"): the worker picks at load (Loaded.batch_size)


def render_prompt(template: str, ref: ImageRef) -> str:
    """Fill {file}, {folder} and {existing}; other braces stay as written (prompts may hold JSON)."""
    if "{" not in template:
        return template
    folder = ref.path.parent.name if ref.path is not None else ""
    file = ref.path.name if ref.path is not None else ref.key
    existing = ref.existing_caption() if "{existing}" in template else ""
    return template.replace("{file}", file).replace("{folder}", folder).replace("{existing}", existing)


def plans_from_options(models: list[dict], defaults: dict, device: str) -> list[ModelPlan]:
    """`models` is one dict per -m, holding the options given after it; `defaults` holds those given before."""
    return [_plan({**defaults, **{k: v for k, v in model.items() if v is not None}}, device) for model in models]


def plans_from_file(path: Path, overrides: dict, device: str) -> list[ModelPlan]:
    """A TOML job file: optional [defaults] and one [[model]] table per model (model = "...", plus any of
    prompt, prompt_file, max_new_tokens, batch_size (a number or "auto"), dtype, decode). Command-line options override
    [defaults]."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: cannot read the job file: {e}") from None
    models = data.get("model") or []
    if not models or not all(isinstance(entry, dict) and "model" in entry for entry in models):
        raise UsageError(f'{path}: needs one or more [[model]] tables with model = "hub id or folder"')
    defaults = {**data.get("defaults", {}), **{k: v for k, v in overrides.items() if v is not None}}
    return [_plan({**defaults, **entry}, device, base=path.parent) for entry in models]


def _plan(options: dict, device: str, base: Path | None = None) -> ModelPlan:
    unknown = set(options) - {"model", "prompt_file", *PER_MODEL, "sample", "temperature", "top_p", "seed", "prep_processes",
                              "max_pixels", "trust_remote_code"}
    if unknown:
        raise UsageError(f"unknown model options {sorted(unknown)}; known: model, prompt_file, {', '.join(PER_MODEL)}")
    prompt = options.get("prompt")
    if options.get("prompt_file"):
        prompt_file = Path(options["prompt_file"])
        prompt_file = prompt_file if prompt_file.is_absolute() or base is None else base / prompt_file
        if not prompt_file.is_file():
            raise UsageError(f"{prompt_file}: no such prompt file")
        prompt = prompt_file.read_text(encoding="utf-8").strip()
    generation = GenerationSpec(max_new_tokens=int(options.get("max_new_tokens") or 64),
                                do_sample=bool(options.get("sample")), temperature=float(options.get("temperature") or 1.0),
                                top_p=float(options.get("top_p") or 1.0), seed=options.get("seed"),
                                max_pixels=int(options.get("max_pixels") or MAX_PIXELS))
    if prompt:
        generation = replace(generation, prompt=prompt)
    try:
        spec = ModelSpec(str(options["model"]), device, options.get("dtype") or "auto", decode=options.get("decode") or "auto",
                         prep_processes=options.get("prep_processes"), quantize=options.get("quantize"),
                         trust_remote_code=bool(options.get("trust_remote_code")))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return ModelPlan(spec, generation, batch_size(options.get("batch_size", "auto")))


def job_decode(spec: ModelSpec, images: int, gpu_present: bool, folder: Path | None = None) -> ModelSpec:
    """The decode mode a caption job of `images` images runs `spec` with, on a GPU: auto becomes engine for a model
    folder the engine runs (from ENGINE_MIN_IMAGES), else compiled for a job long enough to pay for the compile
    (COMPILE_MIN_IMAGES); anything the user chose stays."""
    if spec.decode != "auto" or not gpu_present or spec.device == "cpu":
        return spec
    if images >= ENGINE_MIN_IMAGES and folder is not None and engine_runs(spec, folder):
        return replace(spec, decode="engine")
    return replace(spec, decode="compiled") if images >= COMPILE_MIN_IMAGES else spec


def engine_runs(spec: ModelSpec, folder: Path) -> bool:
    """Whether decode `engine` runs this model folder as `spec` loads it."""
    config = read_json(folder / "config.json")
    if spec.quantize or spec.max_memory or spec.runs_remote_code(config):
        return False
    return refusal(config, read_json(folder / "generation_config.json")) is None


def job_prep(spec: ModelSpec, images: int, gpu_present: bool) -> ModelSpec:
    """Preparing processes for a caption job on a GPU, counted now so that the worker starts them with the load
    (`prep_processes` left at None starts them only at the first large request, and the first batches then miss
    them while they import); anything the user chose stays."""
    from vlmux.worker.prep import MIN_IMAGES, auto_processes

    if spec.prep_processes is not None or not gpu_present or spec.device == "cpu" or images < MIN_IMAGES:
        return spec
    return replace(spec, prep_processes=auto_processes("cuda"))


def batch_size(value: object) -> int | None:
    """"auto" (None) or a whole number of at least 1, from the command line or a job file."""
    if value is None or value == "auto":
        return None
    try:
        size = int(str(value))
    except ValueError:
        raise UsageError(f"batch_size must be a number or auto, not {value!r}") from None
    if size < 1:
        raise UsageError("batch_size must be at least 1")
    return size
