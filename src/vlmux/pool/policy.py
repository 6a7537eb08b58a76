"""Which model holds a GPU next when two that do not fit side by side both have work: a pure function of what each
one has waiting, what a switch costs and the clock, so it is tested with a fake clock and no worker
(tests/test_policy.py, and `vlmux.testing.mixed_load`, a simulation of a server's mixed load).

The cost model: a switch costs the new model's load plus the drain of the batch the holder has under way. A turn
lasts at least `(1 - switch_share) / switch_share` switch costs, so switching takes at most `switch_share` of the
time; after that the GPU goes to another model once the answers a second it would give, its switch paid, reach the
holder's. No request waits past `max_wait`: the model with the oldest waiting request then gets the GPU whatever the
turn. Models that fit side by side never meet here: the scheduler evicts only for room."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Contender:
    """One model as the policy sees it; times are the clock's (any monotonic seconds)."""

    name: str
    waiting: int  # requests accepted and not yet handed to its worker (for a model not loaded: waiting for its load)
    oldest: float | None  # when its oldest waiting request arrived; None when none waits
    batch_seconds: float  # one batch of its requests, measured (its load's seconds until it has answered once)
    load_seconds: float  # its load, measured (the last one), or estimated before the first
    in_flight: int = 0  # handed to its worker and not yet answered (the holder's drain)
    since: float = 0.0  # the holder: when its turn began (its load finished)


@dataclass(frozen=True)
class Decision:
    holder: str  # the model that holds the GPU next: the present holder, or the one to switch to
    reason: str  # why, for the log: idle, starving, turn, worth, ahead, alone

    def switches_from(self, holder: Contender) -> bool:
        return self.holder != holder.name


@dataclass(frozen=True)
class SwitchPolicy:
    switch_share: float = 0.2  # the most of the time that switches may take (a turn is at least 4 switch costs)
    max_wait: float = 30.0  # seconds a request may wait for its model before that model gets the GPU

    def __post_init__(self) -> None:
        if not 0 < self.switch_share < 1:
            raise ValueError(f"switch_share {self.switch_share!r}: a share of the time between 0 and 1")
        if not self.max_wait > 0:
            raise ValueError(f"max_wait {self.max_wait!r}: seconds, more than 0")

    def switch_cost(self, holder: Contender, to: Contender) -> float:
        """Seconds the GPU answers nothing while `to` replaces `holder`: the holder's batch drains, `to` loads."""
        return to.load_seconds + (holder.batch_seconds if holder.in_flight else 0.0)

    def turn(self, cost: float) -> float:
        """The shortest turn after a switch of `cost` seconds, so that switches take at most `switch_share`."""
        return cost * (1 - self.switch_share) / self.switch_share

    def decide(self, holder: Contender, others: Sequence[Contender], now: float) -> Decision:
        """Whether `holder` keeps the GPU at `now` or which of `others` (models that need its memory) gets it."""
        waiting = [other for other in others if other.waiting and other.oldest is not None]
        if not waiting:
            return Decision(holder.name, "alone")
        first = min(waiting, key=lambda other: other.oldest)
        if not holder.waiting and not holder.in_flight:
            return Decision(first.name, "idle")
        if now - first.oldest >= self.max_wait:
            return Decision(first.name, "starving")
        if now - holder.since < self.turn(self.switch_cost(holder, first)):
            return Decision(holder.name, "turn")
        best = max(waiting, key=lambda other: self._rate_after_switch(holder, other))
        if self._rate_after_switch(holder, best) >= holder.waiting / holder.batch_seconds:
            return Decision(best.name, "worth")
        return Decision(holder.name, "ahead")

    def _rate_after_switch(self, holder: Contender, to: Contender) -> float:
        """Answers a second of `to`'s first batch, counting the switch: what the GPU gets for the change."""
        return to.waiting / (self.switch_cost(holder, to) + to.batch_seconds)
