"""POST /v1/chat/completions, answered whole or as server-sent events. A stream sends a loading notice while the model
loads, keep-alive comments while it waits, the answer's text in pieces as the worker generates it, then the finish
chunk, the usage chunk when asked for, and [DONE]."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from vlmux.protocol import Chatted
from vlmux.serve.errors import ApiError
from vlmux.serve.history import RequestRecord
from vlmux.serve.images import ImagePolicy, worker_messages
from vlmux.serve.limits import check_pixels, check_request, within_deadline
from vlmux.serve.logprobs import content, parse_logprobs
from vlmux.serve.schema import (
    ChatRequest, StopWatch, chunk, completion, completion_id, cut_at_stop, parse_chat, usage, usage_chunk,
)
from vlmux.serve.service import Service
from vlmux.serve.settings import ModelEntry

UNKNOWN_MODEL = "-"  # the model label of requests refused before a served model was named
WAITING_COMMENT_SECONDS = 5.0  # an SSE comment this often while a stream waits, so proxies keep it open
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection first


def chat_routes(service: Service, policy: ImagePolicy, read_json) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        started = time.monotonic()
        entry = None
        try:
            body = await read_json(http)
            named = body.get("model") if isinstance(body, dict) else None
            entry = service.entry(named) if isinstance(named, str) and named in service.listed() else None
            request = replace(parse_chat(body, service.config.max_tokens_limit), logprobs=parse_logprobs(body))
            check_request(request, service.config.limits)
            entry = service.entry(request.model)
            service.admit()
            try:
                messages = await asyncio.to_thread(worker_messages, request.messages, policy, request.stream)
                check_pixels(messages, service.config.limits)
            except BaseException:
                service.leave()
                raise
        except ApiError as e:  # refused at the door (400, 404, 413, 429): counted and listed like answered ones
            _record(service, entry, e.status, started, None, 0, False)
            raise
        if request.stream:
            return StreamingResponse(_stream(service, entry, request, messages, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            reply = await _unless_gone(http, within_deadline(
                service.answer(entry, request, messages, on_loading=lambda: None), service.config.limits))
        except ApiError as e:
            _record(service, entry, e.status, started, None, 0, False)
            raise
        finally:
            service.leave()
        text, finish = _finished(reply, request)
        _record(service, entry, 200, started, time.monotonic(), reply, False)
        body = completion(completion_id(), entry.name, text, finish, usage(reply.prompt_tokens, reply.completion_tokens))
        if reply.logprobs is not None:
            body["choices"][0]["logprobs"] = content(reply.logprobs, text)
        return JSONResponse(body)

    return router


async def _stream(service: Service, entry: ModelEntry, request: ChatRequest, messages: list[dict],
                  started: float) -> AsyncIterator[bytes]:
    ident = completion_id()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # ("loading", "") or ("text", piece)
    job = asyncio.ensure_future(within_deadline(service.answer(
        entry, request, messages, on_loading=lambda: events.put_nowait(("loading", "")),
        on_text=lambda piece: loop.call_soon_threadsafe(events.put_nowait, ("text", piece))), service.config.limits))
    stops = StopWatch(request.stop)
    first: float | None = None
    try:
        while not job.done() or not events.empty():
            event = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({job, event}, timeout=WAITING_COMMENT_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)
            if event not in done:
                event.cancel()
                if not done:
                    yield b": waiting\n\n"
                continue
            kind, piece = event.result()
            if kind == "loading":
                yield _event(chunk(ident, entry.name, {"role": "assistant", "content": ""},
                                   vlmux={"status": "loading", "model": entry.name}))
            elif text := stops.feed(piece):
                first = first or time.monotonic()
                yield _event(chunk(ident, entry.name, {"role": "assistant", "content": text}))
        try:
            reply = job.result()
        except ApiError as e:
            _record(service, entry, e.status, started, None, 0, True)
            yield _event(e.body())
            return
        if text := stops.rest():
            first = first or time.monotonic()
            yield _event(chunk(ident, entry.name, {"role": "assistant", "content": text}))
        if reply.logprobs is not None:  # the answer's tokens in one chunk once it is complete (the text ran ahead)
            tokens = chunk(ident, entry.name, {"role": "assistant", "content": ""})
            tokens["choices"][0]["logprobs"] = content(reply.logprobs, _finished(reply, request)[0])
            yield _event(tokens)
        yield _event(chunk(ident, entry.name, {}, "stop" if stops.stopped else reply.finish_reason))
        if request.include_usage:
            yield _event(usage_chunk(ident, entry.name, usage(reply.prompt_tokens, reply.completion_tokens)))
        yield b"data: [DONE]\n\n"
        _record(service, entry, 200, started, first, reply, True)
    finally:
        service.leave()
        if not job.done():
            job.cancel()  # the client left: its worker stops spending on it within one step (Abort)
            _record(service, entry, CLIENT_GONE, started, first, 0, True)


async def _unless_gone(http: Request, answer: Awaitable[Chatted]) -> Chatted:
    """The answer, unless the client disconnects first: then the answer is cancelled (its worker stops spending on
    it within one step) and the client, gone, is answered nothing (499 in the metrics, as nginx counts it)."""
    job = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnect(http))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.done():
            job.cancel()
    if job.cancelled():
        raise ApiError(CLIENT_GONE, "the client closed the connection before its answer", "client_gone")
    return job.result()


async def _disconnect(http: Request) -> None:
    """Returns once the client has gone: with the body read, the next message is the disconnect."""
    while (await http.receive())["type"] != "http.disconnect":
        continue


def _finished(reply: Chatted, request: ChatRequest) -> tuple[str, str]:
    text, stopped = cut_at_stop(reply.text, request.stop)
    return text, "stop" if stopped else reply.finish_reason


def _event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _record(service: Service, entry: ModelEntry | None, status: int, started: float, first: float | None,
            reply: Chatted | int, stream: bool) -> None:
    """`entry` None: a request refused before its model was known; its label is UNKNOWN_MODEL, never the client's
    text (a label per made-up name would grow the metrics without bound)."""
    now = time.monotonic()
    metrics = service.metrics
    name = UNKNOWN_MODEL if entry is None else entry.name
    metrics.requests.labels(name, str(status)).inc()
    metrics.latency.labels(name).observe(now - started)
    completion_tokens = reply.completion_tokens if isinstance(reply, Chatted) else 0
    if isinstance(reply, Chatted):
        metrics.first_token.labels(name).observe((first or now) - started)
        metrics.tokens.labels(name, "prompt").inc(reply.prompt_tokens)
        metrics.tokens.labels(name, "completion").inc(reply.completion_tokens)
    service.history.request(RequestRecord(time.time(), name, status, round(now - started, 4),
                                          None if first is None else round(first - started, 4), completion_tokens,
                                          stream))
