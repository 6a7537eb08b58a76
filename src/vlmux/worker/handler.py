"""What a worker does with each request; runs inside the worker process (or in-process with isolation="none")."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import repeat

from PIL import Image

from vlmux.backends.base import Backend, OutOfMemory, PreparedBatch
from vlmux.backends.context import ContextExceeded
from vlmux.estimate import MAX_AUTO_BATCH
from vlmux.images import NOTE, ImageError, check_input, load_image
from vlmux.worker import prep
from vlmux.protocol import (
    Caption, Captions, Chat, Chats, ChatsAnswered, ChatText, Chatted, Done, Failed, Heartbeat, ItemResult, Load, Loaded,
    Reply, Request, Sleep, Wake, Warm,
)

DECODE_THREADS = 8
CPU_BATCH_SIZE = 8  # the auto batch size where device memory bounds nothing: the CPU


def auto_batch_size(fits: int | None) -> int:
    """The worker's own batch size, resolved once at the load: as many images as fit (`Backend.largest_batch`) up to
    MAX_AUTO_BATCH, or CPU_BATCH_SIZE where nothing bounds it (fits None)."""
    return CPU_BATCH_SIZE if fits is None else max(1, min(MAX_AUTO_BATCH, fits))


def capped_batch_size(requested: int | None, auto: int, fits: int | None) -> int:
    """Images per model batch: the requested size (None: `auto`) within what fits (None: no bound), at least 1."""
    size = requested or auto
    return max(1, size if fits is None else min(size, fits))


class Handler:
    def __init__(self) -> None:
        self.backend: Backend | None = None
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="vlmux-decode")
        # One thread: it prepares the next chunk only; its own work waits on the decoder pool, never the reverse.
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="vlmux-prepare")
        self._prep: prep.PrepPool | None = None  # started with the load when asked for, else at a large request
        self._load_request: Load | None = None
        self._batch_size = CPU_BATCH_SIZE  # Loaded.batch_size: a Caption's size when it names none
        self._prepared_apart = 0
        self._notes: dict[int, str] = {}  # item -> what decoding changed (a padded strip), for its result
        self.aborts = Aborts()  # filled by the worker's reader thread while a request runs

    def handle(self, request: Request, send: Callable[[ChatText | Heartbeat], None] | None = None) -> Reply:
        """`send`: how a streamed chat's pieces, and the count of its rows running, reach the caller before the
        reply (None: they are not sent)."""
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
                return self._chat(request, send)
            if isinstance(request, Chats):
                return self._chats(request, send)
            if isinstance(request, Sleep):
                self.backend.sleep()
            elif isinstance(request, Wake):
                self.backend.wake()
        except Exception as e:  # noqa: BLE001 - a failed request must not take the worker, and its model, down
            return Failed("request", f"{type(e).__name__}: {e}")
        return Done(time.perf_counter() - start)

    def after_reply(self, request: Request) -> None:
        """Called once the reply to `request` is on its way: the backend's deferred work, after an answer."""
        for chat in [request] if isinstance(request, Chat) else request.chats if isinstance(request, Chats) else ():
            self.aborts.discard(chat.ident)  # answered: an Abort for it from now on changes nothing
        if self.backend is not None and isinstance(request, (Caption, Chat, Chats)):
            self.backend.after_reply()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self._stop_prep()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._preparer.shutdown(wait=False, cancel_futures=True)

    def _load(self, request: Load, start: float) -> Reply:
        os.environ.update(request.env)
        if request.log is not None:
            request.log.apply()
        from vlmux.backends.choice import backend_for  # the heavy import happens here, not in the parent

        try:
            self.backend = backend_for(request.spec, request.path)
        except Exception as e:  # noqa: BLE001 - any load failure goes back to the caller as a message
            return Failed("load", f"{type(e).__name__}: {e}")
        self._load_request = request
        fits = self.backend.largest_batch(request.max_new_tokens, request.memory_budget)
        self._batch_size = capped_batch_size(request.batch_size, auto_batch_size(fits), fits)
        # Asked for explicitly (a caption job): ready by its first batches. Not started before the load: their
        # imports then compete with the first batches for the host's cores for longer (docs/BENCHMARKS.md).
        if request.spec.prep_processes:
            self._start_prep()
        return Loaded(time.perf_counter() - start, self.backend.device, self.backend.dtype, self.backend.timings,
                      self._batch_size)

    def _warm(self, request: Warm, start: float) -> Reply:
        if self.backend is not None:  # taken for a load before the warm-up's turn came: nothing left to prepare
            return Done(0.0)
        os.environ.update(request.env)
        from vlmux.backends.warm import warm_up

        try:
            warm_up(request.spec, request.path, request.pin_weights)
        except Exception as e:  # noqa: BLE001 - the load that follows will report what is really wrong
            return Failed("warm", f"{type(e).__name__}: {e}")
        return Done(time.perf_counter() - start)

    def _caption(self, request: Caption, start: float) -> Reply:
        """Chunk i generates on the device while chunk i+1 is decoded and preprocessed (in the preparing processes,
        or on the worker's threads)."""
        tokens_before = self.backend.generated_tokens
        self._prepared_apart, self._notes = 0, {}
        fits = self.backend.largest_batch(request.gen.max_new_tokens, self._load_request.memory_budget)
        size = capped_batch_size(request.batch_size, self._batch_size, fits)
        results: list[ItemResult | None] = [None] * len(request.items)
        indices = []
        for index, item in enumerate(request.items):
            reason = check_input(item)
            if reason is None:
                indices.append(index)
            else:  # can never be an image (None, a number, an empty picture): fails alone, takes no batch slot
                results[index] = ItemResult(None, reason, bad_image=True)
        if len(indices) >= prep.MIN_IMAGES:
            self._start_prep()
        chunks = [indices[offset : offset + size] for offset in range(0, len(indices), size)]
        generated, input_wait = 0, 0.0
        ahead = self._preparer.submit(self._prepare, chunks[0], request, size) if chunks else None
        for number in range(len(chunks)):
            current = ahead
            if number + 1 < len(chunks):
                ahead = self._preparer.submit(self._prepare, chunks[number + 1], request, size)
            waited = time.perf_counter()
            images, bad, prepared = current.result()
            current = None  # the future holds the batch too: it must not outlive a batch that did not fit
            input_wait += time.perf_counter() - waited
            for index, reason in bad.items():
                results[index] = ItemResult(None, reason, bad_image=True)
            generated += len(images)
            if images and not self._generate_prepared(images, prepared, request, results):
                prepared = None  # the batch that did not fit leaves the device before its halves are tried
                self._caption_decoded(images, request, results)
        tokens = self.backend.generated_tokens - tokens_before
        results = [replace(r, note=self._notes[i]) if r and r.error is None and i in self._notes else r
                   for i, r in enumerate(results)]
        return Captions([r or ItemResult(None, "not captioned") for r in results], time.perf_counter() - start, generated,
                        tokens, self._prepared_apart, input_wait)

    def _start_prep(self) -> None:
        if self._prep is not None or self._load_request is None or not self.backend.prepares_apart:
            return
        spec, path = self._load_request.spec, self._load_request.path
        processes = prep.auto_processes(self.backend.device) if spec.prep_processes is None else spec.prep_processes
        if processes > 0:
            self._prep = prep.PrepPool(processes, prep.Source(path, spec.trust_remote_code, self.backend.dtype))

    def _stop_prep(self) -> None:
        if self._prep is not None:
            self._prep.close()
            self._prep = None

    def _prepare(self, chunk: list[int], request: Caption, size: int) -> tuple[dict[int, Image.Image | None], dict[int, str], PreparedBatch | None]:
        """On the preparing thread: decode the chunk's images and preprocess them, in the preparing processes when
        they are up (images then maps to None: decoded there, not here), else here on threads."""
        if self._prep is not None and self._prep.ready and len(request.items) >= prep.MIN_IMAGES:
            try:
                return self._prepare_in_processes(chunk, request, size)
            except Exception:  # noqa: BLE001 - the processes failed (said once, on stderr): prepared here, below
                pass
        images, bad = {}, {}
        for index, image in zip(chunk, self._decoder.map(_decode, [request.items[i] for i in chunk], repeat(request.gen.max_pixels))):
            if isinstance(image, str):
                bad[index] = image
            else:
                images[index] = image
                self._keep_note(index, image)
        prepared = None
        if images:
            try:
                prepared = self.backend.prepare(list(images.values()), [request.prompts[i] for i in images], size)
            except Exception:  # noqa: BLE001 - the chunk is retried in halves below, which finds the image at fault
                prepared = None
        return images, bad, prepared

    def _keep_note(self, index: int, image: Image.Image) -> None:
        """What decoding changed in the image (a padded strip), for its result."""
        if NOTE in image.info:
            self._notes[index] = image.info[NOTE]

    def _prepare_in_processes(self, chunk: list[int], request: Caption, size: int) -> tuple[dict[int, None], dict[int, str], PreparedBatch | None]:
        pad_to = size if self.backend.pads_batches else None
        done = self._prep.prepare([request.items[i] for i in chunk], [request.prompts[i] for i in chunk], pad_to,
                                  self.backend.pad_token_id, request.gen.max_pixels)
        bad = {chunk[position]: reason for position, reason in done.bad.items()}
        images = {chunk[position]: None for position in done.good}
        self._notes.update({chunk[position]: note for position, note in done.notes.items()})
        self._prepared_apart += 1
        return images, bad, (self.backend.from_host(done.inputs, done.rows) if done.inputs is not None else None)

    def _generate_prepared(self, images: dict[int, Image.Image | None], prepared: PreparedBatch | None, request: Caption,
                           results: list) -> bool:
        """The prepared batch in one call; False when there is none or it failed (out of memory, a model error)."""
        if prepared is None:
            return False
        try:
            captions = self.backend.generate(prepared, request.gen)
        except Exception:  # noqa: BLE001 - split by the caller, once this exception and its frames are gone
            return False
        for index, caption in zip(images, captions):
            results[index] = ItemResult(caption, batch=len(images))
        return True

    def _caption_decoded(self, images: dict[int, Image.Image | None], request: Caption, results: list) -> None:
        """A chunk whose prepared batch failed, captioned again from its images, halving on failure."""
        missing = [index for index, image in images.items() if image is None]  # decoded in a preparing process
        for index, image in zip(missing, self._decoder.map(_decode, [request.items[i] for i in missing], repeat(request.gen.max_pixels))):
            if isinstance(image, str):
                results[index] = ItemResult(None, image, bad_image=True)
                del images[index]
            else:
                images[index] = image
                self._keep_note(index, image)
        self._caption_chunk(list(images), images, request, results)

    def _caption_chunk(self, chunk: list[int], decoded: dict[int, Image.Image], request: Caption, results: list) -> None:
        try:
            captions = self.backend.caption(
                [decoded[i] for i in chunk], [request.prompts[i] for i in chunk], request.gen
            )
        except Exception as e:  # noqa: BLE001 - one bad batch must not end the worker
            reason = f"out of device memory even alone: {e}" if isinstance(e, OutOfMemory) else f"{type(e).__name__}: {e}"
        else:
            for i, caption in zip(chunk, captions):
                results[i] = ItemResult(caption, batch=len(chunk))
            return
        # Past the except block: the exception's traceback held the failed call's frames, and with them the device
        # memory of its activations, which the halves below need.
        if len(chunk) == 1:
            results[chunk[0]] = ItemResult(None, reason)
            return
        # Halve it: a smaller batch may fit where this one ran out of memory, and an image the processor
        # rejects (too small, odd shape) then fails alone instead of taking its batch with it.
        half = len(chunk) // 2
        self._caption_chunk(chunk[:half], decoded, request, results)
        self._caption_chunk(chunk[half:], decoded, request, results)

    def _chat(self, request: Chat, send: Callable[[ChatText | Heartbeat], None] | None, row: int = 0) -> Reply:
        """row: the conversation's place in its Chats request, for its streamed pieces."""
        if request.ident in self.aborts:  # its caller left before its turn
            return Chatted("", finish_reason="abort")
        try:
            messages, images = self._conversation(request)
            on_text = (lambda text: send(ChatText(text, row))) if request.stream and send is not None else None
            return self.backend.chat(messages, images, request.gen, on_text, _Rows(self.aborts, [request.ident], send),
                                     request.logprobs)
        except (ImageError, KeyError, TypeError) as e:
            return Failed("input", f"bad chat request: {e}")
        except NotImplementedError as e:  # a setting this model cannot honour (logprobs)
            return Failed("input", str(e))
        except ContextExceeded as e:
            return Failed("context", str(e))
        except OutOfMemory as e:
            return Failed("oom", f"out of device memory: {e}")

    def _chats(self, request: Chats, send: Callable[[ChatText | Heartbeat], None] | None) -> Reply:
        """One batch for the conversations that parse; one that does not (a bad image) fails alone, one aborted
        before its turn is not started. A batch that does not fit is answered one conversation at a time."""
        replies: list[Chatted | Failed | None] = [None] * len(request.chats)
        rows, conversations = [], []
        for index, chat in enumerate(request.chats):
            if chat.ident in self.aborts:
                replies[index] = Chatted("", finish_reason="abort")
                continue
            try:
                conversations.append(self._conversation(chat))
                rows.append(index)
            except (ImageError, KeyError, TypeError) as e:
                replies[index] = Failed("input", f"bad chat request: {e}")
        streaming = {row: index for row, index in enumerate(rows) if request.chats[index].stream}

        def on_text(row: int, text: str) -> None:
            if row in streaming:
                send(ChatText(text, streaming[row]))

        try:
            while rows:
                control = _Rows(self.aborts, [request.chats[index].ident for index in rows], send)
                try:
                    answers = self.backend.chat_batch(conversations, request.chats[0].gen,
                                                      on_text if streaming and send is not None else None, control,
                                                      [request.chats[index].logprobs for index in rows])
                except NotImplementedError:  # a setting this model cannot honour: each row alone says which
                    for index in rows:
                        replies[index] = self._chat(request.chats[index], send, index)
                    return ChatsAnswered(replies)
                except ContextExceeded as e:  # those rows fail alone; the others are asked again without them
                    for row in e.rows:
                        replies[rows[row]] = Failed("context", str(e))
                    kept = [row for row in range(len(rows)) if row not in e.rows]
                    rows, conversations = [rows[row] for row in kept], [conversations[row] for row in kept]
                    streaming = {place: index for place, index in enumerate(rows) if request.chats[index].stream}
                    continue
                for index, answer in zip(rows, answers):
                    replies[index] = answer
                break
            return ChatsAnswered(replies)
        except OutOfMemory:
            pass  # answered one at a time below, once the failed batch's frames are gone with the exception
        for index in rows:
            replies[index] = self._chat(request.chats[index], send, index)
        return ChatsAnswered(replies)

    def _conversation(self, request: Chat) -> tuple[list[dict], list[Image.Image]]:
        """The messages with their image items replaced by {"type": "image"}, and the images decoded."""
        messages, images = [], []
        for message in request.messages:
            content = message["content"]
            if isinstance(content, str):
                messages.append(message)
                continue
            items = []
            for item in content:
                if item.get("type") == "image":
                    images.append(load_image(item["image"], max_pixels=request.gen.max_pixels))
                    items.append({"type": "image"})
                else:
                    items.append(item)
            messages.append({**message, "content": items})
        return messages, images


class Aborts:
    """The idents of chats the parent aborted (Abort), added by the worker's reader thread at any time and read by
    the generating thread between steps."""

    KEPT = 4096  # aborts that came after their chat was answered are never discarded by it: the oldest go

    def __init__(self) -> None:
        self._idents: dict[int, None] = {}  # insertion-ordered: the oldest first
        self._lock = threading.Lock()

    def add(self, ident: int) -> None:
        with self._lock:
            self._idents[ident] = None
            if len(self._idents) > self.KEPT:
                del self._idents[next(iter(self._idents))]

    def discard(self, ident: int) -> None:
        with self._lock:
            self._idents.pop(ident, None)

    def __contains__(self, ident: int) -> bool:
        return ident in self._idents


class _Rows:
    """A call's `RowControl`: row i is the chat idents[i]; the count of rows running goes to the caller as a
    Heartbeat whenever it changes."""

    def __init__(self, aborts: Aborts, idents: list[int], send: Callable[[ChatText | Heartbeat], None] | None) -> None:
        self._aborts, self._idents, self._send = aborts, idents, send
        self._told: int | None = None

    def aborted(self, row: int) -> bool:
        return self._idents[row] in self._aborts

    def running(self, rows: int) -> None:
        if rows != self._told and self._send is not None:
            self._told = rows
            self._send(Heartbeat(rows))


def _decode(item, max_pixels: int | None) -> Image.Image | str:
    try:
        return load_image(item, max_pixels=max_pixels)
    except ImageError as e:
        return str(e)
