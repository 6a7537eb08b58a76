"""Caption jobs on a Ray cluster through Ray Data: the missing (image, model) pairs become a dataset, `map_batches`
runs them through an actor pool in which each actor hosts a vlmux ModelPool and so a vlmux worker (the actor, like
the CLI's parent, never imports torch), and the driver writes what comes back through the job's own sinks.

Models run in turn: one model's dataset is consumed to its end, and its actors report their workers' verified
release, before the next model's actors start.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlmux.pool import vram
from vlmux.caption.job import CaptionJob, Event, ModelReport, record, results_or_halves, run_models
from vlmux.caption.plan import ModelPlan, render_prompt
from vlmux.caption.sinks import model_tag, written
from vlmux.caption.sources import ImageRef, UsageError
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.protocol import Captions

MAX_BLOCKS = 10_000
# Images per block and per actor batch with batch_size auto: Ray needs the number before any worker has picked its own.
RAY_BATCH_SIZE = 8
RELEASE_WAIT = 60.0  # seconds the driver waits for a model's actors to report their workers gone


@dataclass(frozen=True)
class Columns:
    image: str  # a path, image bytes, an HxWxC array (ray.data.read_images) or {"bytes", "path"}
    prompt: str | None  # one prompt per row; None: the generation's prompt for every row
    caption: str
    error: str
    tokens: str | None = None  # new tokens per batch, on its first row (the CLI's report uses them)


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--ray needs Ray Data: pip install 'vlmux[ray]'") from None
    return ray


def connect(address: str | None = None) -> None:
    """Join the cluster at `address`; "auto" or None: RAY_ADDRESS, else a cluster `ray start` runs here, else a new
    local one. A session that is already connected stays as it is."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # vlmux does not report usage on its users' behalf
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "auto") else address, logging_level="WARNING")


class ReleaseBook:
    """A Ray actor that the captioning actors tell when their worker is up and when its memory is back, so the
    driver knows when a model is gone from the whole cluster."""

    def __init__(self) -> None:
        self.live: dict[str, str] = {}
        self.releases: list[vram.Release] = []

    def loaded(self, token: str, model: str) -> None:
        self.live[token] = model

    def released(self, token: str, release: vram.Release) -> None:
        self.live.pop(token, None)
        self.releases.append(release)

    def state(self) -> tuple[list[str], list[vram.Release]]:
        return list(self.live), list(self.releases)


class Captioner:
    """The map_batches actor: one vlmux worker (placed on the GPU Ray gave this actor, or the CPU) for one model."""

    def __init__(self, spec: ModelSpec, generation: GenerationSpec, batch_size: int, columns: Columns,
                 pool_config: PoolConfig, book: Any = None) -> None:
        from vlmux.pool import ModelPool

        self.generation, self.batch_size, self.columns, self.book = generation, batch_size, columns, book
        self.token = f"{socket.gethostname()}:{os.getpid()}"
        self.pool = ModelPool(replace(pool_config, max_batch_size=batch_size, spare_worker=False, keep_alive=None))
        self.name = self.pool.load(spec)
        if book is not None:
            _ray().get(book.loaded.remote(self.token, spec.model))

    def __call__(self, table):
        """Arrow in, Arrow out: the caller's columns pass through untouched, and ours are typed (an all-None column
        would otherwise come back to the next stage as NaN)."""
        import pyarrow as pa
        from ray.data.block import BlockAccessor

        columns = self.columns
        wanted = [columns.image] + ([columns.prompt] if columns.prompt else [])
        cells = BlockAccessor.for_block(table.select(wanted)).to_batch_format("numpy")
        items = [_image(value) for value in cells[columns.image]]
        prompts = [str(p) for p in cells[columns.prompt]] if columns.prompt else [self.generation.prompt] * len(items)
        pairs = list(zip(items, prompts))

        def submit(part: list) -> Any:
            return self.pool.submit_caption(self.name, [i for i, _ in part], [p for _, p in part], self.generation,
                                            self.batch_size)

        captions: Captions = results_or_halves(submit, pairs, submit(pairs))
        texts = [None if r.caption is None else written(r.caption) for r in captions.results]  # as every output
        table = table.append_column(columns.caption, pa.array(texts, pa.string()))
        table = table.append_column(columns.error, pa.array([r.error for r in captions.results], pa.string()))
        if columns.tokens:
            table = table.append_column(columns.tokens, pa.array([captions.tokens] + [0] * (len(items) - 1), pa.int64()))
        return table

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is None:
            return
        pool.close()  # stops the worker and waits for NVML to show its memory back
        release = pool.last_release.get(self.name)
        if self.book is not None and release is not None:
            try:
                _ray().get(self.book.released.remote(self.token, release), timeout=10)
            except Exception:  # noqa: BLE001 - the driver may be gone; the worker is stopped either way
                pass


def caption_dataset(ds, models: Sequence[str | ModelSpec | ModelPlan], image_column: str = "image",
                    prompt_column: str | None = None, generation: GenerationSpec = GenerationSpec(),
                    batch_size: int = 8, replicas: int | None = None, device: str = "auto",
                    pool_config: PoolConfig = PoolConfig()):
    """Caption a Ray Dataset with each model in turn; returns it materialised with `caption_<model>` and
    `error_<model>` columns (model named as its folder or hub id's last part). Each model's actors are gone, their
    memory verified back, before the next model's start. `replicas`: actors per model (default: one per GPU in
    the cluster, or one on a cluster without GPUs)."""
    connect(None)
    plans = [_plan(model, generation, batch_size, device) for model in models]
    tags = [model_tag(plan.spec.model) for plan in plans]
    if len(set(tags)) != len(tags):
        raise ValueError(f"two models share a column name: {tags}")
    for plan, tag in zip(plans, tags):
        columns = Columns(image_column, prompt_column, f"caption_{tag}", f"error_{tag}")
        book = _new_book()
        ds = _stage(ds, plan, columns, replicas, pool_config, book).materialize()
        _wait_released(book)
    return ds


def run_ray_job(job: CaptionJob, pool_config: PoolConfig, address: str | None, progress: bool = True,
                event: Event | None = None) -> list[ModelReport]:
    """The CLI's --ray: the same job, sinks and resume rules as run_job, with the captioning on a Ray cluster."""
    if job.gpus is not None:
        raise UsageError("--gpus picks GPUs of this host; with --ray, Ray gives each actor a GPU: use --replicas")
    ray = require_ray()
    connect(address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own bar counts what reached the sinks
    return run_models(job, _RaySteps(job, pool_config), progress, event)


class _RaySteps:
    """run_ray_job's steps: a model's actors start as its dataset is consumed, and its release is waited for only
    once the dataset is done."""

    loads_first = False  # caption_seconds includes actor start-up and model load
    releases_after_failure = False

    def __init__(self, job: CaptionJob, pool_config: PoolConfig) -> None:
        self.job, self.pool_config = job, pool_config

    def prepare(self, plan: ModelPlan, todo: list[ImageRef]) -> ModelPlan:
        return plan

    def load(self, plan: ModelPlan, todo: list[ImageRef]) -> int:
        """The model's stage, lazy: nothing starts until caption reads from it."""
        self.by_key = {ref.key: ref for ref in todo}
        payloads = [ref.payload() for ref in todo]
        if len({type(p) for p in payloads}) > 1:  # a folder and a dataset in one job: one column type for Arrow
            payloads = [Path(p).read_bytes() if isinstance(p, str) else p for p in payloads]
        rows = [{"file": ref.key, "image": payload, "prompt": render_prompt(plan.generation.prompt, ref)}
                for ref, payload in zip(todo, payloads)]
        columns = Columns("image", "prompt", "caption", "error", "tokens")
        self.book = _new_book()
        # A block per batch, up to a limit: the driver writes each block as it comes back, so a killed driver
        # loses at most the blocks in flight.
        blocks = min(MAX_BLOCKS, -(-len(rows) // _batch_size(plan)))
        self.stage = _stage(_ray().data.from_items(rows, override_num_blocks=blocks), plan, columns, self.job.replicas,
                            self.pool_config, self.book)
        return _concurrency(plan, self.job.replicas)

    def caption(self, plan: ModelPlan, todo: list[ImageRef], report: ModelReport, bar: tqdm) -> None:
        for batch in self.stage.iter_batches(batch_size=None, batch_format="numpy"):
            refs = [self.by_key[str(key)] for key in batch["file"]]
            results = [_item(caption, error) for caption, error in zip(batch["caption"], batch["error"])]
            record(self.job, plan, report, refs, Captions(results, 0.0, 0, int(batch["tokens"].sum())))
            bar.update(len(refs))

    def release(self, plan: ModelPlan) -> vram.Release | None:
        return _wait_released(self.book)


def _batch_size(plan: ModelPlan) -> int:
    return plan.batch_size or RAY_BATCH_SIZE


def _stage(ds, plan: ModelPlan, columns: Columns, replicas: int | None, pool_config: PoolConfig, book):
    gpus = _use_gpus(plan)
    spec = plan.spec if gpus else replace(plan.spec, device="cpu")  # Ray hides every GPU from a CPU actor
    return ds.map_batches(
        Captioner, batch_size=_batch_size(plan), batch_format="pyarrow",
        compute=_ray().data.ActorPoolStrategy(size=_concurrency(plan, replicas)), num_gpus=1 if gpus else 0, num_cpus=1,
        fn_constructor_kwargs=dict(spec=spec, generation=plan.generation, batch_size=_batch_size(plan),
                                   columns=columns, pool_config=pool_config, book=book),
    )


def _use_gpus(plan: ModelPlan) -> bool:
    cluster_gpus = _ray().cluster_resources().get("GPU", 0)
    if plan.spec.device.startswith("cuda") and not cluster_gpus:
        raise UsageError(f"--device {plan.spec.device}, but the Ray cluster has no GPUs")
    return plan.spec.device != "cpu" and cluster_gpus > 0


def _concurrency(plan: ModelPlan, replicas: int | None) -> int:
    if replicas is not None:
        return replicas
    return int(_ray().cluster_resources().get("GPU", 0)) if _use_gpus(plan) else 1


def _new_book():
    return _ray().remote(num_cpus=0)(ReleaseBook).remote()


def _wait_released(book) -> vram.Release | None:
    """The model's actors exit once its dataset is consumed; wait until each has said its worker is gone."""
    ray = _ray()
    deadline = time.monotonic() + RELEASE_WAIT
    live, releases = ray.get(book.state.remote())
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live, releases = ray.get(book.state.remote())
    ray.kill(book)
    if live:
        print(f"vlmux: {len(live)} Ray actor(s) did not report their release within {RELEASE_WAIT:.0f} s: "
              f"{', '.join(live)}", file=sys.stderr)
    return vram.combined(releases) if releases else None


def _plan(model: str | ModelSpec | ModelPlan, generation: GenerationSpec, batch_size: int, device: str) -> ModelPlan:
    if isinstance(model, ModelPlan):
        return model
    spec = model if isinstance(model, ModelSpec) else ModelSpec(str(model), device=device)
    return ModelPlan(spec, generation, batch_size)


def _image(value: Any) -> str | bytes | Any:
    """A dataset cell as the worker takes it: path, bytes or a PIL image."""
    import numpy as np

    if isinstance(value, dict):
        return value.get("bytes") or value["path"]
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        from PIL import Image

        return Image.fromarray(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return str(value)


def _item(caption: Any, error: Any):
    from vlmux.protocol import ItemResult

    return ItemResult(_text(caption), _text(error))


def _text(value: Any) -> str | None:
    # A column whose values are all None comes back through Arrow as NaN.
    return value if isinstance(value, str) else None


def _ray():
    import ray

    return ray
