"""The `vlmux` command: caption, make-tiny, demo."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmux.config import DEFAULT_PROMPT, DTYPES, GenerationSpec, ModelSpec, PoolConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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
        return 130
    except (RuntimeError, OSError) as e:
        print(f"vlmux {args.command}: failed: {e}", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmux", description="Caption images with many vision-language models, VRAM given back between them.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    caption = commands.add_parser("caption", help="caption images with one or more models in turn")
    caption.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    caption.add_argument("-m", "--model", action="append", required=True, dest="models", help="hub id or local folder; repeat for several")
    caption.add_argument("-o", "--output", type=Path, action="append", default=[], help="results file: .jsonl, .csv, .parquet, metadata.jsonl or metadata.csv (repeatable)")
    caption.add_argument("--sidecar", metavar="EXT", help="write IMAGE.EXT beside each image ({model} names models apart)")
    caption.add_argument("-r", "--recursive", action="store_true", help="search folders recursively")
    caption.add_argument("--prompt", help=f"instruction for the model (default: {DEFAULT_PROMPT!r})")
    caption.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    caption.add_argument("--max-new-tokens", type=int, default=64)
    caption.add_argument("--batch-size", type=int, default=8)
    caption.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    caption.add_argument("--dtype", default="auto", choices=DTYPES)
    caption.add_argument("--prefix", default="", help="text put before each caption")
    caption.add_argument("--suffix", default="", help="text put after each caption")
    caption.add_argument("--overwrite", action="store_true", help="redo images that already have results")
    caption.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    caption.add_argument("--temperature", type=float, default=1.0)
    caption.add_argument("--top-p", type=float, default=1.0)
    caption.add_argument("--seed", type=int)
    caption.add_argument("--no-progress", action="store_true")
    caption.set_defaults(run=_caption)

    tiny = commands.add_parser("make-tiny", help="write a tiny random model of a real architecture (offline)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--arch", default="llava", help="llava | qwen2_vl | idefics3")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_make_tiny)

    demo = commands.add_parser("demo", help="build tiny models and caption the bundled sample images")
    demo.add_argument("--out", type=Path, default=Path("vlmux-demo"), help="folder for the demo's files")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(run=_demo)
    return parser


def _caption(args: argparse.Namespace) -> int:
    from vlmux.caption.job import CaptionJob, run_job, summary_line
    from vlmux.caption.sinks import SidecarSink, open_output
    from vlmux.caption.tables import MetadataSink
    from vlmux.caption.sources import UsageError, collect_images
    from vlmux.hub import resolve_model

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be at least 1")
    prompt = args.prompt or DEFAULT_PROMPT
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise UsageError(f"{args.prompt_file}: no such prompt file")
        prompt = args.prompt_file.read_text(encoding="utf-8").strip()
    images = collect_images(args.inputs, args.recursive)
    specs = [ModelSpec(model, args.device, args.dtype) for model in dict.fromkeys(args.models)]
    for spec in specs:
        resolve_model(spec.model)  # fail on a misspelt model now, not after the first model's hour
    if len(set(args.output)) != len(args.output):
        raise UsageError("the same -o file is given twice")
    sinks = [open_output(path) for path in args.output]
    for sink in sinks:
        if isinstance(sink, MetadataSink):
            for ref in images:
                sink.key(ref)  # every image must sit under the metadata file's folder: say so before any work
    if args.sidecar is not None or not args.output:
        default = "txt" if len(specs) == 1 else "{model}.txt"
        sinks.append(SidecarSink(args.sidecar or default, [s.model for s in specs]))
    generation = GenerationSpec(prompt, args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed)
    job = CaptionJob(images, specs, generation, sinks, args.batch_size, args.prefix, args.suffix, args.overwrite)
    try:
        reports = run_job(job, PoolConfig(max_batch_size=args.batch_size), progress=not args.no_progress)
    finally:
        for sink in sinks:
            sink.close()
    for report in reports:
        print(summary_line(report))
        for sample in report.error_samples:
            print(f"  error: {sample}")
    where = [str(path) for path in args.output]
    where += [f"sidecar files *.{sink.extension}" for sink in sinks if isinstance(sink, SidecarSink)]
    print(f"{len(images)} images, {len(specs)} model(s); results in {', '.join(where)}")
    return EXIT_OK


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Writing model shards" bars say nothing about a few-MB model


def _make_tiny(args: argparse.Namespace) -> int:
    from vlmux.testing.tiny import build_tiny

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
