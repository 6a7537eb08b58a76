"""Benchmark models: Qwen2-VL at the real 2B and 7B shapes with random bf16 weights (DESIGN.md section 5).

The tokenizer and processor come from vlmux's tiny Qwen2-VL (they are offline and shape-independent); the
image processor is opened up to 448x448 so the workload matches the real model's visual token count.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)
SHAPES = {
    "2b": dict(text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                         mrope_section=[16, 24, 24]), vision_out=1536),
    "7b": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                         mrope_section=[16, 24, 24]), vision_out=3584),
}
MAX_PIXELS = 448 * 448


def build_shape(out_dir: Path, shape: str, seed: int = 0) -> Path:
    """Write the Qwen2-VL `shape` ("2b" | "7b") to out_dir on the GPU, unless it is there already."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmux.tiny import build_tiny

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors.index.json").exists() or (out_dir / "model.safetensors").exists():
        return out_dir
    with tempfile.TemporaryDirectory() as scratch:
        tiny = build_tiny(Path(scratch) / "tiny", "qwen2_vl")
        out_dir.mkdir(parents=True, exist_ok=True)
        for file in tiny.iterdir():
            if not file.name.startswith("model") and file.name != "config.json":
                shutil.copy(file, out_dir / file.name)
        config = json.loads((tiny / "config.json").read_text())
    text = dict(SHAPES[shape]["text"])
    mrope = text.pop("mrope_section")
    tie = text.pop("tie_word_embeddings")
    config["text_config"].update(text, initializer_range=0.02, max_position_embeddings=32768)
    for part in ("text_config", "vision_config"):
        config[part].pop("dtype", None)
    config["text_config"].pop("layer_types", None)
    config["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}
    config["tie_word_embeddings"] = tie
    config["text_config"]["tie_word_embeddings"] = tie
    config["vision_config"].update(VISION, hidden_size=SHAPES[shape]["vision_out"], initializer_range=0.02)
    config.pop("dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    limit_pixels(out_dir, MAX_PIXELS)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out_dir), dtype=torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    return out_dir


def limit_pixels(model_dir: Path, pixels: int) -> None:
    """Set the pixel limit of the processor configs in `model_dir` (where they have one) to `pixels`."""
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"):
        path = model_dir / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for holder in [data, *[v for v in data.values() if isinstance(v, dict)]]:
            if "max_pixels" in holder:
                holder["max_pixels"] = pixels
            if isinstance(holder.get("size"), dict) and "longest_edge" in holder["size"]:
                holder["size"]["longest_edge"] = pixels
        path.write_text(json.dumps(data, indent=2))


def write_jpegs(out_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """Real JPEG files of mixed sizes, 640x480 up to 2048x1536, with noise and shapes so they compress like photos."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536), (480, 640), (1080, 1080)]
    paths = []
    for index in range(count):
        path = out_dir / f"img_{index:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        width, height = sizes[index % len(sizes)]
        noise = np.random.default_rng(seed + index).integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((width, height), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(width), rng.randrange(height)
            draw.ellipse([x, y, x + rng.randrange(40, 400), y + rng.randrange(40, 400)], fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(path, quality=90)
    return paths


if __name__ == "__main__":
    import sys

    # Run as a separate process so that the benchmark's own parent never creates a CUDA context.
    for shape in sys.argv[2:]:
        print(build_shape(Path(sys.argv[1]) / f"qwen2-vl-{shape}", shape))
