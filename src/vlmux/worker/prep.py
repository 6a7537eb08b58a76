"""Decoding and preprocessing caption batches in processes of their own, so that they do not hold the worker's GIL.

Threads in the worker were not enough: a batch generated several times slower while the next batch was decoded and
preprocessed beside it (docs/BENCHMARKS.md, the caption profile), because the processor's Python and the generate
loop's kernel launches share one interpreter. Here each process decodes a part
of the batch and runs the model's own processor on it; the worker only joins the parts.

The processes come from a fork server of their own, started fresh (not forked from the worker): a worker has a
CUDA context, and a process forked from it would inherit the context's device files and keep its memory booked
after the worker is gone.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vlmux.config import MAX_PIXELS

if TYPE_CHECKING:
    import torch

PRELOAD = ["vlmux.worker.prep_server", "vlmux.worker.cuda_free", "vlmux.worker.lean", "vlmux.worker.prep",
           "vlmux.backends.transformers", "vlmux.images"]
# A part takes seconds; one not back in this long is from a process that hangs (stopped, deadlocked): the worker
# then kills the processes and prepares its chunks itself, where waiting would hang the request past any heartbeat.
PART_TIMEOUT = 60.0
MIN_IMAGES = 16  # smaller requests (a first answer, a chat) are prepared in the worker: no round trip
MAX_PROCESSES = 12
# Tensors along the token sequence (rows x tokens): parts are left-padded to the longest before joining.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# A worker ends by os._exit or a kill, never shutting the executor down, so the resource tracker (which takes its -W
# options from the worker's) would warn on the terminal about the semaphores it then unlinks as it should.
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


@dataclass(frozen=True)
class Source:
    """Where a preparing process finds the processor, and the dtype the model takes."""

    path: str
    trust_remote_code: bool
    dtype: str  # "bfloat16" | "float16" | "float32"


@dataclass(frozen=True)
class Part:
    bad: dict[int, str]  # position in the part -> why it could not be read
    inputs: dict[str, torch.Tensor] | None  # None when no image of the part could be read
    notes: dict[int, str] = field(default_factory=dict)  # position -> what decoding changed (images.NOTE)


@dataclass(frozen=True)
class Prepped:
    good: list[int]  # positions in the chunk that were read, in the order of the inputs' rows
    bad: dict[int, str]
    inputs: dict[str, torch.Tensor] | None
    notes: dict[int, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Real rows; the rows after them repeat the last good image (padding for a compiled batch)."""
        return len(self.good)


class NotJoinable(ValueError):
    """Parts whose image tensors differ in shape beyond the first dimension (tiles per image, say)."""


def auto_processes(device: str) -> int:
    """On a GPU: the host's cores less one for the worker's own thread and one for the rest; on the CPU none, since
    the model itself uses every core."""
    if not device.startswith("cuda"):
        return 0
    spare = len(os.sched_getaffinity(0)) - 2
    return min(MAX_PROCESSES, spare) if spare >= 2 else 0


class PrepPool:
    """`processes` preparing processes for one worker, started in the background: `ready` says when they can take
    work; until then (their imports take seconds) the worker prepares its chunks itself."""

    def __init__(self, processes: int, source: Source) -> None:
        self.processes = processes
        self.source = source
        self._executor: ProcessPoolExecutor | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()  # a close() while the processes start must not miss the executor
        self.failed: str | None = None
        self._pidfds: list[int] = []  # the processes, by pidfd: a signal never reaches a reused pid
        self.pids: list[int] = []  # the processes, once started
        _OPEN.add(self)
        threading.Thread(target=self._start, name="vlmux-prep-start", daemon=True).start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.failed is None

    def _start(self) -> None:
        try:
            if QUIET_TRACKER not in sys.warnoptions:
                sys.warnoptions.append(QUIET_TRACKER)
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            with self._lock:
                if self.failed is not None:  # closed before it started (a failed load)
                    return
                self._executor = ProcessPoolExecutor(self.processes, mp_context=context, initializer=_child_init,
                                                     initargs=(os.getpid(), self.source))
                # One task per process makes the executor start them all now, not one by one as work arrives.
                pings = [self._executor.submit(_ping) for _ in range(self.processes)]
                # Every process the submits started, read from the executor (its own record: a process's pings may
                # all land in another, and one never named here could never be killed).
                started = list(self._executor._processes)
            pids = list(dict.fromkeys([*started, *(f.result() for f in pings)]))
            pidfds = [fd for pid in pids if (fd := _pidfd(pid)) is not None]
            with self._lock:
                self.pids = pids
                if self.failed is None:
                    self._pidfds, pidfds = pidfds, []
            _kill_processes(pidfds, close=True)  # closed while they started: close() found none of them to kill
        except Exception as e:  # noqa: BLE001 - the worker prepares its chunks itself then
            if self.failed is None:
                self.failed = f"{type(e).__name__}: {e}"
                print(f"vlmux worker: no preparing processes ({self.failed}); the worker prepares batches itself",
                      file=sys.stderr, flush=True)
        finally:
            self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.ready

    def prepare(self, items: list, prompts: list[str], pad_to: int | None, pad_token_id: int,
                max_pixels: int | None = MAX_PIXELS) -> Prepped:
        """Decode and preprocess a chunk in parts, one per process, and join them; raises RuntimeError if a
        process died (the caller prepares the chunk itself)."""
        size = math.ceil(len(items) / self.processes)
        starts = range(0, len(items), size)
        parts = [self._submit(items[s : s + size], prompts[s : s + size], max_pixels) for s in starts]
        good, bad, inputs, notes = [], {}, [], {}
        for start, future in zip(starts, parts):
            part = self._result(future)
            bad.update({start + position: reason for position, reason in part.bad.items()})
            notes.update({start + position: note for position, note in part.notes.items()})
            good.extend(start + p for p in range(min(size, len(items) - start)) if p not in part.bad)
            if part.inputs is not None:
                inputs.append(part.inputs)
        if not good:
            return Prepped([], bad, None, notes)
        last, missing = good[-1], max(0, (pad_to or 0) - len(good))  # the compiled batch shape: repeat the last
        if missing:
            inputs.append(self._result(self._submit([items[last]] * missing, [prompts[last]] * missing, max_pixels)).inputs)
        try:
            joined = join(inputs, pad_token_id)
        except NotJoinable:  # one process does the whole chunk: the processor pads the parts itself
            chosen = good + [last] * missing
            joined = self._result(self._submit([items[i] for i in chosen], [prompts[i] for i in chosen], max_pixels)).inputs
        return Prepped(good, bad, joined, notes)

    def _submit(self, items: list, prompts: list[str], max_pixels: int | None) -> Future:
        try:
            return self._executor.submit(_prepare_part, items, prompts, max_pixels)
        except (BrokenProcessPool, RuntimeError) as e:  # broken by an earlier part, or shut down
            raise self._failure(e) from None

    def _result(self, future: Future) -> Part:
        """A part's result. Bad images come back as `Part.bad`; anything raised is the processes' own failure (one
        died, shared memory ran out): the worker then prepares every chunk itself."""
        try:
            return future.result(timeout=PART_TIMEOUT)
        except FutureTimeout as e:
            self._kill()
            raise self._failure(RuntimeError(f"a part took over {PART_TIMEOUT:g} s: {e}")) from None
        except Exception as e:  # noqa: BLE001 - reported once, then the worker's own threads take over
            raise self._failure(e) from None

    def _failure(self, error: Exception) -> RuntimeError:
        if self.failed is None:
            self.failed = f"{type(error).__name__}: {error}"
            print(f"vlmux worker: preparing processes failed ({self.failed}); the worker prepares batches itself"
                  " from now on", file=sys.stderr, flush=True)
        return RuntimeError(self.failed)

    def close(self) -> None:
        with self._lock:
            self.failed = self.failed or "closed"
            executor, pidfds, self._pidfds = self._executor, self._pidfds, []
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        _kill_processes(pidfds, close=True)  # a stopped process never reads the executor's exit request
        _OPEN.discard(self)

    def _kill(self) -> None:
        with self._lock:
            _kill_processes(self._pidfds)


def _kill_processes(pidfds: list[int], close: bool = False) -> None:
    for pidfd in pidfds:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if close:
            os.close(pidfd)


def _close_open_pools() -> None:
    for pool in list(_OPEN):
        pool.close()


_OPEN: weakref.WeakSet[PrepPool] = weakref.WeakSet()
# At exit, concurrent.futures joins every executor's processes, and one that is stopped or hung never exits: pools
# left open are closed (their processes killed) first. Hooks registered here run in reverse order, so this one,
# registered after concurrent.futures.process's own (imported above), runs before it.
threading._register_atexit(_close_open_pools)


def join(parts: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch from parts prepared apart: exactly what the processor makes of the whole batch, since it left-pads
    the token rows to the longest and concatenates the image tensors in order."""
    import torch
    from torch.nn import functional

    if len(parts) == 1:
        return parts[0]
    joined = {}
    for key in parts[0]:
        tensors = [part[key] for part in parts]
        if key in SEQUENCE_KEYS and all(t.dim() == 2 for t in tensors):
            length = max(t.shape[1] for t in tensors)
            fill = pad_token_id if key == "input_ids" else 0
            tensors = [functional.pad(t, (length - t.shape[1], 0), value=fill) for t in tensors]
        elif len({tuple(t.shape[1:]) for t in tensors}) > 1:
            raise NotJoinable(f"{key}: shapes {[tuple(t.shape) for t in tensors]}")
        joined[key] = torch.cat(tensors)
    return joined


# --- in the preparing processes ---

_source: Source | None = None
_processor = None
_form = None  # the family's PromptForm


def _child_init(worker_pid: int, source: Source) -> None:
    from vlmux.worker.orphan import exit_when_orphaned, killed_with_parent

    killed_with_parent()  # first: the fork server exits with the worker, and then even a stopped process goes
    import torch

    from vlmux.backends.families import prompt_form
    from vlmux.backends.transformers import load_processor

    global _source, _processor, _form
    _source = source
    _form = prompt_form(source.path)
    _processor = load_processor(source.path, source.trust_remote_code)
    torch.set_num_threads(1)  # one core each: the processes are the parallelism
    exit_when_orphaned(worker_pid)  # their parent is their own fork server, not the worker


def _pidfd(pid: int) -> int | None:
    """A pidfd for `pid`, or None where the kernel has none (before Linux 5.3): that process is then not killed on a
    hang, only when its fork server ends."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _ping() -> int:
    return os.getpid()


def _prepare_part(items: list, prompts: list[str], max_pixels: int | None = MAX_PIXELS) -> Part:
    import torch

    from vlmux.backends.transformers import host_inputs
    from vlmux.images import NOTE, ImageError, load_image

    dtype = getattr(torch, _source.dtype)
    read, bad = {}, {}
    for position, (item, prompt) in enumerate(zip(items, prompts)):
        try:
            read[position] = (load_image(item, max_pixels=max_pixels), prompt)
        except ImageError as e:
            bad[position] = str(e)
    def notes() -> dict[int, str]:
        return {position: image.info[NOTE] for position, (image, _) in read.items() if NOTE in image.info}

    def inputs() -> dict[str, torch.Tensor] | None:
        pairs = list(read.values())
        return host_inputs(_processor, [i for i, _ in pairs], [p for _, p in pairs], dtype, _form) if pairs else None

    try:
        return Part(bad, inputs(), notes())
    except Exception:  # noqa: BLE001 - an image the processor rejects (too small, say): find it, keep the others
        for position, (image, prompt) in list(read.items()):
            try:
                host_inputs(_processor, [image], [prompt], dtype, _form)
            except Exception as e:  # noqa: BLE001 - named in the image's result
                bad[position] = f"the processor rejected it: {type(e).__name__}: {e}"
                del read[position]
        return Part(bad, inputs(), notes())
