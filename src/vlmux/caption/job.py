"""A caption job: every image through each model in turn, the previous model's VRAM verified back in between."""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol

from tqdm import tqdm

from vlmux.pool import vram
from vlmux.caption.plan import ModelPlan, job_decode, job_prep, render_prompt
from vlmux.caption.sinks import Record, Sink
from vlmux.caption.sources import ImageRef
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.pool import ModelPool
from vlmux.pool.forks import FORK_SERVER
from vlmux.errors import WorkerDied
from vlmux.hub import ModelNotFound, resolve_model
from vlmux.protocol import Caption, Captions, ItemResult

IN_FLIGHT = 2  # requests queued at the worker, so it never waits for the parent between requests
# Model batches per worker request: the worker decodes and preprocesses batch i+1 while batch i generates, which a
# request of one batch never lets it do. Results are still written per request, so a kill loses at most the
# requests in flight.
BATCHES_PER_REQUEST = 4


@dataclass(frozen=True)
class CaptionJob:
    images: list[ImageRef]
    models: list[ModelPlan | ModelSpec]  # a bare ModelSpec runs with `generation` and `batch_size`
    generation: GenerationSpec
    sinks: list[Sink]
    batch_size: int | None = None  # None: auto, the worker picks (ModelPlan.batch_size)
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False
    gpus: str | None = None  # "all" or "0,1": replicas of each model over these GPUs
    replicas: int | None = None  # workers per model captioning side by side (default: one per GPU of `gpus`)

    def plans(self) -> list[ModelPlan]:
        return [m if isinstance(m, ModelPlan) else ModelPlan(m, self.generation, self.batch_size) for m in self.models]


@dataclass
class ModelReport:
    model: str
    captioned: int = 0
    errors: int = 0
    skipped: int = 0  # images with a result already: in every output, or copied from one to those lacking it
    copied: int = 0  # of those, images whose result was copied to outputs lacking it
    tokens: int = 0
    load_seconds: float = 0.0
    server_wait_seconds: float = 0.0  # of load_seconds, the wait for the workers' fork server to import torch and co.
    caption_seconds: float = 0.0
    unload_seconds: float = 0.0
    release: vram.Release | None = None
    workers: int = 1  # replicas that captioned side by side
    requests: int = 0  # worker requests whose results were written (a request retried in halves counts once)
    batch_share: float = 0.0  # 1 / its batch's size summed over the images: each model batch adds up to 1
    largest_batch: int = 0
    prepared_apart: int = 0  # model batches decoded and preprocessed in the worker's preparing processes
    input_wait_seconds: float = 0.0  # the workers' time waiting for decoded, preprocessed batches (GPU idle)
    load_timings: dict[str, float] = field(default_factory=dict)  # where the (first) worker's load time went
    # images/s between the first request's results and the last's: without the start-up (first batches, compiles)
    steady_images_per_second: float | None = None
    error_samples: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Captioned images per second of captioning: images that failed are not throughput."""
        return self.captioned / self.caption_seconds if self.caption_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.caption_seconds if self.caption_seconds else 0.0

    @property
    def batches(self) -> int:
        """Model batches the workers ran for this model."""
        return round(self.batch_share)


Event = Callable[[str, str], None]  # (model, what happened): load_start, loaded, unload_start, unloaded


class ModelSteps(Protocol):
    """What differs between run_job and the Ray path: how a model's workers load, caption and are released.
    run_models does the rest alike for both: which models and images, events, timing, the report and the sinks'
    flush. One model at a time: load, then caption, then release."""

    # True: load returns once the workers are up (timed as load_seconds, "loaded" marked); False: they start as
    # captioning starts, and caption_seconds includes their start.
    loads_first: bool
    # True: the workers are released (and verified) even when captioning failed, before the error goes on.
    releases_after_failure: bool

    def prepare(self, plan: ModelPlan, todo: list[ImageRef]) -> ModelPlan: ...
    def load(self, plan: ModelPlan, todo: list[ImageRef]) -> int: ...  # workers captioning side by side
    def caption(self, plan: ModelPlan, todo: list[ImageRef], report: ModelReport, bar: tqdm) -> None: ...
    def release(self, plan: ModelPlan) -> vram.Release | None: ...


def run_models(job: CaptionJob, steps: ModelSteps, progress: bool = True, event: Event | None = None) -> list[ModelReport]:
    """Each model that still lacks images, in turn: load, caption, release, with its events and report."""
    mark = event or (lambda model, what: None)
    reports: list[ModelReport] = []
    for plan, report, todo in models_to_caption(job, reports):
        plan = steps.prepare(plan, todo)
        mark(plan.spec.model, "load_start")
        start = time.monotonic()
        report.workers = steps.load(plan, todo)
        if steps.loads_first:
            report.load_seconds = time.monotonic() - start
            report.server_wait_seconds = FORK_SERVER.import_wait(start, start + report.load_seconds)
            mark(plan.spec.model, "loaded")
        captioned = interrupted = False
        try:
            _caption_timed(job, steps, plan, todo, report, progress)
            captioned = True
        except KeyboardInterrupt:
            interrupted = True  # the work is abandoned: run_job kills the workers, waiting for no exit
            raise
        finally:  # verified back before the next model loads
            if not interrupted and (captioned or steps.releases_after_failure):
                mark(report.model, "unload_start")
                start = time.perf_counter()
                report.release = steps.release(plan)
                report.unload_seconds = time.perf_counter() - start
                mark(report.model, "unloaded")
    return reports


def _caption_timed(job: CaptionJob, steps: ModelSteps, plan: ModelPlan, todo: list[ImageRef], report: ModelReport,
                   progress: bool) -> None:
    # Off a terminal (a log, a pipe) no bar: each redraw would be a line of its own there, 100 % twice at the end;
    # the summary line says what the bar would have.
    bar = tqdm(total=len(todo), desc=plan.spec.model, unit="img", disable=True if not progress else None,
               dynamic_ncols=True)
    start = time.perf_counter()
    interrupted = False
    try:
        steps.caption(plan, todo, report, bar)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        bar.close()
        report.caption_seconds = time.perf_counter() - start
        if not interrupted:  # each result is fsynced as written (a table's in its journal); a table's rewrite is slow
            for sink in job.sinks:
                sink.flush()


def run_job(job: CaptionJob, pool_config: PoolConfig, progress: bool = True, event: Event | None = None) -> list[ModelReport]:
    # A job's switches are amortised over its images, and its report must show memory back at the baseline between
    # models, so no spare holds a context while the next model is waited for.
    with ModelPool(replace(pool_config, warm_spare=False)) as pool:
        try:
            return run_models(job, _PoolSteps(job, pool), progress, event)
        except KeyboardInterrupt:
            pool.close(kill=True)  # a busy worker would finish its request first: unload_grace for nothing
            raise


class _PoolSteps:
    """run_job's steps: workers of this host's pool."""

    loads_first = True
    releases_after_failure = True

    def __init__(self, job: CaptionJob, pool: ModelPool) -> None:
        self.job, self.pool = job, pool
        self.names: list[str] = []

    def prepare(self, plan: ModelPlan, todo: list[ImageRef]) -> ModelPlan:
        gpu_present = vram.available()
        folder = _folder(plan.spec) if gpu_present else None
        spec = job_decode(plan.spec, len(todo), gpu_present, folder)
        return replace(plan, spec=job_prep(spec, len(todo), gpu_present))

    def load(self, plan: ModelPlan, todo: list[ImageRef]) -> int:
        self.names = _load_replicas(self.job, plan, self.pool)
        return len(self.names)

    def caption(self, plan: ModelPlan, todo: list[ImageRef], report: ModelReport, bar: tqdm) -> None:
        _caption_all(self.job, plan, self.names, todo, self.pool, report, bar)

    def release(self, plan: ModelPlan) -> vram.Release | None:
        return vram.combined([future.result() for future in [self.pool.unload_async(name) for name in self.names]])


def _load_replicas(job: CaptionJob, plan: ModelPlan, pool: ModelPool) -> list[str]:
    """One worker, as the spec's device says; or replicas placed over the GPUs, loading side by side."""
    tokens = plan.generation.max_new_tokens  # what the worker sizes its batches for
    if job.gpus is None and job.replicas is None:
        return [pool.load(plan.spec, max_new_tokens=tokens)]
    placements = pool.place(plan.spec, job.gpus, job.replicas, max_new_tokens=tokens)
    names = [plan.spec.model if i == 0 else f"{plan.spec.model}#{i}" for i in range(len(placements))]
    with ThreadPoolExecutor(len(names)) as loading:
        futures = [loading.submit(pool.load, plan.spec, name, where, tokens) for name, where in zip(names, placements)]
    failed = [future.exception() for future in futures if future.exception() is not None]
    if failed:
        for name in names:
            if name in pool:
                pool.unload(name)
        raise failed[0]
    return names


def models_to_caption(job: CaptionJob, reports: list[ModelReport]) -> Iterator[tuple[ModelPlan, ModelReport, list[ImageRef]]]:
    """Each model in turn with its report (appended to `reports`, done or not) and the images it still lacks; a model
    with none left is reported and skipped. Shared by run_job and the Ray path, so both resume alike."""
    for plan in job.plans():
        report = ModelReport(plan.spec.model)
        reports.append(report)
        todo = missing(job, plan.spec, report)
        if todo:
            yield plan, report, todo


def missing(job: CaptionJob, spec: ModelSpec, report: ModelReport) -> list[ImageRef]:
    """The images still without a result from `spec` in any sink (all of them with --overwrite). A result that some
    sinks hold and others lack (an output added on a rerun) is copied to those lacking it instead."""
    if job.overwrite:
        for sink in job.sinks:
            sink.forget({(ref.key, spec.model) for ref in job.images})
    todo, copied = [], []
    copies: dict[int, list[tuple[ImageRef, Record]]] = {id(sink): [] for sink in job.sinks}
    for ref in job.images:
        lacking = [sink for sink in job.sinks if not sink.done(ref, spec.model)]
        if not lacking:
            continue
        held = next((r for r in (sink.held(ref, spec.model) for sink in job.sinks if sink not in lacking) if r), None)
        if held is None:
            todo.append(ref)
            continue
        copied.append(ref)
        for sink in lacking:
            copies[id(sink)].append((ref, held))
    for sink in job.sinks:
        if copies[id(sink)]:
            sink.write(copies[id(sink)])
            sink.flush()
    retried = [ref for ref in copied if not all(sink.done(ref, spec.model) for sink in job.sinks)]  # an error record copied where only captions count
    report.skipped = len(job.images) - len(todo) - len(retried)
    report.copied = len(copied) - len(retried)
    return todo + retried


def request_size(plan: ModelPlan, pool: ModelPool, name: str) -> int:
    """Images per worker request: BATCHES_PER_REQUEST model batches of the plan's size, or with batch_size auto of
    the size the worker picked when it loaded."""
    return BATCHES_PER_REQUEST * (plan.batch_size or pool.batch_size(name))


def _caption_all(job: CaptionJob, plan: ModelPlan, names: list[str], todo: list[ImageRef], pool: ModelPool,
                 report: ModelReport, bar: tqdm) -> None:
    """Requests go to whichever replica answered one; only this thread writes to the sinks."""
    report.load_timings = pool.load_info(names[0])
    waiting = deque(todo)
    sizes = {name: request_size(plan, pool, name) for name in names}
    in_flight: dict[Future, tuple[list[ImageRef], str]] = {}

    def feed(name: str) -> None:
        refs = [waiting.popleft() for _ in range(min(sizes[name], len(waiting)))]
        if refs:
            in_flight[_submit(plan, pool, name, refs)] = (refs, name)

    for name in names:
        for _ in range(IN_FLIGHT):
            feed(name)
    finished: list[tuple[float, int]] = []  # (when, images done so far) after each request
    while in_flight:
        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in sorted(done, key=list(in_flight).index):  # oldest first, as one worker answers them
            refs, name = in_flight.pop(future)
            _finish(refs, future, job, plan, name, pool, report, bar)
            finished.append((time.perf_counter(), report.captioned))
            feed(name)
    if len(finished) >= 2 and finished[-1][0] > finished[0][0]:
        (first_at, first_done), (last_at, last_done) = finished[0], finished[-1]
        report.steady_images_per_second = (last_done - first_done) / (last_at - first_at)


def _submit(plan: ModelPlan, pool: ModelPool, name: str, refs: list[ImageRef]) -> Future:
    prompts = [render_prompt(plan.generation.prompt, ref) for ref in refs]
    items = [ref.payload() for ref in refs]
    # Through submit, not submit_caption: that would turn batch_size None (the worker picks) into the pool's own.
    return pool.submit(name, Caption(items, prompts, plan.generation, plan.batch_size))


def results_or_halves(submit: Callable[[list], Future], items: list, future: Future) -> Captions:
    """The batch's results; if its worker died, the pool reloads the model and the batch is retried in halves
    through `submit`, so an image that kills the worker ends up as its own error record and the job goes on."""
    try:
        return future.result()
    except WorkerDied as e:
        if len(items) == 1:
            return Captions([ItemResult(None, f"the worker died on this image: {e}")], 0.0, 0, 0)
        half = len(items) // 2
        parts = [results_or_halves(submit, part, submit(part)) for part in (items[:half], items[half:])]
        return Captions(parts[0].results + parts[1].results, 0.0, 0, parts[0].tokens + parts[1].tokens)


def _finish(refs: list[ImageRef], future: Future, job: CaptionJob, plan: ModelPlan, name: str, pool: ModelPool,
            report: ModelReport, bar: tqdm) -> None:
    captions = results_or_halves(lambda part: _submit(plan, pool, name, part), refs, future)
    record(job, plan, report, refs, captions)
    report.requests += 1
    bar.update(len(refs))


def record(job: CaptionJob, plan: ModelPlan, report: ModelReport, refs: list[ImageRef], captions: Captions) -> None:
    """Write one batch's results to every sink and count them in the report."""
    pairs = []
    report.tokens += captions.tokens
    report.prepared_apart += captions.prepared_apart
    report.input_wait_seconds += captions.input_wait
    for ref, result in zip(refs, captions.results):
        if result.error is None and (refusal := _refusal(job, ref, plan.spec.model)):
            result = replace(result, caption=None, error=refusal)
        caption = None if result.caption is None else f"{job.prefix}{result.caption}{job.suffix}"
        pairs.append((ref, Record(ref.key, plan.spec.model, caption, result.error, result.note)))
        if result.batch:
            report.batch_share += 1 / result.batch
            report.largest_batch = max(report.largest_batch, result.batch)
        if result.error is None:
            report.captioned += 1
        else:
            report.errors += 1
            if len(report.error_samples) < 5:
                report.error_samples.append(f"{ref.key}: {result.error}")
    for sink in job.sinks:  # only to sinks lacking the result: a retried error must not duplicate the record it had
        sink.write([pair for pair in pairs if job.overwrite or not sink.done(pair[0], plan.spec.model)])


def _refusal(job: CaptionJob, ref: ImageRef, model: str) -> str | None:
    """Why some output cannot hold this result (a sidecar name over the file system's limit), or None."""
    return next((why for sink in job.sinks if (why := sink.refusal(ref, model))), None)


def summary_line(report: ModelReport) -> str:
    parts = [f"{report.model}: {report.captioned} captioned", f"{report.errors} errors", f"{report.skipped} already done"]
    if report.copied:
        parts.append(f"{report.copied} copied from other outputs to those lacking them")
    if report.workers > 1:
        parts.append(f"{report.workers} workers side by side")
    if report.batches:
        parts.append(f"{_count(report.batches, 'batch', 'batches')} of up to {report.largest_batch} images"
                     + (f" in {_count(report.requests, 'request', 'requests')}" if report.requests else ""))
    if report.caption_seconds:
        rate = f"{report.images_per_second:.1f} images/s, {report.tokens_per_second:.0f} tokens/s, " if report.captioned else ""
        waited = report.server_wait_seconds >= 0.05
        wait = f" ({report.server_wait_seconds:.1f} s of it the workers' start)" if waited else ""
        parts.append(f"{rate}load {report.load_seconds:.1f} s{wait}, unload {report.unload_seconds:.2f} s")
    if report.release is not None:
        parts.append(str(report.release))
    return ", ".join(parts)


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _folder(spec: ModelSpec) -> Path | None:
    """The model's local folder, read for its decode mode; None when it cannot be had (the load then says why)."""
    try:
        return resolve_model(spec.model, spec.revision)
    except (ModelNotFound, OSError):
        return None
