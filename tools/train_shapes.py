"""Train the bundled `vlmux/shapes` captioner: a small Qwen2-VL that captions the shapes grammar.

    python tools/train_shapes.py --device cuda --batch 128 --workers 14 --minutes 6.5 --log curve.json
    python tools/train_shapes.py --device cpu --workers 1 --minutes 2 --out /tmp/shapes   # a quick look

Everything is built offline: a word-level tokenizer over the grammar's words, Qwen2-VL's own processor
classes, a model from a small config, and AdamW with teacher forcing on freshly drawn pictures (loss on the
caption tokens only, plus training-only probes on the visual tokens). Data workers draw, JPEG round-trip and
preprocess whole batches; batch i is drawn from its own seed, so the picture stream is the same for any
number of workers. Every --eval-every steps the model captions a held-out set greedily and the best weights
so far are written to --out in their shipped form; --minutes caps the wall-clock time (the learning-rate
schedule then follows the clock, so it always ends low).

Reproducibility: on the CPU with --steps and no --minutes (and --replay 0) the same seed gives the same
weights. On a GPU it does not: CUDA kernels (atomics in backward passes), the clock-driven schedule and
stop, and --replay (reusing a recent batch while the workers are behind, which depends on timing) all vary
from run to run; the data stream, initialisation and code path are the same.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import io
import math
import os
import queue
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin,
)

from vlmux.config import DEFAULT_PROMPT  # noqa: E402
from vlmux.images import load_image  # noqa: E402
from vlmux import shapes  # noqa: E402
from vlmux.tiny import QWEN2_VL_SPECIALS, TextDims, VisionDims, qwen2_vl_parts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "vlmux" / "models" / "shapes"
# 4.4 M parameters: float16 on disk (8.8 MB) and still over 30 images/s on two CPU cores, where the
# generate loop, not the width, sets the pace.
TEXT = TextDims(hidden=192, intermediate=768, layers=4, heads=4, kv_heads=2, init_range=0.02)
VISION = VisionDims(hidden=192, intermediate=384, layers=4, heads=4, init_range=0.02)
# About 100 visual tokens (28 x 28 px each) for every canvas: big canvases shrink to it and small ones grow
# to it. Even a 1024 x 64 canvas keeps 3 token rows (84 px), so its smallest shape (8 px) stays 10 px wide;
# at 64 tokens it would get one row and 3.5 px.
PIXELS = 100 * 28 * 28
# mrope gives the width the lowest rotary frequencies; at Qwen2-VL's 1e6 and a small head they turn less
# than a hundredth of a radian across a whole picture, so the language model could not tell left from right.
ROPE_THETA = 100.0
# One shape is learnt long before the relation between two, so training shows two shapes more often.
TWO_SHAPES = 0.7
HELD_OUT_SEED = 1_000_003  # the held-out set; training draws from seed and the eval tool from its own seed
PROMPTS = (DEFAULT_PROMPT, "Describe the image.", "What is in this picture?", "Caption this image.",
           "Describe the shapes in this picture.", "What do you see?", "")
# The chat template's words and the prompts' words; anything else reads as <unk>.
PROMPT_WORDS = ("system", "you", "are", "helpful", "assistant", "user", "describe", "this", "image", "in", "one",
                "sentence", "the", "what", "is", "picture", "caption", "shapes", "do", "see", ".", "?", ",")


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    device: str = "cpu"
    steps: int = 100_000  # an upper bound; --minutes usually ends the run first
    minutes: float = 0.0  # wall-clock cap on the training loop, 0 for none
    batch: int = 16
    workers: int = 0  # data worker processes (0: draw in the training process)
    lr: float = 1.5e-3
    warmup: int = 200
    weight_decay: float = 0.01
    eval_every: int = 250
    eval_count: int = 300
    target: float = 1.0  # stop early once the held-out set is captioned this well
    probe_weight: float = 0.5
    replay: int = 0  # at most this many reuses of a recent batch per fresh one, only while workers lag
    bf16: bool = False  # autocast on CUDA; off by default since the data workers, not the GPU, set the pace


# --- building ------------------------------------------------------------------------------------


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", *dict.fromkeys([*shapes.WORDS, *PROMPT_WORDS])]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # no decoder: decode() joins the words with spaces
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN2_VL_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, unk_token="<unk>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build(seed: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model and the processor as it loads back from disk (the same code path as inference)."""
    config, processor, generation = qwen2_vl_parts(word_tokenizer(), TEXT, VISION, PIXELS, PIXELS,
                                                   rope_theta=ROPE_THETA)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = generation
    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


# --- data ----------------------------------------------------------------------------------------


def prompt_text(processor: ProcessorMixin, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def as_seen(image: Image.Image, rng: random.Random) -> Image.Image:
    """The picture as the worker decodes it from a PNG or JPEG file (draws from rng like shapes.encode).

    PNG is lossless, so its round trip is skipped: it returns the same pixels and costs more than drawing.
    """
    if rng.random() < 0.5:
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(*shapes.JPEG_QUALITY))
    return load_image(buffer.getvalue())


def scene_picture(rng: random.Random, two_shapes: float | None = None) -> tuple[Image.Image, shapes.Scene]:
    """two_shapes: the share of pictures with two shapes (None: the grammar's own half)."""
    count = None if two_shapes is None else 1 + (rng.random() < two_shapes)
    scene = shapes.sample_scene(rng, count=count)
    return as_seen(shapes.render(scene), rng), scene


Batch = tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]


def training_batch(processor: ProcessorMixin, rng: random.Random, size: int) -> Batch:
    """Teacher forcing: prompt + caption + <|im_end|>, right-padded, loss on the caption and <|im_end|> only."""
    pictures = [scene_picture(rng, TWO_SHAPES) for _ in range(size)]
    end = processor.tokenizer.eos_token
    texts = [prompt_text(processor, rng.choice(PROMPTS)) + scene.caption + end for _, scene in pictures]
    processor.tokenizer.padding_side = "right"
    inputs = dict(processor(text=texts, images=[[image] for image, _ in pictures], padding=True, return_tensors="pt"))
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(1)
    for row, (_, scene) in enumerate(pictures):
        answer = len(scene.caption.split()) + 1
        stop = int(lengths[row])
        labels[row, stop - answer : stop] = inputs["input_ids"][row, stop - answer : stop]
    grids = inputs["image_grid_thw"].tolist()
    targets = [token_targets(scene, h, w) for (_, scene), (_, h, w) in zip(pictures, grids)]
    return {**inputs, "labels": labels}, tuple(torch.cat(t) for t in zip(*targets))


class Batches(torch.utils.data.Dataset):
    """Batch i is drawn from its own seed: the same stream whatever the number of workers."""

    def __init__(self, processor: ProcessorMixin, seed: int, size: int, count: int) -> None:
        self.processor, self.seed, self.size, self.count = processor, seed, size, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Batch:
        return training_batch(self.processor, random.Random(self.seed * 1_000_000_007 + index), self.size)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def batch_loader(s: Settings, processor: ProcessorMixin) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        Batches(processor, s.seed, s.batch, s.steps), batch_size=None, shuffle=False, num_workers=s.workers,
        worker_init_fn=_one_thread, pin_memory=s.device.startswith("cuda"),
        prefetch_factor=4 if s.workers else None, persistent_workers=False,
    )


class Feed:
    """Fresh batches from a background thread; while none is ready, up to `replay` reuses of a recent one."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: str, replay: int, seed: int) -> None:
        self.device, self.replay, self.rng = device, replay, random.Random(seed)
        self.recent: collections.deque[Batch] = collections.deque(maxlen=16)
        self.since_fresh, self.fresh, self.reused = 0, 0, 0
        self.queue: queue.Queue[Batch | None] = queue.Queue(maxsize=8)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, args=(loader,), daemon=True, name="batches")
        self.thread.start()

    def close(self) -> None:
        """Stops the pump; its loader's workers are shut down as the loader goes out of scope."""
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass

    def _pump(self, loader: torch.utils.data.DataLoader) -> None:
        for batch in loader:
            while not self.stop.is_set():
                try:
                    self.queue.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if self.stop.is_set():
                return
        self.queue.put(None)

    def next(self) -> Batch | None:
        try:
            batch = self.queue.get_nowait()
        except queue.Empty:
            if self.recent and self.since_fresh < self.replay:
                self.since_fresh += 1
                self.reused += 1
                return self.rng.choice(self.recent)
            batch = self.queue.get()
        if batch is None:
            return None
        inputs, targets = batch
        batch = ({k: v.to(self.device, non_blocking=True) for k, v in inputs.items()},
                 tuple(t.to(self.device, non_blocking=True) for t in targets))
        if self.replay:
            self.recent.append(batch)
        self.since_fresh, self.fresh = 0, self.fresh + 1
        return batch


# --- auxiliary supervision of the visual tokens -------------------------------------------------
# Training only: linear probes on each visual token learn what the caption needs from it. The vision tower
# (its merged output, what the language model reads) learns the colour and kind of the shape under the token
# and where the other shape lies; the language model's middle layer learns the shape's size, which needs the
# canvas's extent and only the language model's positions know that. The caption alone gives one word per
# shape; a from-scratch tower otherwise takes far longer to learn the relation. Probes are not saved.

_TOKEN = 28  # pixels per visual token side: patch 14, merged 2 x 2
_MIN_COVER = 16  # pixels of a shape inside a token for the token to count as showing it
# Where the other shape is, as the caption's relation sees it: 1 no other shape, 2 right, 3 left, 4 below, 5 above.
_ALONE, _RIGHT, _LEFT, _BELOW, _ABOVE = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Targets:
    color: torch.Tensor  # per visual token: 0 background, 1 + index in shapes.COLORS
    kind: torch.Tensor  # 0 background, 1 + index in shapes.KINDS
    other: torch.Tensor  # 0 background, else _ALONE.._ABOVE
    size: torch.Tensor  # 0 background, 1 small, 2 large
    # From the token to its shape's centre and from that centre to the other shape's (zero when alone), in
    # units of 8 tokens: regressing where things are trains the geometry faster than the classes alone.
    offsets: torch.Tensor


def token_targets(scene: shapes.Scene, grid_h: int, grid_w: int) -> tuple[torch.Tensor, ...]:
    """Targets for one picture's visual tokens, in the processor's order (row-major over 2 x 2 patch blocks)."""
    mask = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask)
    for index, shape in enumerate(scene.shapes, start=1):
        shapes.draw_shape(draw, shape, index)
    mask = mask.resize((grid_w * 14, grid_h * 14), Image.NEAREST)
    blocks = torch.from_numpy(np.asarray(mask).copy()).view(grid_h // 2, _TOKEN, grid_w // 2, _TOKEN)
    cover = torch.stack([(blocks == i).sum((1, 3)) for i in range(1, len(scene.shapes) + 1)]).flatten(1)
    best, which = cover.max(0)
    per_shape = torch.tensor([
        [1 + list(shapes.COLORS).index(s.color), 1 + shapes.KINDS.index(s.kind), _other(s, scene), 1 + s.large]
        for s in scene.shapes
    ])
    shown = best >= _MIN_COVER
    classes = tuple(torch.where(shown, per_shape[which, column], 0) for column in range(4))
    scale = torch.tensor([grid_w * 14 / scene.width, grid_h * 14 / scene.height]) / (8 * _TOKEN)
    centres = torch.tensor([s.centre for s in scene.shapes]) * scale
    rows, columns = torch.meshgrid(torch.arange(grid_h // 2), torch.arange(grid_w // 2), indexing="ij")
    tokens = (torch.stack([columns, rows], -1).flatten(0, 1) + 0.5) / 8
    other = centres.flip(0) - centres if len(scene.shapes) == 2 else torch.zeros_like(centres)
    offsets = torch.cat([centres[which] - tokens, other[which]], -1)
    return (*classes, torch.where(shown[:, None], offsets, torch.nan))


def _other(shape: shapes.Shape, scene: shapes.Scene) -> int:
    others = [s for s in scene.shapes if s is not shape]
    if not others:
        return _ALONE
    (x, y), (ox, oy) = shape.centre, others[0].centre
    if abs(ox - x) > abs(oy - y):
        return _RIGHT if ox > x else _LEFT
    return _BELOW if oy > y else _ABOVE


class Probe(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.color = torch.nn.Linear(hidden, 1 + len(shapes.COLORS))
        self.kind = torch.nn.Linear(hidden, 1 + len(shapes.KINDS))
        self.other = torch.nn.Linear(hidden, 6)
        self.size = torch.nn.Linear(hidden, 3)
        self.offsets = torch.nn.Linear(hidden, 4)

    def loss(self, visual: torch.Tensor, text: torch.Tensor, targets: Targets) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy
        return (ce(self.color(visual), targets.color) + ce(self.kind(visual), targets.kind)
                + ce(self.other(visual), targets.other) + ce(self.size(text), targets.size)
                + _masked_mse(self.offsets(visual), targets.offsets))


def _masked_mse(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    shown = ~target.isnan()
    return ((predicted - target.nan_to_num()) ** 2 * shown).sum() / shown.sum().clamp(min=1)


# --- judging -------------------------------------------------------------------------------------


class HeldOut:
    """Pictures from a seed training never draws, preprocessed once and kept on the device."""

    def __init__(self, processor: ProcessorMixin, count: int, device: str, batch: int = 100) -> None:
        rng = random.Random(HELD_OUT_SEED)
        pictures = []
        for _ in range(count):
            scene = shapes.sample_scene(rng)
            data, _ = shapes.encode(shapes.render(scene), rng)
            pictures.append((load_image(data), scene.caption))
        self.captions = [caption for _, caption in pictures]
        processor.tokenizer.padding_side = "left"
        text = prompt_text(processor, DEFAULT_PROMPT)
        self.inputs = []
        for start in range(0, count, batch):
            chunk = [[image] for image, _ in pictures[start : start + batch]]
            inputs = processor(text=[text] * len(chunk), images=chunk, padding=True, return_tensors="pt")
            self.inputs.append({k: v.to(device) for k, v in inputs.items()})
        self.tokenizer = processor.tokenizer

    @torch.inference_mode()
    def accuracy(self, model: PreTrainedModel) -> tuple[float, list[tuple[str, str]]]:
        model.eval()
        got = []
        for inputs in self.inputs:
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            got += [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        wrong = [(want, caption) for want, caption in zip(self.captions, got) if caption != want]
        return 1 - len(wrong) / len(self.captions), wrong


# --- training ------------------------------------------------------------------------------------


def learning_rate(step: int, progress: float, s: Settings) -> float:
    """Linear warm-up, then a cosine down to 5 % over `progress` (0..1, steps or clock, whichever is further)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save(model: PreTrainedModel, processor: ProcessorMixin, out: Path) -> None:
    """float32 while that fits the 10 MB the package allows, else float16 (inference still runs in float32)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()
    dtype = torch.float32 if sum(p.numel() for p in model.parameters()) * 4 <= 9 * 2**20 else torch.float16
    copy.deepcopy(model).to("cpu", dtype).save_pretrained(out)
    processor.save_pretrained(out)


def optimizer_for(model: PreTrainedModel, probe: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    named = [*model.named_parameters(), *probe.named_parameters()]
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.98),
                             fused=s.device.startswith("cuda"))


def train(s: Settings, out: Path, log: Path | None) -> float:
    cuda = s.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # leaves the cores to the data workers; one thread also keeps runs identical
        torch.use_deterministic_algorithms(True)
    model, processor = build(s.seed)
    model.to(s.device)
    probe = Probe(TEXT.hidden).to(s.device)
    visual: list[torch.Tensor] = []
    model.model.visual.merger.register_forward_hook(lambda _m, _i, output: visual.append(output))
    optimizer = optimizer_for(model, probe, s)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f} M parameters; batches of {s.batch}, {s.workers} data workers, {s.device}, "
          f"cap {s.minutes or '-'} min / {s.steps} steps", flush=True)
    held_out = HeldOut(processor, s.eval_count, s.device)
    feed = Feed(batch_loader(s, processor), s.device, s.replay, s.seed)
    curve: list[dict] = []
    best, best_step, step, start, running = -1.0, 0, 0, time.perf_counter(), None
    cap = s.minutes * 60

    def judge() -> bool:
        nonlocal best, best_step
        score, wrong = held_out.accuracy(model)
        elapsed = time.perf_counter() - start
        print(f"step {step} {elapsed:.0f}s held-out {score:.3f} e.g. {wrong[:2]}", flush=True)
        curve.append({"step": step, "seconds": round(elapsed, 1), "held_out": score,
                      "fresh_batches": feed.fresh, "reused_batches": feed.reused})
        if score > best:
            best, best_step = score, step
            save(model, processor, out)
        if log is not None:
            log.write_text(json.dumps({"settings": asdict(s), "parameters": params, "best": best,
                                       "best_step": best_step, "curve": curve}, indent=1) + "\n")
        return score >= s.target

    while step < s.steps:
        elapsed = time.perf_counter() - start
        if cap and elapsed >= cap:
            break
        batch = feed.next()
        if batch is None:
            break
        inputs, targets = batch
        progress = max(step / s.steps, elapsed / cap if cap else 0.0)
        lr = learning_rate(step, progress, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        visual.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and s.bf16):
            output = model(**inputs, output_hidden_states=True)
            middle = output.hidden_states[TEXT.layers // 2][inputs["input_ids"] == model.config.image_token_id]
            probe_loss = probe.loss(visual[0].float(), middle.float(), Targets(*targets))
        loss = output.loss + s.probe_weight * probe_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses = torch.stack([output.loss, probe_loss]).detach()
        running = losses if running is None else 0.98 * running + 0.02 * losses
        if step % 50 == 0:
            print(f"step {step} loss {running[0]:.4f} probe {running[1]:.3f} lr {lr:.2e} "
                  f"{time.perf_counter() - start:.0f}s fresh {feed.fresh} reused {feed.reused}", flush=True)
            curve.append({"step": step, "seconds": round(time.perf_counter() - start, 1),
                          "loss": round(float(running[0]), 5), "probe": round(float(running[1]), 4), "lr": lr})
        if step % s.eval_every == 0 and judge():
            break
    feed.close()
    if not curve or "held_out" not in curve[-1] or curve[-1]["step"] != step:
        judge()
    print(f"best held-out {best:.3f} at step {best_step} of {step} in {time.perf_counter() - start:.0f}s "
          f"({feed.fresh * s.batch} fresh pictures, {feed.reused} reused batches) -> {out}", flush=True)
    return best


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--log", type=Path, default=None, help="write the training curve here as JSON")
    parser.add_argument("--device", default=defaults.device)
    for name in ("seed", "steps", "batch", "workers", "warmup", "eval_every", "eval_count", "replay"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("minutes", "lr", "weight_decay", "target", "probe_weight"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--bf16", action="store_true")
    args = vars(parser.parse_args(argv))
    out, log = args.pop("out"), args.pop("log")
    train(Settings(**args), out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
