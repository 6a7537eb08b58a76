"""A simulation of `vlmux serve`'s mixed load on one GPU that holds one of two models at a time, on a fake clock:
closed-loop clients (each sends its next request as soon as its answer comes), a model answering whole batches in a
fixed time (memory-bound decode: a batch of one takes as long as a full one), and switches that cost a drain and a
load, decided by `pool.policy.SwitchPolicy`. Nothing is forked and no time passes; it prints what it measured."""
from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from statistics import median

from vlmux.pool.policy import Contender, SwitchPolicy

TICK = 0.05  # seconds between looks at the policy when nothing else happens (its turn and wait bounds expire)


@dataclass(frozen=True)
class SimModel:
    name: str
    rate: float  # answers a second alone at the load's concurrency (measured)
    load_seconds: float  # a switch to it, its load and first answer with the old model's memory free (measured)
    max_batch: int  # requests one worker call answers at most
    share: float  # the part of the requests that name it

    def batch_seconds(self, concurrency: int) -> float:
        """One batch's time: alone at `concurrency`, its batches are full and it answers `rate` a second."""
        return min(concurrency, self.max_batch) / self.rate


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


def ideal_rate(models: list[SimModel]) -> float:
    """1 / sum(share / rate): each model's share answered at its own rate alone, with no time for switches."""
    return 1 / sum(model.share / model.rate for model in models)


def simulate(models: list[SimModel], policy: SwitchPolicy, requests: int = 800, concurrency: int = 32,
             seed: int = 0) -> SimResult:
    """`requests` sent by `concurrency` closed-loop clients, each naming a model by the models' shares."""
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
    while result.answered < requests and events:
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
        if switching_to is None and now >= busy_until and not in_flight:
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
                    busy_until = now + batch[holder]
                    push(busy_until, "batch_done")
        if what == "tick" and result.answered < requests:
            push(now + TICK, "tick")
    result.seconds = now
    return result
