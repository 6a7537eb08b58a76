"""The default backend: any AutoModelForImageTextToText model through Hugging Face transformers."""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForImageTextToText, AutoProcessor, BatchFeature, StoppingCriteriaList

from vlmux.backends.attention import use_fast_attention
from vlmux.backends.base import OutOfMemory, RowControl
from vlmux.backends.context import check_fits, context_length
from vlmux.backends.engine.captioner import EngineCaptioner, check_family
from vlmux.backends.families import CHAT_TEMPLATE, PromptForm, prompt_form
from vlmux.backends.fast import (
    FastConfig, compile_vision_blocks, fitting_batch, generate_options, pad_rows, prepare_compile, to_device,
)
from vlmux.backends.inert import control_strings, inert, inert_messages
from vlmux.backends.loader import Unsupported, empty_model, release_staging, stream_weights
from vlmux.backends.pinned import unpin_all
from vlmux.backends.residency import Resident, drop_cached_memory, free_for_batches
from vlmux.backends.quantize import load_report, quantization_options
from vlmux.backends.scores import TokenScores
from vlmux.backends.streaming import RowPieces, RowStops, TextPieces
from vlmux.config import GenerationSpec, ModelSpec
from vlmux.estimate import image_bytes, image_budget, read_json
from vlmux.protocol import Chatted
from vlmux.quantization import METHODS

WARM_UP = GenerationSpec(max_new_tokens=4, ignore_eos=True)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but CUDA is not available here; use device='cpu' (--device cpu)")
    return "cuda:0" if device == "cuda" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class Prepared:
    """A caption batch made ready on the host (processor run, model dtype, pinned), off the GPU's critical path."""

    inputs: BatchFeature
    rows: int  # real images; the rows after them repeat the last one to keep the compiled batch shape
    ready: torch.cuda.Event | None = None  # recorded when the inputs were made on the GPU's preparing stream


def _start_cuda(device: str) -> threading.Thread | None:
    if not device.startswith("cuda"):
        return None
    thread = threading.Thread(target=lambda: torch.empty(1, device=device), name="vlmux-cuda-init", daemon=True)
    thread.start()
    return thread


def load_processor(path: str | Path, trust_remote_code: bool):
    """The model's processor, set up for batched captions: left padding (decoder-only batches need the prompt ends
    aligned) and a pad token."""
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def caption_text(processor, prompt: str, form: PromptForm = CHAT_TEMPLATE) -> str:
    """One image and the prompt (control tokens in it made inert) in the family's form: a user turn through the chat
    template for most."""
    return form.text(processor, inert(prompt, control_strings(processor)))


def host_inputs(processor, images: list[Image.Image], prompts: list[str], dtype: torch.dtype,
                form: PromptForm = CHAT_TEMPLATE) -> dict[str, torch.Tensor]:
    """What `prepare` makes on the host, as plain tensors in the model's dtype (floating ones): what a preparing
    process sends to the worker."""
    texts = [caption_text(processor, prompt, form) for prompt in prompts]
    inputs = processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt")
    return dict(inputs.to(dtype=dtype))


CUDNN_MIN_ROWS = 16


def attention_kernels(rows: int, device: str) -> contextlib.AbstractContextManager:
    """cuDNN's attention builds an execution plan for every new shape, and each decode step of an answer has a new
    key length, so a short answer spends most of its time planning, where flash and memory-efficient attention need
    no plans (docs/BENCHMARKS.md). A large caption batch pays
    the plans once per worker (every batch has the same shapes), and its throughput was measured with cuDNN on,
    so only small batches leave it out."""
    if rows >= CUDNN_MIN_ROWS or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class TransformersBackend(Resident):
    prepares_apart = True  # worker/prep.py runs the same processor and `host_inputs`

    def __init__(self, spec: ModelSpec, path: str, shallow: bool = False) -> None:
        """shallow: a one-layer copy with uninitialised weights, only to run the model's code once (`warm_up`)."""
        self.device = resolve_device(spec.device)
        self.torch_dtype = resolve_dtype(spec.dtype, self.device)
        self._quantized = METHODS[spec.quantize] if spec.quantize else None  # its matmuls' scratch sizes a batch
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        # The parent resolved `path` to a local folder already: nothing here reaches the network.
        common = {"trust_remote_code": spec.trust_remote_code, "local_files_only": True}
        self.timings: dict[str, float] = {}
        # A shallow copy only warms kernels up: compiling it would cost seconds and serve nothing.
        self.fast = FastConfig.for_device("dynamic" if shallow else spec.decode, self.device)
        if self.fast.compile or self.fast.vision_compiled:
            prepare_compile()
        self._compiled_rows = 0  # the largest batch the compiled decode step has run; shorter ones pad up to it
        self._unpin_after_answer = False
        self._config = read_json(Path(path) / "config.json")
        if self.fast.engine:  # a family the engine cannot run is refused before its weights are read
            check_family(self._config.get("model_type", ""))
        self.generated_tokens = 0  # running total, read by the worker for tokens/s
        start = time.perf_counter()
        context = _start_cuda(self.device)  # driver work, overlapped with reading the processor
        self.processor = load_processor(path, spec.trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.form = prompt_form(path)
        self.timings["processor"] = time.perf_counter() - start
        if context is not None:
            context.join()
        self.timings["cuda_init"] = time.perf_counter() - start
        try:
            if spec.max_memory:
                raise Unsupported(f"split across {len(spec.max_memory)} GPUs by device_map")
            if spec.quantize:
                raise Unsupported(f"quantised on load ({spec.quantize})")
            self.model = self._stream(Path(path), spec, shallow)
            self.loader = "stream"
        except Unsupported as e:
            if shallow:
                raise
            # names a missing package or kernel before any weight is read
            quantization = quantization_options(spec.quantize, path, self.torch_dtype, self.device)
            with load_report():
                self.model = AutoModelForImageTextToText.from_pretrained(
                    path, dtype=self.torch_dtype, **device_map_options(spec, self.device), **quantization, **common
                ).eval()
            self.loader = f"from_pretrained ({e})"
        self.timings["weights"] = time.perf_counter() - start - self.timings["cuda_init"]
        self.attention = use_fast_attention(self.model, packed_vision=self.fast.vision_compiled)
        self.compiled_vision_blocks = compile_vision_blocks(self.model) if self.fast.vision_compiled else 0
        self.engine = self._engine()
        self.context_length = context_length(self.model.config)  # prompt + answer tokens a chat may hold
        self._host_state: dict[str, torch.Tensor] | None = None
        self._image_budget = image_budget(Path(path), self._config)
        # The host's resizing and patching of a large batch outlasts the GPU's captioning of it; processors with a
        # `device` option do it on the GPU instead.
        # A shallow copy (warm_up) takes this path too: its kernels are part of a first answer.
        self.preprocess_on_device = self.device.startswith("cuda")
        self._prepare_stream: torch.cuda.Stream | None = None

    def _stream(self, path: Path, spec: ModelSpec, shallow: bool) -> torch.nn.Module:
        start = time.perf_counter()
        model = empty_model(path, self.torch_dtype, self.device, spec.trust_remote_code, shallow)
        self.timings["empty_model"] = time.perf_counter() - start
        if shallow:
            return model
        try:
            phases: dict[str, float] = {}
            size = stream_weights(model, path, timings=phases)
            self.timings.update({f"stream_{phase}": seconds for phase, seconds in phases.items()})
        finally:
            release_staging()  # a gigabyte of pinned host memory the model no longer needs
            # What a warm spare pinned is unpinned after the first answer (`after_reply`): unpinning gigabytes
            # takes the driver's lock for a while, and on a thread beside the first answer it slowed that answer.
            self._unpin_after_answer = True
        self.timings["stream"] = time.perf_counter() - start - self.timings["empty_model"]
        self.timings["stream_gb"] = size / 1e9
        return model

    def _engine(self) -> EngineCaptioner | None:
        return EngineCaptioner(self.model, self.tokenizer.pad_token_id) if self.fast.engine else None

    def sleep(self) -> None:
        self.engine = None  # its fused weights and cache would hold device memory through the sleep
        super().sleep()

    def wake(self) -> None:
        super().wake()
        self.engine = self._engine()

    def caption(self, images: list[Image.Image], prompts: list[str], gen: GenerationSpec) -> list[str]:
        return self.generate(self.prepare(images, prompts), gen)

    def prepare(self, images: list[Image.Image], prompts: list[str], pad_to: int | None = None) -> Prepared:
        """The CPU half of `caption`; thread-safe against a `generate` running at the same time. pad_to: the
        worker's chunk size, which a short chunk is padded up to when the decode step is compiled for it."""
        rows = len(images)
        if pad_to and self.fast.pads_batches and rows < pad_to:
            images, prompts = pad_rows(images, pad_to), pad_rows(prompts, pad_to)
        if self.preprocess_on_device:
            texts = [caption_text(self.processor, prompt, self.form) for prompt in prompts]
            try:
                return self._prepare_on_device(texts, images, rows)
            except TypeError:  # a processor without the device option: the host does it from now on. A bad
                self.preprocess_on_device = False  # image raises ValueError, which must not turn this off for good.
        # The same inputs a preparing process makes (worker/prep.py), here pinned for the copy to the device.
        inputs = BatchFeature(host_inputs(self.processor, images, prompts, self.torch_dtype, self.form))
        return Prepared(to_device(inputs, self.device, self.torch_dtype), rows)

    def from_host(self, inputs: dict[str, torch.Tensor], rows: int) -> Prepared:
        """A batch another process prepared (`host_inputs`, in the model's dtype) onto the device, on the preparing
        stream when there is one."""
        batch = BatchFeature(inputs)
        if not self.device.startswith("cuda"):
            return Prepared(batch, rows)
        if self._prepare_stream is None:
            self._prepare_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._prepare_stream):
            batch = batch.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._prepare_stream)
        return Prepared(batch, rows, ready)

    def _prepare_on_device(self, texts: list[str], images: list[Image.Image], rows: int) -> Prepared:
        """The processor's image work on a stream of its own, so it overlaps a batch generating on the main one."""
        if self._prepare_stream is None:
            self._prepare_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._prepare_stream):
            inputs = self.processor(text=texts, images=[[image] for image in images], padding=True,
                                    return_tensors="pt", device=self.device)
            inputs = inputs.to(self.device, dtype=self.torch_dtype, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._prepare_stream)
        return Prepared(inputs, rows, ready)

    def generate(self, prepared: Prepared, gen: GenerationSpec) -> list[str]:
        """The GPU half of `caption`: the fast path (static cache, compiled decode) when this backend has it."""
        inputs = prepared.inputs
        if prepared.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(prepared.ready)
            for value in inputs.values():
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    value.record_stream(stream)  # freed after this batch: not reused while its kernels may still run
        if self.engine is not None:  # captions through vlmux's own runner; chat stays on generate (it streams)
            return self._generate(inputs, gen, {}, prepared.rows, engine=True)
        rows = inputs["input_ids"].shape[0]
        if self.fast.compile and rows < self._compiled_rows:
            fast = {}  # a batch split after running out of memory: eager beats compiling a graph for it
        else:
            self._compiled_rows = max(self._compiled_rows, rows) if self.fast.compile else 0
            fast = generate_options(self.fast, inputs["input_ids"].shape[1], gen.max_new_tokens)
        return self._generate(inputs, gen, fast, prepared.rows)

    def largest_batch(self, max_new_tokens: int, memory_budget: int | None) -> int | None:
        """The most images a batch of `max_new_tokens` fits in the budget and free device memory; None on the CPU."""
        if not self.device.startswith("cuda"):
            return None
        kv_cache, activations = image_bytes(self._config, self._image_budget, max_new_tokens, self.torch_dtype.itemsize,
                                            self._quantized)
        return fitting_batch(kv_cache + activations, free_for_batches(self.device), memory_budget)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def pads_batches(self) -> bool:
        return self.fast.pads_batches

    def chat(self, messages: list[dict[str, Any]], images: list[Image.Image], gen: GenerationSpec,
             on_text: Callable[[str], None] | None = None, control: RowControl | None = None,
             logprobs: int | None = None) -> Chatted:
        # One conversation at a time: a compiled graph for batch 1 would cost more than it saves.
        messages = inert_messages(messages, control_strings(self.processor))  # user text never acts as a marker
        text = self.form.chat_text(self.processor, messages)
        inputs = self.processor(text=[text], images=[images] if images else None, padding=True, return_tensors="pt")
        return self._chats(inputs, [int(inputs["input_ids"].shape[1])], gen,
                           None if on_text is None else TextPieces(self.tokenizer, on_text), control, [logprobs])[0]

    def chat_batch(self, conversations: list[tuple[list[dict[str, Any]], list[Image.Image]]], gen: GenerationSpec,
                   on_text: Callable[[int, str], None] | None = None, control: RowControl | None = None,
                   logprobs: list[int | None] | None = None) -> list[Chatted]:
        """Conversations answered in one batch, left-padded like caption batches; every one has images, or none."""
        controls = control_strings(self.processor)  # user text never acts as a marker, as in `chat`
        texts = [self.form.chat_text(self.processor, inert_messages(messages, controls)) for messages, _ in conversations]
        images = [pictures for _, pictures in conversations]
        inputs = self.processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")
        return self._chats(inputs, inputs["attention_mask"].sum(dim=1).tolist(), gen,
                           None if on_text is None else RowPieces(self.tokenizer, len(texts), on_text), control,
                           logprobs or [None] * len(texts))

    def _chats(self, inputs: BatchFeature, prompt_tokens: list[int], gen: GenerationSpec, streamer,
               control: RowControl | None, logprobs: list[int | None]) -> list[Chatted]:
        """The processor's batch of conversations generated, each row stopping on its own when aborted, with the
        log-probabilities of the rows that ask for them."""
        check_fits(prompt_tokens, gen.max_new_tokens, self.context_length)
        criteria, stops = [], None
        if control is not None:
            stops = RowStops(control, len(prompt_tokens), self.model.generation_config.eos_token_id, gen.ignore_eos,
                             gen.max_new_tokens)
            criteria.append(stops)
        wanted = [top for top in logprobs if top is not None]
        scores = TokenScores(self.model, max(wanted)) if wanted else None
        if scores is not None:
            criteria.append(scores)
        options = {"streamer": streamer} if streamer is not None else {}
        if criteria:
            options["stopping_criteria"] = StoppingCriteriaList(criteria)
        try:
            new_tokens = self._generate_tokens(inputs, gen, options)
        finally:
            if scores is not None:
                scores.close()
        counts = (new_tokens != self.tokenizer.pad_token_id).sum(dim=1).tolist()
        rows = scores.rows(self.tokenizer, counts) if scores is not None else [None] * len(counts)
        answers = []
        for row, tokens in enumerate(new_tokens):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            finish = ("abort" if stops is not None and stops.aborted[row] else
                      "length" if counts[row] >= gen.max_new_tokens else "stop")
            top = logprobs[row]
            entries = None if top is None else tuple(replace(entry, top=entry.top[:top]) for entry in rows[row])
            answers.append(Chatted(text, int(prompt_tokens[row]), int(counts[row]), finish, entries))
        return answers

    def _generate(self, inputs: BatchFeature, gen: GenerationSpec, fast: dict[str, Any], rows: int | None = None,
                  engine: bool = False) -> list[str]:
        new_tokens = self._generate_tokens(inputs, gen, fast, rows, engine)
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    @torch.inference_mode()
    def _generate_tokens(self, inputs: BatchFeature, gen: GenerationSpec, fast: dict[str, Any],
                         rows: int | None = None, engine: bool = False) -> torch.Tensor:
        inputs = inputs.to(self.device, dtype=self.torch_dtype, non_blocking=True)
        if gen.seed is not None:
            torch.manual_seed(gen.seed)
        options: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if gen.do_sample:
            options.update(temperature=gen.temperature, top_p=gen.top_p)
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        if gen.ignore_eos:
            options["min_new_tokens"] = gen.max_new_tokens
        prompt_length = inputs["input_ids"].shape[1]
        try:
            with attention_kernels(inputs["input_ids"].shape[0], self.device):
                if engine:
                    new_tokens = self.engine.generate(inputs, gen)
                else:
                    new_tokens = self.form.answer(self.model.generate(**inputs, **options, **fast), prompt_length)
        except torch.OutOfMemoryError as e:
            message = str(e).splitlines()[0]
        else:
            new_tokens = new_tokens[:rows]  # the padding rows are dropped here
            self.generated_tokens += int((new_tokens != self.tokenizer.pad_token_id).sum())
            return new_tokens
        # Raised past the except block, so that the error keeps no link to the failed call's frames and activations.
        del inputs
        if self.engine is not None:
            self.engine.release()  # the engine's cache, sized for the batch that did not fit
        torch.cuda.empty_cache()
        raise OutOfMemory(message)

    def after_reply(self) -> None:
        if self._unpin_after_answer:
            self._unpin_after_answer = False
            unpin_all()

    def close(self) -> None:
        self.engine = None
        self.model = None
        self.processor = None
        self._host_state = None
        drop_cached_memory()


def device_map_options(spec: ModelSpec, device: str) -> dict:
    """from_pretrained's placement arguments: one device, or a split over the worker's visible GPUs."""
    if not spec.max_memory:
        return {"device_map": device}
    return {"device_map": "auto", "max_memory": dict(enumerate(spec.max_memory))}
