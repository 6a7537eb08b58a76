"""Budgets as users write them: resolved against a total, and anything else refused where it is written."""
import pytest

from vlmux.budget import parse_budget

TOTAL = 80 * 2**30


def test_fractions_percentages_sizes_and_bytes_resolve_against_the_total():
    assert parse_budget(0.5, TOTAL) == 40 * 2**30
    assert parse_budget("0.25", TOTAL) == 20 * 2**30
    assert parse_budget("10GiB", TOTAL) == 10 * 2**30 and parse_budget("10 gib", TOTAL) == 10 * 2**30
    assert parse_budget("1500MiB", TOTAL) == 1500 * 2**20 and parse_budget("2GB", TOTAL) == 2 * 10**9
    assert parse_budget("50%", TOTAL) == 40 * 2**30
    assert parse_budget(3 * 2**30, TOTAL) == 3 * 2**30  # the Python API's int: bytes
    assert parse_budget(1, TOTAL) == TOTAL


@pytest.mark.parametrize("budget, why", [
    ("40", "did you mean 40GiB"), (40.0, "did you mean 40GiB"), ("forty", "not a number"), ("40XB", "not a number"),
    ("0", "more than 0"), (0, "more than 0"), ("-1GiB", "more than 0"), ("nan", "finite"), ("120%", "more than 100%"),
    (True, "not a budget"), ([0.5], "not a budget"),
])
def test_a_budget_that_cannot_be_meant_is_refused_naming_it_and_the_forms_to_write(budget, why):
    with pytest.raises(ValueError, match="40GiB") as refused:
        parse_budget(budget, TOTAL)
    assert why in str(refused.value) and repr(budget) in str(refused.value)
