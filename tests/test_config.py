import pytest

from vlmux.config import GenerationSpec


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
