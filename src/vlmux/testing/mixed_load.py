"""A simulation of `vlmux serve`'s mixed load on one GPU that holds one of two models at a time, on a fake clock:
closed-loop clients (each sends its next request as soon as its answer comes), a model answering whole batches in a
time that grows with its size from a fixed part (`SimModel.fixed_share`; 1.0: a batch of one takes as long as a
full one), and switches that cost a drain and a
load, decided by `pool.policy.SwitchPolicy`. Nothing is forked and no time passes; it prints what it measured."""
from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from statistics import median

from vlmux.pool.policy import Contender, Decision, SwitchPolicy

TICK = 0.05  # seconds between looks at the policy when nothing else happens (its turn and wait bounds expire)


@dataclass(frozen=True)
class SimModel:
    name: str
    rate: float  # answers a second alone at the load's concurrency (measured)
    load_seconds: float  # a switch to it, its load and first answer with the old model's memory free (measured)
    max_batch: int  # requests one worker call answers at most
    share: float  # the part of the requests that name it
    # The part of a full batch's time that a batch of one takes too (decode steps bound by reading the weights; the
    # rest grows with the batch: its images' encoding and prefill). 1.0: a batch takes as long whatever its size.
    fixed_share: float = 1.0

    def batch_seconds(self, concurrency: int, size: int | None = None) -> float:
        """A batch of `size` (default: full); alone at `concurrency` its batches are full and it answers `rate` a
        second."""
        full = min(concurrency, self.max_batch)
        part = 1.0 if size is None else min(size, full) / full
        return full / self.rate * (self.fixed_share + (1 - self.fixed_share) * part)


@dataclass
class SimResult:
    answered: int
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    switches: int = 0
    turns: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.answered / self.seconds

    def summary(self, ideal: float) -> str:
        waits = ", ".join(f"{name} p50 {median(values):.1f} s max {max(values):.1f} s"
                          for name, values in sorted(self.latencies.items()) if values)
        return (f"{self.answered} answered in {self.seconds:.1f} s: {self.rate:.2f} answers/s, "
                f"{self.rate / ideal:.0%} of the ideal {ideal:.2f}; {waits}; {self.switches} switches, turns median "
                f"{median(self.turns) if self.turns else 0:.1f} s; decisions {self.reasons}")


class ResidencyThenFirstCome:
    """The rule before `SwitchPolicy`, for comparison: the holder keeps the GPU for its minimum residency (as long as
    its own load took), then a model that waits gets it (an idle holder yields at once)."""

    def decide(self, holder: Contender, others: list[Contender], now: float) -> Decision:
        waiting = sorted((other for other in others if other.waiting), key=lambda other: other.oldest)
        if not waiting:
            return Decision(holder.name, "alone")
        if not holder.waiting or now - holder.since >= holder.load_seconds:
            return Decision(waiting[0].name, "first come")
        return Decision(holder.name, "residency")


def ideal_rate(models: list[SimModel]) -> float:
    """1 / sum(share / rate): each model's share answered at its own rate alone, with no time for switches."""
    return 1 / sum(model.share / model.rate for model in models)


def simulate(models: list[SimModel], policy: SwitchPolicy | ResidencyThenFirstCome, requests: int = 800, concurrency: int = 32,
             seed: int = 0, cut: float = 3600.0) -> SimResult:
    """`requests` sent by `concurrency` closed-loop clients, each naming a model by the models' shares; the run
    stops at `cut` simulated seconds if a policy never lets some request through."""
    rng = random.Random(seed)
    by_name = {model.name: model for model in models}
    batch = {model.name: model.batch_seconds(concurrency) for model in models}
    queues: dict[str, deque[float]] = {model.name: deque() for model in models}  # arrival times
    result = SimResult(0, 0.0, {model.name: [] for model in models})
    events: list[tuple[float, int, str, object]] = []  # (when, order, what, data)
    order = 0
    sent = 0

    def push(when: float, what: str, data: object = None) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (when, order, what, data))

    def send(now: float) -> None:
        nonlocal sent
        if sent < requests:
            sent += 1
            pick = rng.random()
            for model in models:
                pick -= model.share
                if pick < 0 or model is models[-1]:
                    queues[model.name].append(now)
                    break

    for _ in range(concurrency):
        send(0.0)
    holder, since = models[0].name, 0.0  # the first model is loaded when the clients start
    in_flight: list[float] = []  # the holder's batch under way: its requests' arrival times
    busy_until = 0.0  # the worker's batch, or a switch's drain and load
    switching_to: str | None = None
    push(0.0, "tick")
    now = 0.0
    while result.answered < requests and events and now < cut:
        now, _, what, data = heapq.heappop(events)
        if what == "batch_done":
            for arrived in in_flight:
                result.latencies[holder].append(now - arrived)
                result.answered += 1
                send(now)
            in_flight = []
        elif what == "loaded":
            result.turns.append(now - since)
            holder, since, switching_to = data, now, None
        if switching_to is None and now >= busy_until and not in_flight:  # between batches: the policy decides
            if True:
                state = {name: Contender(name, len(queue), queue[0] if queue else None, batch[name],
                                         by_name[name].load_seconds, 0, since) for name, queue in queues.items()}
                decision = policy.decide(state[holder], [c for name, c in state.items() if name != holder], now)
                result.reasons[decision.reason] = result.reasons.get(decision.reason, 0) + 1
                if decision.holder != holder:
                    switching_to = decision.holder
                    result.switches += 1
                    busy_until = now + by_name[decision.holder].load_seconds
                    push(busy_until, "loaded", decision.holder)
                elif queues[holder]:
                    take = min(len(queues[holder]), by_name[holder].max_batch)
                    in_flight = [queues[holder].popleft() for _ in range(take)]
                    busy_until = now + by_name[holder].batch_seconds(concurrency, take)
                    push(busy_until, "batch_done")
        if what == "tick":
            push(now + TICK, "tick")
    result.seconds = now
    return result
