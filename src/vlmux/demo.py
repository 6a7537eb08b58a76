"""`vlmux demo`: two tiny models caption the bundled sample images, and the memory each gave back is shown."""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from vlmux.caption.job import CaptionJob, run_job, summary_line
from vlmux.caption.sinks import JsonlSink
from vlmux.caption.sources import collect_images
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.testing.tiny import build_tiny

DEMO_ARCHS = ("llava", "qwen2_vl")


def run_demo(out: Path, device: str = "auto") -> int:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for sample in resources.files("vlmux").joinpath("samples").iterdir():
        if sample.name.endswith((".png", ".jpg")):
            (images / sample.name).write_bytes(sample.read_bytes())
    models = []
    for arch in DEMO_ARCHS:
        folder = out / "models" / f"tiny-{arch}"
        if not (folder / "config.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            build_tiny(folder, arch)
        models.append(ModelSpec(str(folder), device))
    print(f"built {len(models)} tiny models (random weights, so the captions are noise) in {out / 'models'}")

    results = out / "captions.jsonl"
    sink = JsonlSink(results)
    refs = collect_images([str(images)])
    job = CaptionJob(refs, models, GenerationSpec("Describe the image.", max_new_tokens=12), [sink], batch_size=4, overwrite=True)
    try:
        reports = run_job(job, PoolConfig(max_batch_size=4))
    finally:
        sink.close()
    for line in results.read_text().splitlines()[:4]:
        record = json.loads(line)
        print(f"  {record['file']} [{Path(record['model']).name}]: {record['caption']!r}")
    for report in reports:
        print(summary_line(report))
    print(f"{len(refs)} images x {len(models)} models -> {results}")
    return 0
