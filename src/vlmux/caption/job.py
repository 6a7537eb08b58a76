"""A caption job: every image through each model in turn, the previous model's VRAM verified back in between."""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from tqdm import tqdm

from vlmux import vram
from vlmux.caption.sinks import Record, Sink
from vlmux.caption.sources import ImageRef
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.pool import ModelPool
from vlmux.worker.process import WorkerDied
from vlmux.worker.protocol import ItemResult

IN_FLIGHT = 2  # batches queued at the worker, so it never waits for the parent between batches


@dataclass(frozen=True)
class CaptionJob:
    images: list[ImageRef]
    models: list[ModelSpec]
    generation: GenerationSpec
    sinks: list[Sink]
    batch_size: int = 8
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False


@dataclass
class ModelReport:
    model: str
    captioned: int = 0
    errors: int = 0
    skipped: int = 0
    load_seconds: float = 0.0
    caption_seconds: float = 0.0
    release: vram.Release | None = None
    error_samples: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        done = self.captioned + self.errors
        return done / self.caption_seconds if self.caption_seconds else 0.0


def run_job(job: CaptionJob, pool_config: PoolConfig, progress: bool = True) -> list[ModelReport]:
    reports = []
    with ModelPool(pool_config) as pool:
        resident: tuple[str, ModelReport] | None = None  # the model still loaded from the previous turn
        for spec in job.models:
            report = ModelReport(spec.model)
            reports.append(report)
            todo = _todo(job, spec, report)
            if not todo:
                continue
            start = time.perf_counter()
            if resident is None:
                name = pool.load(spec)
            else:  # the next worker loads while the previous one's memory is returned and verified
                name, resident[1].release = pool.switch(resident[0], spec)
            report.load_seconds = time.perf_counter() - start
            resident = (name, report)
            _caption_all(job, spec, name, todo, pool, report, progress)
        if resident is not None:
            resident[1].release = pool.unload(resident[0])
    return reports


def _todo(job: CaptionJob, spec: ModelSpec, report: ModelReport) -> list[ImageRef]:
    if job.overwrite:
        for sink in job.sinks:
            sink.forget({(ref.key, spec.model) for ref in job.images})
    todo = [ref for ref in job.images if not all(sink.done(ref, spec.model) for sink in job.sinks)]
    report.skipped = len(job.images) - len(todo)
    return todo


def _caption_all(job: CaptionJob, spec: ModelSpec, name: str, todo: list[ImageRef], pool: ModelPool,
                 report: ModelReport, progress: bool) -> None:
    bar = tqdm(total=len(todo), desc=spec.model, unit="img", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        in_flight: deque = deque()
        for offset in range(0, len(todo), job.batch_size):
            refs = todo[offset : offset + job.batch_size]
            in_flight.append((refs, _submit(job, pool, name, refs)))
            if len(in_flight) >= IN_FLIGHT:
                _finish(*in_flight.popleft(), job, spec, name, pool, report, bar)
        while in_flight:
            _finish(*in_flight.popleft(), job, spec, name, pool, report, bar)
    finally:
        bar.close()
        report.caption_seconds = time.perf_counter() - start
        for sink in job.sinks:
            sink.flush()


def _submit(job: CaptionJob, pool: ModelPool, name: str, refs: list[ImageRef]) -> Future:
    prompts = [job.generation.prompt] * len(refs)
    return pool.submit_caption(name, [str(ref.path) for ref in refs], prompts, job.generation, job.batch_size)


def _results(job: CaptionJob, pool: ModelPool, name: str, refs: list[ImageRef], future: Future) -> list[ItemResult]:
    """The batch's results; if its worker died, the pool reloads the model and the batch is retried in halves,
    so an image that kills the worker ends up as its own error record and the job goes on."""
    try:
        return future.result()
    except WorkerDied as e:
        if len(refs) == 1:
            return [ItemResult(None, f"the worker died on this image: {e}")]
        half = len(refs) // 2
        return [result for part in (refs[:half], refs[half:])
                for result in _results(job, pool, name, part, _submit(job, pool, name, part))]


def _finish(refs: list[ImageRef], future: Future, job: CaptionJob, spec: ModelSpec, name: str, pool: ModelPool,
            report: ModelReport, bar: tqdm) -> None:
    pairs = []
    for ref, result in zip(refs, _results(job, pool, name, refs, future)):
        caption = None if result.caption is None else f"{job.prefix}{result.caption}{job.suffix}"
        pairs.append((ref, Record(ref.key, spec.model, caption, result.error)))
        if result.error is None:
            report.captioned += 1
        else:
            report.errors += 1
            if len(report.error_samples) < 5:
                report.error_samples.append(f"{ref.key}: {result.error}")
    for sink in job.sinks:
        sink.write(pairs)
    bar.update(len(refs))


def summary_line(report: ModelReport) -> str:
    parts = [f"{report.model}: {report.captioned} captioned", f"{report.errors} errors", f"{report.skipped} already done"]
    if report.caption_seconds:
        parts.append(f"{report.images_per_second:.1f} images/s, load {report.load_seconds:.1f} s")
    if report.release is not None:
        parts.append(str(report.release))
    return ", ".join(parts)
