"""What a worker does with each request; runs inside the worker process (or in-process with isolation="none")."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from vlmux.images import ImageError, load_image
from vlmux.worker.protocol import (
    Caption, Captions, Chat, Chatted, Done, Failed, ItemResult, Load, Loaded, Reply, Request, Sleep, Wake, Warm,
)

DECODE_THREADS = 8


class Handler:
    def __init__(self) -> None:
        self.backend = None
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="vlmux-decode")

    def handle(self, request: Request) -> Reply:
        start = time.perf_counter()
        if isinstance(request, Load):
            return self._load(request, start)
        if isinstance(request, Warm):
            return self._warm(request, start)
        if self.backend is None:
            return Failed("request", "no model is loaded in this worker")
        try:
            if isinstance(request, Caption):
                return self._caption(request, start)
            if isinstance(request, Chat):
                return self._chat(request)
            if isinstance(request, Sleep):
                self.backend.sleep()
            elif isinstance(request, Wake):
                self.backend.wake()
        except Exception as e:  # noqa: BLE001 - a failed request must not take the worker, and its model, down
            return Failed("request", f"{type(e).__name__}: {e}")
        return Done(time.perf_counter() - start)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def _load(self, request: Load, start: float) -> Reply:
        os.environ.update(request.env)
        from vlmux.backends.transformers import TransformersBackend  # the heavy import happens here, not in the parent

        try:
            self.backend = TransformersBackend(request.spec, request.path)
        except Exception as e:  # noqa: BLE001 - any load failure goes back to the caller as a message
            return Failed("load", f"{type(e).__name__}: {e}")
        return Loaded(time.perf_counter() - start, self.backend.device, self.backend.dtype, self.backend.timings)

    def _warm(self, request: Warm, start: float) -> Reply:
        if self.backend is not None:  # taken for a load before the warm-up's turn came: nothing left to prepare
            return Done(0.0)
        os.environ.update(request.env)
        from vlmux.backends.transformers import warm_up

        try:
            warm_up(request.spec, request.path)
        except Exception as e:  # noqa: BLE001 - the load that follows will report what is really wrong
            return Failed("warm", f"{type(e).__name__}: {e}")
        return Done(time.perf_counter() - start)

    def _caption(self, request: Caption, start: float) -> Reply:
        tokens_before = getattr(self.backend, "generated_tokens", 0)
        decoded = list(self._decoder.map(_decode, request.items))
        results: list[ItemResult | None] = [None] * len(decoded)
        good = []
        for index, image in enumerate(decoded):
            if isinstance(image, str):
                results[index] = ItemResult(None, image, bad_image=True)
            else:
                good.append(index)
        for offset in range(0, len(good), request.batch_size):
            chunk = good[offset : offset + request.batch_size]
            self._caption_chunk(chunk, decoded, request, results)
        tokens = getattr(self.backend, "generated_tokens", 0) - tokens_before
        return Captions([r or ItemResult(None, "not captioned") for r in results], time.perf_counter() - start, len(good), tokens)

    def _caption_chunk(self, chunk: list[int], decoded: list, request: Caption, results: list) -> None:
        from vlmux.backends.base import OutOfMemory

        try:
            captions = self.backend.caption(
                [decoded[i] for i in chunk], [request.prompts[i] for i in chunk], request.gen
            )
        except Exception as e:  # noqa: BLE001 - one bad batch must not end the worker
            if len(chunk) == 1:
                reason = f"out of device memory even alone: {e}" if isinstance(e, OutOfMemory) else f"{type(e).__name__}: {e}"
                results[chunk[0]] = ItemResult(None, reason)
                return
            # Halve it: a smaller batch may fit where this one ran out of memory, and an image the processor
            # rejects (too small, odd shape) then fails alone instead of taking its batch with it.
            half = len(chunk) // 2
            self._caption_chunk(chunk[:half], decoded, request, results)
            self._caption_chunk(chunk[half:], decoded, request, results)
            return
        for i, caption in zip(chunk, captions):
            results[i] = ItemResult(caption)

    def _chat(self, request: Chat) -> Reply:
        messages, images = [], []
        try:
            for message in request.messages:
                content = message["content"]
                if isinstance(content, str):
                    messages.append(message)
                    continue
                items = []
                for item in content:
                    if item.get("type") == "image":
                        images.append(load_image(item["image"]))
                        items.append({"type": "image"})
                    else:
                        items.append(item)
                messages.append({**message, "content": items})
            return Chatted(self.backend.chat(messages, images, request.gen))
        except (ImageError, KeyError, TypeError) as e:
            return Failed("request", f"bad chat request: {e}")


def _decode(item) -> Image.Image | str:
    try:
        return load_image(item)
    except ImageError as e:
        return str(e)
