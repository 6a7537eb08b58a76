"""The switching policy on a fake clock (no worker, no thread): turns that keep switches to a fifth of the time, a
switch once it pays, an idle model yielding at once, no request waiting past the bound; and a simulation of the
server's mixed load (2B and 7B shapes under a budget for one, 80 % to the 2B, 32 closed-loop clients)."""
import pytest

from vlmux.pool.policy import Contender, SwitchPolicy
from vlmux.testing.mixed_load import ResidencyThenFirstCome, SimModel, ideal_rate, simulate

POLICY = SwitchPolicy()  # a fifth of the time for switches at most, no wait past 30 s


def holder(waiting=10, in_flight=0, since=0.0, batch=1.0):
    return Contender("a", waiting, 0.0 if waiting else None, batch, 1.0, in_flight, since)


def other(waiting=10, oldest=0.0, load=1.0, batch=1.0, name="b"):
    return Contender(name, waiting, oldest if waiting else None, batch, load)


def test_a_turn_lasts_four_switch_costs_then_the_gpu_goes_where_it_answers_more():
    assert POLICY.turn(1.0) == pytest.approx(4.0)  # 1 s of switch in 5: a fifth
    assert POLICY.decide(holder(), [other()], now=3.9).reason == "turn"
    assert POLICY.decide(holder(waiting=10), [other(waiting=10)], now=4.1).holder == "a"  # 10/2 s < 10/1 s
    switched = POLICY.decide(holder(waiting=3), [other(waiting=10)], now=4.1)  # 10/2 s > 3/1 s
    assert switched.holder == "b" and switched.reason == "worth"


def test_the_switch_cost_counts_the_holders_drain_and_lengthens_the_turn():
    draining = holder(in_flight=4, batch=2.0)
    assert POLICY.switch_cost(draining, other(load=1.0)) == 3.0
    assert POLICY.decide(draining, [other()], now=11.0).reason == "turn"  # 3 s of switch: a 12 s turn


def test_an_idle_holder_yields_at_once_and_a_holder_alone_keeps_the_gpu():
    assert POLICY.decide(holder(waiting=0), [other()], now=0.1).reason == "idle"
    assert POLICY.decide(holder(), [other(waiting=0)], now=100.0).reason == "alone"


def test_no_request_waits_past_the_bound_whatever_the_turn():
    assert POLICY.decide(holder(waiting=50), [other(waiting=1, oldest=0.0)], now=29.9).holder == "a"
    starving = POLICY.decide(holder(waiting=50), [other(waiting=1, oldest=0.0)], now=30.0)
    assert starving.holder == "b" and starving.reason == "starving"
    # of several waiting, the one waiting longest
    assert POLICY.decide(holder(waiting=0), [other(oldest=5.0), other(oldest=2.0, name="c")], now=6).holder == "c"


def test_settings_it_cannot_use_are_refused():
    with pytest.raises(ValueError, match="switch_share"):
        SwitchPolicy(switch_share=1.0)
    with pytest.raises(ValueError, match="max_wait"):
        SwitchPolicy(max_wait=0)


# The mixed load of issue 33: the 2B answers 24.7 a second alone at concurrency 32 (measured on an H100); a switch
# with the spare awaited takes 1.04 s to the 2B and 1.27 s to the 7B (measured, `pool.switch` + `chat`). Not
# measured, assumed: the 7B alone at 6.2 a second (the 2B's rate scaled by the weights read per decode step, 4.4
# against 17.5 GB) and a batch of one taking half a full batch's time (`fixed_share`).
def mixed_load(fixed_share: float, to_2b: float = 1.04, to_7b: float = 1.27) -> list[SimModel]:
    return [SimModel("2b", 24.7, to_2b, 141, 0.8, fixed_share), SimModel("7b", 6.2, to_7b, 19, 0.2, fixed_share)]


def test_the_mixed_load_gets_60_percent_of_the_ideal_rate_with_every_request_answered_and_none_starved():
    models = mixed_load(fixed_share=0.5)
    ideal = ideal_rate(models)
    result = simulate(models, POLICY, requests=800, concurrency=32)
    before = simulate(models, ResidencyThenFirstCome(), requests=800, concurrency=32)
    print(f"\nswitch policy: {result.summary(ideal)}\nresidency then first come: {before.summary(ideal)}")
    assert result.answered == 800 and sum(len(v) for v in result.latencies.values()) == 800
    assert result.rate >= 0.6 * ideal and result.rate > before.rate
    longest_batch = max(model.batch_seconds(32) for model in models)
    bound = POLICY.max_wait + max(model.load_seconds for model in models) + 2 * longest_batch
    assert max(max(values) for values in result.latencies.values()) < bound
    assert result.switches >= 4  # both models had turns, more than once


def test_the_policy_beats_the_residency_rule_when_a_batch_of_one_takes_as_long_as_a_full_one():
    models = mixed_load(fixed_share=1.0)
    ideal = ideal_rate(models)
    result, before = simulate(models, POLICY), simulate(models, ResidencyThenFirstCome())
    print(f"\nswitch policy: {result.summary(ideal)}\nresidency then first come: {before.summary(ideal)}")
    assert result.answered == before.answered == 800 and result.rate > 1.3 * before.rate
