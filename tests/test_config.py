"""The frozen configuration records refuse, at construction, a setting they cannot use, naming it and its value."""
import pytest

from vlmux import PoolConfig


@pytest.mark.parametrize("setting, value, hint", [
    ("vram_budget", "forty", "40GiB"), ("vram_budget", "40", "did you mean 40GiB"), ("host_ram_budget", "lots", "40GiB"),
    ("keep_alive", "5m", "seconds"), ("keep_alive", -1, "None keeps it"),
    ("keep_alive", float("inf"), "seconds"), ("hang_timeout", 0, "more than 0"), ("request_timeout", 0, "None for no limit"),
    ("unload_grace", "5", "seconds"), ("release_timeout", float("nan"), "seconds"), ("wait_for_room", -1, "0 or more"),
    ("warm_spare_linger", None, "seconds"), ("min_residency", -1, "None for auto"), ("max_batch_size", 2.5, "whole"),
    ("max_batch_size", 0, "whole"),
])
def test_pool_config_refuses_what_it_cannot_use_at_construction(setting, value, hint):
    with pytest.raises(ValueError, match=setting) as refused:
        PoolConfig(**{setting: value})
    assert hint in str(refused.value) and repr(value) in str(refused.value)


def test_pool_config_takes_every_form_it_documents():
    config = PoolConfig(vram_budget="40GiB", host_ram_budget=0.5, keep_alive=0, request_timeout=2.5, min_residency=0,
                        max_batch_size=4)
    assert config.vram_budget == "40GiB"
    assert PoolConfig(vram_budget=0.8, keep_alive=None, min_residency=None).keep_alive is None
    assert PoolConfig(vram_budget="80%").vram_budget == "80%" and PoolConfig(vram_budget=3 * 2**30).vram_budget
