"""The shared range checks of the scripts' flags and the API's fields (ldm/inference/ranges.py)."""
from __future__ import annotations

import pytest

from ldm.inference import ranges
from ldm.inference.errors import UsageError


@pytest.mark.parametrize("check, value, words", [
    (ranges.guidance_scale, float("nan"), "finite number"),
    (ranges.guidance_scale, 50.5, "between -50 and 50"),
    (ranges.guidance_scale, -51.0, "between -50 and 50"),
    (ranges.eta, -0.1, ">= 0"),
    (ranges.eta, 1.5, "at most 1"),
    (ranges.eta, float("inf"), "finite number"),
    (ranges.strength, 1.01, "between 0 and 1"),
    (ranges.strength, float("nan"), "finite number"),
    (ranges.seed, -1, "between 0 and 2\\*\\*63 - 1"),
    (ranges.seed, 2 ** 63, "between 0 and 2\\*\\*63 - 1"),
])
def test_out_of_range_values_name_their_field(check, value, words):
    with pytest.raises(UsageError, match=f"^my_field must be .*{words}.*got {value}"):
        check("my_field", value)


def test_values_in_range_and_absent_ones_pass():
    for scale in (-50.0, 0.0, 7.5, 50.0):
        ranges.guidance_scale("cfg_scale", scale)
    for value in (None, 0.0, 1.0):
        ranges.eta("eta", value)
        ranges.strength("strength", value)
    for value in (0, 2 ** 63 - 1):
        ranges.seed("seed", value)
    ranges.seed("seed", None, none_means="a random one")
    with pytest.raises(UsageError, match="or None for a random one"):
        ranges.seed("seed", -5, none_means="a random one")
    with pytest.raises(UsageError, match="got None"):
        ranges.seed("--seed", None)  # a script's seed is always a number
    ranges.at_least([("steps", 1, 1), ("n_rows", 0, 0), ("threads", None, 1)])
    with pytest.raises(UsageError, match="^n_rows must be at least 0, got -1$"):
        ranges.at_least([("steps", 3, 1), ("n_rows", -1, 0)])
