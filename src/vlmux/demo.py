"""`vlmux demo`: the bundled shapes captioner and a tiny random model caption the bundled sample images, one
after the other, and the memory each gave back is shown."""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from vlmux.caption.job import CaptionJob, run_job, summary_line
from vlmux.caption.sinks import JsonlSink
from vlmux.caption.sources import collect_images
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.tiny import build_tiny

SHAPES = "vlmux/shapes"
TINY_ARCH = "llava"
SAMPLE_CAPTIONS = "captions.json"  # the right caption of each sample, as drawn
SAMPLE_SEED = 504  # a seed no training or evaluation uses, giving both relations, all kinds and sizes


def write_samples(folder: Path) -> None:
    """Regenerate the bundled samples (src/vlmux/samples) from the shapes grammar."""
    from vlmux.shapes import write_dataset

    written = write_dataset(folder, 6, SAMPLE_SEED, max_side=320, stem="sample_")
    captions = {path.name: caption for path, caption in written}
    (folder / SAMPLE_CAPTIONS).write_text(json.dumps(captions, indent=1) + "\n")


def run_demo(out: Path, device: str = "auto") -> int:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    samples = resources.files("vlmux").joinpath("samples")
    for sample in samples.iterdir():
        if sample.name.endswith((".png", ".jpg")):
            (images / sample.name).write_bytes(sample.read_bytes())
    expected = json.loads(samples.joinpath(SAMPLE_CAPTIONS).read_text())
    tiny = out / "models" / f"tiny-{TINY_ARCH}"
    if not (tiny / "config.json").exists():
        shutil.rmtree(tiny, ignore_errors=True)
        build_tiny(tiny, TINY_ARCH)
    models = [ModelSpec(SHAPES, device), ModelSpec(str(tiny), device)]
    print(f"models: {SHAPES} (bundled, trained on the shapes grammar) and {tiny} (random weights: its captions are noise)")

    results = out / "captions.jsonl"
    sink = JsonlSink(results)
    refs = collect_images([str(images)])
    job = CaptionJob(refs, models, GenerationSpec("Describe the image.", max_new_tokens=16), [sink], batch_size=4,
                     overwrite=True)
    try:
        reports = run_job(job, PoolConfig(max_batch_size=4))
    finally:
        sink.close()
    records = [json.loads(line) for line in results.read_text().splitlines()]
    print(f"{SHAPES}'s captions, each against the caption its picture was drawn from ('right': the same words):")
    for record in sorted(records, key=lambda r: (r["model"] != SHAPES, r["file"])):
        if record["model"] == SHAPES:
            want = expected.get(Path(record["file"]).name)
            verdict = "right" if record["caption"] == want else f"drawn as {want!r}"
            print(f"  {Path(record['file']).name} [shapes]: {record['caption']!r} ({verdict})")
    noise = next((r for r in records if r["model"] != SHAPES), None)
    if noise is not None:
        print(f"  {Path(noise['file']).name} [{Path(noise['model']).name}]: {noise['caption']!r}")
    for report in reports:
        print(summary_line(report))
    print(f"{len(refs)} images x {len(models)} models -> {results}")
    return 0
