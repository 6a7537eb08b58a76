"""The hot tier: models asleep in host RAM stay under PoolConfig.host_ram_budget, least recently used out first."""
from __future__ import annotations

import pytest

from vlmux import ModelPool, ModelSpec, PoolConfig
from vlmux.estimate import estimate
from vlmux.pool.host_tier import host_budget, host_ram, to_evict


def test_the_least_recently_used_sleepers_make_room():
    asleep = [("a", 30, 1.0), ("b", 30, 3.0), ("c", 30, 2.0)]
    assert to_evict("new", 10, asleep, 100) == []
    assert to_evict("new", 20, asleep, 100) == ["a"]
    assert to_evict("new", 50, asleep, 100) == ["a", "c"]
    assert to_evict("new", 100, asleep, 100) == ["a", "c", "b"]
    with pytest.raises(ValueError, match="Raise host_ram_budget, or unload"):
        to_evict("new", 101, asleep, 100)


def test_budgets_read_like_vram_budgets():
    assert host_budget(None) is None
    assert host_budget("2GiB") == 2 * 2**30
    assert host_budget(0.5) == host_ram() // 2


def test_sleeping_past_the_budget_unloads_the_model_asleep_longest(tiny_llava, tiny_qwen):
    sizes = {path: estimate(path, "auto", 1, 64, on_gpu=False).weights for path in (tiny_llava, tiny_qwen)}
    config = PoolConfig(spare_worker=False, host_ram_budget=int(max(sizes.values()) * 1.5))
    with ModelPool(config) as pool:
        llava = pool.load(ModelSpec(str(tiny_llava), device="cpu"))
        qwen = pool.load(ModelSpec(str(tiny_qwen), device="cpu"))
        pool.sleep(llava)
        pool.sleep(qwen)  # both would not fit: llava, asleep longer, goes
        assert llava not in pool and pool.last_release[llava].process_gone
        assert {s.name: s.state for s in pool.status()} == {qwen: "sleeping"}
    with ModelPool(PoolConfig(spare_worker=False, host_ram_budget=sizes[tiny_qwen] // 2)) as pool:
        qwen = pool.load(ModelSpec(str(tiny_qwen), device="cpu"))
        with pytest.raises(ValueError, match="host RAM to sleep"):
            pool.sleep(qwen)
        assert {s.name: s.state for s in pool.status()} == {qwen: "ready"}
