"""Captioning throughput (issue 6, DESIGN.md section 5): real JPEG files of mixed sizes, 448x448 through the processor,
a 20-30 token prompt, exactly 64 new tokens (the model copy the bench runs has no eos, so nothing stops early).

Device command (one H200, ~8 minutes; the 7B shape and the detailed workload are the second and third lines):
  PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 python3 bench/throughput.py --out $OUT/throughput-2b.json --minutes 8
  PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 python3 bench/throughput.py --shape 7b --batch 128 --sweep 64,128 --out $OUT/throughput-7b.json --minutes 8
  PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 python3 bench/throughput.py --workload detailed --batch 64 --sweep 32,64 --out $OUT/throughput-detailed.json --minutes 8

Rows, each in its own process (the bench's own process never imports torch):
  hf_batch1          from_pretrained + processor + generate, one image at a time, files in (what most scripts do)
  hf_script          the same in batches of 128, files in (issue 17's plain-script anchor)
  hf_dynamic         generate with the default dynamic cache at each --sweep batch size, inputs on the GPU; best kept
  hf_static_compile  generate with cache_implementation="static" + torch.compile, batch --batch, inputs on the GPU
  vlmux_gpu          vlmux's backend (ModelSpec.decode: --decode, or a row named vlmux_gpu:compiled), prepared inputs, generate only
  vlmux_api          vlmux.pipeline over all files in one call (chunks overlapped with decoding/preprocessing), JSONL out
  vlmux_cli          `vlmux caption FOLDER -o out.jsonl --batch-size --batch` as a user runs it, wall clock included;
                     vlmux_cli:DECODE:pN also sets --prep-processes N (p0: the worker's own threads)
GPU-only rows pay their compile in a first call, reported apart (compile_seconds). Every row stops starting new
batches at its share of --minutes. CPU check with a tiny model:
  PYTHONPATH=src python3 bench/throughput.py --device cpu --model /tmp/tiny-qwen --jpegs 12 --files 24 --batch 8 --sweep 1,4,8 --new-tokens 8
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

PROMPT = ("Describe this photograph in one sentence for an image caption dataset, naming the main objects, "
          "their colours and where they are.")
WORKLOADS = {"caption": (448 * 448, 64), "detailed": (896 * 896, 256)}  # max pixels, new tokens
ROWS = ("hf_batch1", "hf_script", "hf_dynamic", "hf_static_compile", "vlmux_gpu", "vlmux_api", "vlmux_cli")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2b", help="2b | 7b: built with random weights on the GPU")
    parser.add_argument("--model", type=Path, help="a model folder instead of a built shape (a tiny one on the CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workload", choices=WORKLOADS, default="caption")
    parser.add_argument("--new-tokens", type=int, help="override the workload's new tokens")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--decode", default="auto", help="vlmux rows: auto | dynamic | static | compiled (ModelSpec.decode)")
    parser.add_argument("--batch", type=int, default=256, help="batch of the static/compiled and vlmux rows")
    parser.add_argument("--sweep", default="64,128,256", help="hf_dynamic batch sizes")
    parser.add_argument("--jpegs", type=int, default=384, help="distinct JPEG files written")
    parser.add_argument("--files", type=int, default=2048, help="files the end-to-end rows caption (links to the JPEGs)")
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole run, build included")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlmux-bench"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from throughput_rows import run_row

        result = run_row(args.child, args, PROMPT)
        args.child_out.write_text(json.dumps(result))
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    end = time.time() + args.minutes * 60
    max_pixels, new_tokens = WORKLOADS[args.workload]
    new_tokens = args.new_tokens or new_tokens
    rows = [row for row in args.rows.split(",") if row]  # a vlmux row may name its decode mode: vlmux_gpu:compiled
    unknown = {row.partition(":")[0] for row in rows} - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    start = time.perf_counter()
    source = args.model
    if source is None:
        subprocess.run([sys.executable, str(Path(__file__).parent / "shapes.py"), str(args.work), args.shape], check=True)
        source = args.work / f"qwen2-vl-{args.shape}"
    model = bench_copy(source, args.work / f"{source.name}-{args.workload}-noeos", max_pixels)
    from shapes import write_jpegs

    jpegs = write_jpegs(args.work / "jpegs", args.jpegs)
    files = link_files(jpegs, args.work / f"files-{args.files}", args.files)
    setup_seconds = time.perf_counter() - start
    result = {"benchmark": "throughput", "environment": environment(), "shape": args.shape if args.model is None else None,
              "model": str(source), "device": args.device, "workload": args.workload, "max_pixels": max_pixels,
              "new_tokens": new_tokens, "prompt": PROMPT, "jpegs": args.jpegs, "files": args.files,
              "batch": args.batch, "sweep": args.sweep, "setup_seconds": round(setup_seconds, 1), "rows": {}}
    for index, row in enumerate(rows):
        share = (end - time.time()) / (len(rows) - index)
        row_start = time.perf_counter()
        name, _, options = row.partition(":")
        decode, _, prep = options.partition(":")  # vlmux_cli:dynamic:p0 -> decode dynamic, 0 preparing processes
        row_args = argparse.Namespace(**{**vars(args), "decode": decode or args.decode,
                                         "prep_processes": int(prep[1:]) if prep.startswith("p") else None})
        try:
            if name == "vlmux_api":
                from throughput_rows import vlmux_api

                data = vlmux_api(row_args, model, files, PROMPT, new_tokens, time.time() + share * 0.8)
            elif name == "vlmux_cli":
                data = vlmux_cli(row_args, model, files, new_tokens, share)
            else:
                data = child(name, row_args, model, files, new_tokens, time.time() + share * 0.8, share)
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            data = {"error": f"{type(e).__name__}: {e}"}
        data["row_seconds"] = round(time.perf_counter() - row_start, 1)
        result["rows"][row] = data
        print(f"{row:<18} {summary(data)}", file=sys.stderr, flush=True)
        write_result("throughput", result, args.out)  # after each row: a run cut short keeps what it measured
    best_hf = max([result["rows"].get(r, {}).get("images_per_s") or 0 for r in ("hf_batch1", "hf_script", "hf_dynamic", "hf_static_compile")])
    if best_hf:
        for row, data in result["rows"].items():
            if row.startswith("vlmux") and data.get("images_per_s"):
                data["times_hf_best"] = round(data["images_per_s"] / best_hf, 2)
    write_result("throughput", result, args.out)
    for row, data in result["rows"].items():
        print(f"{row:<18} {summary(data)}")


def summary(data: dict) -> str:
    if "error" in data:
        return "error: " + data["error"].splitlines()[0][:200]
    keys = ("images_per_s", "end_to_end_images_per_s", "steady_images_per_s", "prepared_apart", "batch", "compile_seconds",
            "tokens_per_image", "times_hf_best")
    return "  ".join(f"{k}={data[k]}" for k in keys if data.get(k) is not None)


def bench_copy(source: Path, target: Path, max_pixels: int) -> Path:
    """The model with links to its weights, no eos (so exactly max_new_tokens come out of every row, the CLI's
    included), and the processor resizing every image to max_pixels (448x448: 256 visual tokens)."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        link = target / file.name
        if link.is_symlink() or link.exists():
            link.unlink()
        if file.name == "generation_config.json":
            data = json.loads(file.read_text())
            data["eos_token_id"] = None
            link.write_text(json.dumps(data, indent=2))
        elif file.name in ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json"):
            data = json.loads(file.read_text())
            for holder in [data, *[v for v in data.values() if isinstance(v, dict)]]:
                if "max_pixels" in holder:
                    holder["max_pixels"] = max_pixels
                    holder["min_pixels"] = max_pixels  # every photo becomes the workload's visual token count
                if isinstance(holder.get("size"), dict) and "longest_edge" in holder["size"]:
                    holder["size"]["longest_edge"] = max_pixels
                    holder["size"]["shortest_edge"] = max_pixels
            link.write_text(json.dumps(data, indent=2))
        else:
            link.symlink_to(file.resolve())
    if not (target / "generation_config.json").exists():
        (target / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    return target


def link_files(jpegs: list[Path], folder: Path, count: int) -> list[Path]:
    """`count` file names over the distinct JPEGs: each is still read and decoded as a file."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(count):
        path = folder / f"photo_{index:05d}.jpg"
        if not path.exists():
            path.symlink_to(jpegs[index % len(jpegs)].resolve())
        files.append(path)
    return files


def child(row: str, args: argparse.Namespace, model: Path, files: list[Path], new_tokens: int, deadline: float,
          share: float) -> dict:
    out = args.work / f"row-{row}-{args.decode}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", row, "--model", str(model), "--device", args.device,
               "--batch", str(args.batch), "--sweep", args.sweep, "--decode", args.decode, "--new-tokens", str(new_tokens),
               "--files", str(len(files)), "--work", str(args.work), "--deadline", str(deadline), "--child-out", str(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(30.0, share * 1.5))
    except subprocess.TimeoutExpired:
        return {"error": f"killed after {share * 1.5:.0f} s"}
    if done.returncode != 0 or not out.exists():
        return {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(out.read_text())


def vlmux_cli(args: argparse.Namespace, model: Path, files: list[Path], new_tokens: int, share: float) -> dict:
    output = args.work / "cli-captions.jsonl"
    report = args.work / "cli-report.html"
    output.unlink(missing_ok=True)
    command = [sys.executable, "-c", "import sys; from vlmux.cli import main; sys.exit(main())", "caption",
               str(files[0].parent), "-m", str(model), "-o", str(output), "--report", str(report),
               "--batch-size", str(args.batch), "--max-new-tokens", str(new_tokens), "--prompt", PROMPT,
               "--device", args.device, "--decode", args.decode, "--no-progress"]
    if getattr(args, "prep_processes", None) is not None:
        command += ["--prep-processes", str(args.prep_processes)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(30.0, share))
    except subprocess.TimeoutExpired:
        return {"error": f"vlmux caption did not finish {len(files)} files in {share:.0f} s (lower --files)"}
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    records = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    model_report = json.loads(report.with_suffix(".json").read_text())["models"][0]
    captioned = sum(1 for r in records if r["caption"] is not None)
    return {"images_per_s": model_report["images_per_second"], "end_to_end_images_per_s": round(captioned / wall, 2),
            "wall_seconds": round(wall, 1), "captioned": captioned, "errors": len(records) - captioned,
            "batch": args.batch, "tokens_per_image": round(model_report["tokens"] / max(1, captioned), 1),
            "load_seconds": model_report.get("load_seconds"), "batches": model_report.get("batches"),
            "prepared_apart": model_report.get("prepared_apart"),
            "steady_images_per_s": model_report.get("steady_images_per_second"),
            "input_wait_seconds": model_report.get("input_wait_seconds"), "load_timings": model_report.get("load_timings"),
            "caption_seconds": model_report.get("caption_seconds"), "note": "images_per_s: the job's report (captioning "
            "time); end_to_end: wall clock of the command, start-up and load included"}


if __name__ == "__main__":
    main()
