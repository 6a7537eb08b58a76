"""A model's dispatcher thread: takes its queued requests in batches (concurrent callers of one model share a
worker call), serves them through its worker and settles each caller's future with its share of the reply."""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

from vlmux.errors import ModelNotLoaded
from vlmux.pool.resident import Request, Resident
from vlmux.errors import WorkerDied
from vlmux.protocol import Caption, Captions, Chat, Chatted, Failed


def dispatch(resident: Resident, max_batch_size: int, wake: Callable[[str], None],
             on_death: Callable[[Resident], None]) -> None:
    """Serve `resident`'s queue until it is closing or its worker dies. `wake(name)` wakes a sleeping model before
    a batch; `on_death(resident)` runs after a worker died and its requests were failed."""
    while True:
        with resident.condition:
            while not resident.pending and resident.state not in ("closing", "dead"):
                resident.condition.wait()
            if resident.state in ("closing", "dead"):
                fail_pending(resident, ModelNotLoaded(f"{resident.name} was unloaded"))
                return
            batch = take_batch(resident, max_batch_size)
            resident.busy = True
        try:
            if resident.state == "asleep":
                wake(resident.name)
            serve(resident, batch)
            resident.requests += len(batch)
            resident.batches += 1
        except WorkerDied as e:
            fail_after_death(resident, batch, e)
            on_death(resident)
            return
        finally:
            resident.busy = False
            resident.last_used = time.monotonic()


def take_batch(resident: Resident, max_batch_size: int) -> list[Request]:
    first = resident.pending.popleft()
    batch = [first]
    if isinstance(first.payload, Caption):
        room = max(max_batch_size, first.size) - first.size
        while resident.pending and isinstance(resident.pending[0].payload, Caption):
            follower = resident.pending[0]
            if follower.payload.gen != first.payload.gen or follower.size > room:
                break
            batch.append(resident.pending.popleft())
            room -= follower.size
    return batch


def serve(resident: Resident, batch: list[Request]) -> None:
    first = batch[0].payload
    if isinstance(first, Chat):
        reply = resident.worker.call(first)
        settle(batch[0].future, reply.text if isinstance(reply, Chatted) else RuntimeError(_message(reply)))
        return
    items = [item for request in batch for item in request.payload.items]
    prompts = [prompt for request in batch for prompt in request.payload.prompts]
    reply = resident.worker.call(Caption(items, prompts, first.gen, first.batch_size))
    if not isinstance(reply, Captions):
        for request in batch:
            settle(request.future, RuntimeError(_message(reply)))
        return
    offset = 0
    for request in batch:
        results = reply.results[offset : offset + request.size]
        share = reply.tokens * request.size // max(1, len(reply.results))  # tokens are counted per worker call
        apart = reply.prepared_apart if offset == 0 else 0  # chunks too: the first caller's share holds them
        settle(request.future, Captions(results, reply.seconds, sum(r.error is None for r in results), share, apart))
        offset += request.size


def fail_after_death(resident: Resident, batch: list[Request], error: WorkerDied) -> None:
    failure = WorkerDied(f"{resident.name}: {error}; the request failed, the next one reloads the model")
    with resident.condition:
        resident.state = "dead"
        for request in batch:
            settle(request.future, failure)
        fail_pending(resident, failure)


def fail_pending(resident: Resident, error: Exception) -> None:
    while resident.pending:
        settle(resident.pending.popleft().future, error)


def settle(future: Future, outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _message(reply) -> str:
    return reply.message if isinstance(reply, Failed) else f"unexpected reply {type(reply).__name__}"
