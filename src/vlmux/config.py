"""Frozen configuration records shared by the parent and the workers."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlmux.budget import check_budget
from vlmux.quantization import METHODS

DEFAULT_PROMPT = "Describe this image in one sentence."
DTYPES = ("auto", "bfloat16", "float16", "float32")
# How captions are decoded: auto (dynamic, except caption jobs on a GPU: engine where it runs the model, else
# compiled for jobs long enough to pay for the compile; caption.plan.job_decode), dynamic (HF's default cache),
# static (a static KV cache, eager), compiled (static cache + torch.compile of the decode step, CUDA graphs on CUDA,
# and compiled vision blocks), engine (vlmux's own runner for the Qwen2-VL family: backends/engine/).
DECODE_MODES = ("auto", "dynamic", "static", "compiled", "engine")
# Images decoding to more pixels are refused as possible decompression bombs: Pillow's 89.5 MP would refuse real
# 100-200 MP photos. JPEGs count at their draft size (images.load_image).
MAX_PIXELS = 200_000_000


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a hub id or a local folder, where, and in which precision."""

    model: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    revision: str | None = None
    trust_remote_code: bool = False
    max_memory: tuple[int, ...] = ()  # set by placement for a split model: weight bytes per visible GPU
    decode: str = "auto"  # one of DECODE_MODES
    # Processes that decode and preprocess caption batches beside the worker; None: on a GPU the host's cores less
    # two (at most 12), on the CPU none. 0 keeps it all in the worker's threads.
    prep_processes: int | None = None
    # Quantise a 16-bit checkpoint on load: a key of vlmux.quantization.METHODS (4bit, 8bit, fp8, torchao-int4, ...).
    # A pre-quantised checkpoint (quantization_config in its config.json) needs none.
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in METHODS:
            raise ValueError(f"unknown quantisation {self.quantize!r}; choose one of {', '.join(METHODS)}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"unknown decode mode {self.decode!r}; choose one of {', '.join(DECODE_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.prep_processes is not None and self.prep_processes < 0:
            raise ValueError("prep_processes must be 0 or more")
        if not _is_device(self.device):
            raise ValueError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")

    def runs_remote_code(self, config: dict) -> bool:
        """Whether a folder with this config.json loads through the model's own code (its `auto_map`, allowed)."""
        return bool(config.get("auto_map")) and self.trust_remote_code


@dataclass(frozen=True)
class GenerationSpec:
    """How to caption: the prompt and the decoding settings."""

    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks use it so random weights cannot stop early
    max_pixels: int | None = MAX_PIXELS  # decoding more is refused (a decompression bomb guard); None: no limit

    def __post_init__(self) -> None:
        """Checked here, where the settings are made (as vLLM's SamplingParams): a wrong type or range never
        reaches a worker. ValueError for a wrong type too: the CLI and the server report that as bad input."""
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, not {type(self.prompt).__name__}")
        for name in ("do_sample", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, not {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a number of 0 or more, not {self.temperature!r}")
        if self.do_sample and self.temperature == 0:
            raise ValueError("temperature 0 with do_sample=True: use do_sample=False for greedy decoding")
        if not _is_number(self.top_p) or not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be a number from 0 to 1, not {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be a whole number or None, not {self.seed!r}")
        if self.max_pixels is not None and (not _is_int(self.max_pixels) or self.max_pixels < 1):
            raise ValueError(f"max_pixels must be a whole number of at least 1, or None for no limit, not {self.max_pixels!r}")


@dataclass(frozen=True)
class PoolConfig:
    """How the pool holds models: its VRAM budget, eviction and worker lifecycle."""

    vram_budget: str | float | int | None = None  # "0.9" of the device, "40GiB", bytes, or None for all
    keep_alive: float | None = None  # seconds an idle model stays loaded; None keeps it until evicted
    max_batch_size: int | None = None  # images per model batch; None: auto, the worker sizes it within its budget
    unload_grace: float = 5.0  # seconds a worker may take to exit before it is killed
    release_timeout: float = 10.0  # seconds to wait for NVML to show the memory back
    hang_timeout: float = 30.0  # seconds a working worker may send nothing (no heartbeat) before it is killed
    request_timeout: float | None = None  # seconds one worker call may take at most; None: no limit while it works
    wait_for_room: float = 60.0  # seconds a load waits for busy models on its GPU to go idle before PoolFull
    # Seconds a model keeps taking its own new requests after its load while another model's load waits for its
    # memory, so each switch buys serving time. None (auto): as long as its own load took; 0: none. An idle model is
    # evicted at once; a load's wait_for_room counts from the end of the busy models' residency.
    min_residency: float | None = None
    isolation: str = "process"  # process | none
    spare_worker: bool = True
    # Once a pool has switched models on a GPU, its spare also creates a CUDA context there and runs the recent
    # models' kernels once, so a switch skips the context and first-call costs; that spare holds device memory while
    # models are loaded and for warm_spare_linger seconds after the last one is unloaded.
    warm_spare: bool = True
    warm_spare_linger: float = 10.0
    # Models the pool will switch to (a server's models, a job's list): the spare gets warm for them after the first
    # load on a GPU, so that the first switch is as fast as the later ones.
    prewarm: tuple[str | ModelSpec, ...] = ()
    # A warm spare also pins the recent models' checkpoint pages in the page cache (if they fit in half of the host's
    # available memory), so that a switch copies the weights by DMA, faster than reading them (docs/BENCHMARKS.md);
    # the pages are unpinned once the new model has answered.
    warm_spare_pins_weights: bool = True
    host_ram_budget: str | float | int | None = None  # models asleep in pinned host RAM: "64GiB", 0.5 of it, None: no limit
    worker_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prewarm", tuple(self.prewarm))  # a list is fine too; the record stays hashable
        if self.isolation not in ("process", "none"):
            raise ValueError("isolation must be 'process' or 'none'")
        if self.max_batch_size is not None and (type(self.max_batch_size) is not int or self.max_batch_size < 1):
            raise ValueError(f"max_batch_size {self.max_batch_size!r}: a whole number of at least 1, or None for auto")
        for name in ("vram_budget", "host_ram_budget"):
            if getattr(self, name) is not None:
                check_budget(getattr(self, name), name)
        _seconds("keep_alive", self.keep_alive, "None keeps it until evicted")
        _seconds("min_residency", self.min_residency, "None for auto")
        _seconds("request_timeout", self.request_timeout, "None for no limit", positive=True)
        for name in ("unload_grace", "release_timeout", "wait_for_room", "warm_spare_linger"):
            _seconds(name, getattr(self, name))
        _seconds("hang_timeout", self.hang_timeout, positive=True)


def _seconds(name: str, value: object, none: str = "", positive: bool = False) -> None:
    """A duration field: a finite number of seconds (more than 0 where `positive`), or None where `none` says so."""
    if value is None and none:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        least = "more than 0" if positive else "0 or more"
        raise ValueError(f"{name} {value!r}: a number of seconds, {least}" + (f", or {none}" if none else ""))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda"):
        return True
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()
