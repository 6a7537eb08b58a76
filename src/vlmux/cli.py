"""The `vlmux` command: caption, make-tiny, demo; serve, ps, load, unload (vlmux.serve.cli); review (vlmux.review.cli)."""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from vlmux import __version__
from vlmux.caption.plan import COMPILE_MIN_IMAGES, ENGINE_MIN_IMAGES
from vlmux.config import DECODE_MODES, DEFAULT_PROMPT, DTYPES, MAX_PIXELS, PoolConfig
from vlmux.quantization import METHODS as QUANTIZE_METHODS
from vlmux.review.cli import add_command as add_review_command
from vlmux.serve.cli import add_commands as add_serve_commands
from vlmux.serve.settings import budget_option, option

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = ("Exit codes: 0 the job ran to its end (images that failed have error records and are counted in the "
              "summary), 1 the job failed (a model that does not load, a disk error), 2 a usage error (nothing was "
              "done), 130 interrupted (finished results are kept; rerun to resume)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from vlmux.caption.sources import UsageError
    from vlmux.hub import ModelNotFound

    try:
        return args.run(args)
    except (UsageError, ModelNotFound, ValueError) as e:
        print(f"vlmux {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"vlmux {args.command}: interrupted; finished results are saved, rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RuntimeError, OSError) as e:
        hint = ""
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            hint = "; free some space and run the same command again: finished results are kept and skipped"
        elif isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            hint = "; make the output writable and run the same command again: finished results are kept and skipped"
        print(f"vlmux {args.command}: failed: {e}{hint}", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmux", description="Caption images with many vision-language models, VRAM given back between them.")
    parser.add_argument("--version", action="version", version=f"vlmux {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    caption = commands.add_parser(
        "caption", help="caption images with one or more models in turn",
        epilog="--prompt, --prompt-file, --max-new-tokens, --batch-size, --dtype, --decode and --quantize given after a -m apply to that "
               "model only; given before any -m, to all. Prompts may use {file}, {folder} and {existing}. With no -o, "
               "sidecar files are written beside the images (IMAGE.txt; IMAGE.{model}.txt for several models). "
               + EXIT_CODES + ".")
    caption.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, folders, a .txt list of paths, a .csv/.parquet with a path column, or a saved HF dataset")
    caption.add_argument("-m", "--model", action=_ModelAction, dest="models", default=[], help="hub id or local folder; repeat for several")
    caption.add_argument("--job", type=Path, help="a TOML job file listing the models and their settings")
    caption.add_argument("-o", "--output", type=Path, action="append", default=[],
                         help="results file: .jsonl, .csv, .parquet, metadata.jsonl or metadata.csv (repeatable); "
                              "without -o, sidecar .txt files beside the images")
    caption.add_argument("--sidecar", metavar="EXT", help="write IMAGE.EXT beside each image ({model} names models apart)")
    caption.add_argument("-r", "--recursive", action="store_true", help="search folders recursively")
    caption.add_argument("--follow-symlinks", action="store_true",
                         help="with -r, search symlinked folders too (each real folder once); without it they are "
                              "skipped with a warning")
    caption.add_argument("--image-column", help="the image column of a table or dataset input")
    caption.add_argument("--prompt", action=_PerModel, help=f"instruction for the model (default: {DEFAULT_PROMPT!r})")
    caption.add_argument("--prompt-file", action=_PerModel, help="read the prompt from a file")
    caption.add_argument("--max-new-tokens", action=_PerModel, type=int, metavar="N",
                         help="longest caption, in tokens (default 64)")
    caption.add_argument("--batch-size", action=_PerModel, type=_batch_size, metavar="N|auto",
                         help="images per model batch (default auto: from free GPU memory on CUDA, 8 on the CPU)")
    caption.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    caption.add_argument("--gpus", help="all | 0,1,...: a replica of each model per GPU (a model too large for one "
                                        "GPU is split across several)")
    caption.add_argument("--replicas", type=int, help="workers per model captioning side by side (CPU workers with --device cpu)")
    caption.add_argument("--vram-budget", type=option(budget_option),
                         help="what vlmux may use of each GPU: 0.8 of it, 80%%, or 40GiB (a bare number is a fraction)")
    caption.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                         help="run on a Ray cluster with Ray Data (pip install 'vlmux[ray]'); without ADDRESS, the "
                              "cluster RAY_ADDRESS or `ray start` names, else a local one")
    caption.add_argument("--dtype", action=_PerModel, choices=DTYPES,
                         help="weight precision (default auto: bfloat16 where the GPU has it, float16 on older GPUs, "
                              "float32 on the CPU)")
    caption.add_argument("--decode", action=_PerModel, choices=DECODE_MODES,
                         help=f"auto (on a GPU: engine where it runs the model, from {ENGINE_MIN_IMAGES} images; else "
                              f"compiled from {COMPILE_MIN_IMAGES}; else dynamic) | dynamic | static | compiled (static KV cache and CUDA graphs; "
                              "compiles once per worker) | engine (vlmux's own runner, Qwen2-VL family)")
    caption.add_argument("--quantize", action=_PerModel, choices=QUANTIZE_METHODS,
                         help="quantise a 16-bit checkpoint on load: 4bit | 8bit (bitsandbytes), fp8 (fine-grained, a "
                              "Hopper GPU), torchao-int4 | torchao-int8 | torchao-fp8 (pip install 'vlmux[bnb]' or 'vlmux[torchao]'); "
                              "pre-quantised checkpoints (AWQ, GPTQ, ...) need none")
    caption.add_argument("--trust-remote-code", action="store_true",
                         help="run the model folder's own Python code (InternVL2, Florence-2 hub checkpoints, ...)")
    caption.add_argument("--prep-processes", type=int, metavar="N",
                         help="processes decoding and preprocessing images beside each GPU worker (default: the "
                              "host's cores less two, at most 12; 0: the worker's own threads)")
    caption.add_argument("--prefix", default="", help="text put before each caption")
    caption.add_argument("--suffix", default="", help="text put after each caption")
    caption.add_argument("--overwrite", action="store_true", help="redo images that already have results")
    caption.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    caption.add_argument("--temperature", type=float, default=1.0, help="with --sample: higher is more varied (default 1.0)")
    caption.add_argument("--top-p", type=float, default=1.0,
                         help="with --sample: draw from the most likely tokens making up this share (default 1.0: all)")
    caption.add_argument("--seed", type=int, help="with --sample: a seed for repeatable captions")
    caption.add_argument("--max-pixels", type=_pixels, metavar="N",
                         help=f"refuse images that would decode to more pixels, a guard against decompression bombs "
                              f"(default {MAX_PIXELS}, {MAX_PIXELS / 1e6:g} MP; JPEGs count at their reduced decoding size)")
    caption.add_argument("--report", type=Path, help="write an HTML run report here (and the same numbers as .json)")
    caption.add_argument("--no-progress", action="store_true", help="no progress bars (summaries are still printed)")
    caption.set_defaults(run=_caption)

    tiny = commands.add_parser("make-tiny", help="write a tiny random model of a real architecture (offline)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--arch", default="llava", help="a transformers model_type: llava, qwen2_vl, qwen2_5_vl, qwen3_vl, "
                      "llava_onevision, idefics3, smolvlm, internvl, gemma3, florence2; internvl_chat: "
                      "InternVL2's remote-code shape, loaded with --trust-remote-code")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_make_tiny)

    demo = commands.add_parser("demo", help="build tiny models and caption the bundled sample images")
    demo.add_argument("--out", type=Path, default=Path("vlmux-demo"), help="folder for the demo's files")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(run=_demo)
    add_serve_commands(commands)
    add_review_command(commands)
    return parser


def _pixels(text: str) -> int:
    try:
        pixels = int(float(text))
    except ValueError:
        pixels = 0
    if pixels < 1:
        raise argparse.ArgumentTypeError(f"a number of pixels of at least 1 (e.g. 300000000 or 3e8), not {text!r}")
    return pixels


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1 or auto, not {text!r}")
    return int(text)


class _ModelAction(argparse.Action):
    """-m MODEL: starts a model entry that the per-model options after it fill in."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.models = [*namespace.models, {"model": value}]


class _PerModel(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        models = getattr(namespace, "models", None) or []
        if models:
            models[-1][self.dest] = value
        else:
            defaults = dict(getattr(namespace, "model_defaults", None) or {})
            defaults[self.dest] = value
            namespace.model_defaults = defaults


def _caption(args: argparse.Namespace) -> int:
    from vlmux.caption.identity import model_tags, renamed
    from vlmux.caption.job import CaptionJob, run_job, summary_line
    from vlmux.caption.plan import plans_from_file, plans_from_options
    from vlmux.caption.sinks import SidecarSink
    from vlmux.caption.sources import UsageError, collect_images
    from vlmux.hub import resolve_model
    from vlmux.pool.forks import stop_fork_server, warm_fork_server

    defaults = {"sample": args.sample, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                "prep_processes": args.prep_processes, "max_pixels": args.max_pixels,
                "trust_remote_code": args.trust_remote_code,
                **(getattr(args, "model_defaults", None) or {})}
    if args.job is not None:
        if args.models:
            raise UsageError("give the models either with -m or in --job, not both")
        plans = plans_from_file(args.job, defaults, args.device)
    elif args.models:
        _warn_settings_after_the_last_model(args.models)
        plans = plans_from_options(args.models, defaults, args.device)
    else:
        raise UsageError("name at least one model with -m MODEL (or a --job file)")
    if len({plan.spec.model for plan in plans}) != len(plans):
        raise UsageError("the same model is listed twice")
    if args.replicas is not None and args.replicas < 1:
        raise UsageError("--replicas must be at least 1")
    if args.ray is None:  # the fork server's imports (seconds) overlap the inputs' scan and the outputs' checks
        warm_fork_server()
    try:
        images = collect_images(args.inputs, args.recursive, args.image_column, args.follow_symlinks,
                                warn=lambda message: print(f"vlmux caption: {message}", file=sys.stderr))
        for plan in plans:
            resolve_model(plan.spec.model)  # fail on a misspelt model now, not after the first model's hour
        models = [plan.spec.model for plan in plans]
        for line in renamed(model_tags(models)):
            print(f"vlmux caption: {line}", file=sys.stderr)
        sinks = _sinks(args, images, models)
    except BaseException:  # nothing to caption: no server importing on for seconds after the command ends
        stop_fork_server()
        raise
    if len(plans) > 1 and not args.no_progress:
        for plan in plans:
            print(f"{plan.spec.model}: prompt {plan.generation.prompt!r}, max {plan.generation.max_new_tokens} new tokens, "
                  f"batch {plan.batch_size or 'auto'}")
    job = CaptionJob(images, plans, plans[0].generation, sinks, prefix=args.prefix, suffix=args.suffix,
                     overwrite=args.overwrite, gpus=args.gpus, replicas=args.replicas)
    # Workers size an auto batch themselves (PoolConfig.max_batch_size None); a model's fixed size rides on its requests.
    pool_config = PoolConfig(vram_budget=args.vram_budget)
    recorder = None
    if args.report is not None:
        from vlmux.caption.report import Recorder

        recorder = Recorder()
    interrupted = False
    try:
        if args.ray is not None:
            from vlmux.distributed.ray import run_ray_job

            reports = run_ray_job(job, pool_config, args.ray, progress=not args.no_progress,
                                  event=recorder.event if recorder else None)
        else:
            reports = run_job(job, pool_config, progress=not args.no_progress, event=recorder.event if recorder else None)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if not interrupted:  # results are fsynced as written, a table's in its journal: its rewrite would take seconds
            for sink in sinks:
                sink.close()
        if recorder is not None:
            recorder.stop()
    for report in reports:
        print(summary_line(report))
        for sample in report.error_samples:
            print(f"  error: {sample}")
    if recorder is not None:
        print(f"report: {recorder.write(args.report, reports)}")
    where = [str(path) for path in args.output]
    where += [f"sidecar files *.{sink.extension}" for sink in sinks if isinstance(sink, SidecarSink)]
    print(f"{len(images)} images, {len(plans)} model(s); results in {', '.join(where)}")
    return EXIT_OK


def _sinks(args: argparse.Namespace, images: list, models: list[str]) -> list:
    """The -o outputs and the sidecar files, opened only once every destination is known good and writable: a usage
    error leaves no file behind, and a read-only folder fails now, not after the captioning."""
    from vlmux.caption.destinations import check_files, check_sidecar_folders
    from vlmux.caption.outputs import is_metadata, open_output, output_kind
    from vlmux.caption.sinks import SidecarSink
    from vlmux.caption.sources import UsageError
    from vlmux.caption.tables import metadata_key

    if len(set(args.output)) != len(args.output):
        raise UsageError("the same -o file is given twice")
    if any(ref.path is None for ref in images) and (args.sidecar or not args.output):
        raise UsageError("images inside a dataset have no folder for sidecar files: write results with -o")
    for path in args.output:
        output_kind(path)
        if is_metadata(path):
            for ref in images:
                metadata_key(path, ref)  # every image must sit under the metadata file's folder
    check_files([*args.output, *([args.report] if args.report is not None else [])])
    wants_sidecars = args.sidecar is not None or not args.output
    if wants_sidecars:
        check_sidecar_folders(ref.path.parent for ref in images)
    sinks: list = []
    try:  # each sink locks its output: another job on one of them stops this one here, before any work
        if wants_sidecars:  # first: its usage errors leave no output file behind
            extension = args.sidecar or ("txt" if len(models) == 1 else "{model}.txt")
            sinks.append(SidecarSink(extension, models, lock_at=images[0].root))
        sinks += [open_output(path, models) for path in args.output]
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks[1:] + sinks[:1] if wants_sidecars else sinks


def _warn_settings_after_the_last_model(models: list[dict]) -> None:
    """A per-model setting after the last of several -m applies to that model only: say so when no other has it, since
    it was likely meant for all."""
    if len(models) < 2:
        return
    *others, last = models
    for setting in last:
        if setting != "model" and not any(setting in other for other in others):
            option = "--" + setting.replace("_", "-")
            print(f"vlmux caption: warning: {option} follows the last -m, so it applies to {last['model']} only; "
                  f"put it before the first -m to apply it to every model", file=sys.stderr)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Writing model shards" bars say nothing about a few-MB model


def _make_tiny(args: argparse.Namespace) -> int:
    from vlmux.tiny import build_tiny

    _quiet_transformers()
    path = build_tiny(args.out_dir, args.arch, args.seed)
    print(f"wrote a tiny {args.arch} model to {path}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from vlmux.demo import run_demo

    _quiet_transformers()
    return run_demo(args.out, args.device)


if __name__ == "__main__":
    sys.exit(main())
