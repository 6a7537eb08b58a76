"""The frozen configuration records refuse, at construction, a setting they cannot use, naming it and its value."""
import pytest

from vlmux import PoolConfig
from vlmux.config import GenerationSpec


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


@pytest.mark.parametrize("settings, named", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"max_new_tokens": "64"}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 0, "do_sample": True}, "do_sample=False"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": None}, "top_p"),
    ({"do_sample": "yes"}, "do_sample"),
    ({"seed": 1.5}, "seed"),
    ({"prompt": None}, "prompt"),
    ({"max_pixels": "200MP"}, "max_pixels"),
])
def test_generation_settings_are_checked_where_they_are_made(settings, named):
    with pytest.raises(ValueError, match=named):
        GenerationSpec(**settings)


def test_good_generation_settings_pass():
    spec = GenerationSpec(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, seed=3, max_pixels=None)
    assert (spec.temperature, spec.top_p, GenerationSpec(temperature=0).temperature) == (0.7, 0.9, 0)
