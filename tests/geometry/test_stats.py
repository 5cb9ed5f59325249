"""hf_flag.geometry.stats (MATH.md §8) against numpy and closed forms, and its callers: the card readings and the
reproduction's rules do no statistics of their own."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_flag.geometry import stats
from hf_flag.harness.experiments import pretrained, rules
from hf_flag.integrations import readings

REPO = Path(__file__).resolve().parents[2]


def test_mean_sd_and_standard_error_match_numpy():
    xs = np.random.default_rng(0).normal(3.0, 2.0, size=11)
    assert stats.mean(list(xs)) == pytest.approx(np.mean(xs), rel=1e-15)
    assert stats.sample_sd(list(xs)) == pytest.approx(np.std(xs, ddof=1), rel=1e-14)
    assert stats.standard_error(list(xs)) == pytest.approx(np.std(xs, ddof=1) / np.sqrt(11), rel=1e-14)
    assert stats.sample_sd(torch.tensor(xs)) == stats.sample_sd(list(xs))  # a 1-D tensor reads the same
    # closed form: 1, 2, 3, 4 -> mean 2.5, sd sqrt(5/3), SE sqrt(5/3) / 2
    assert stats.mean([1, 2, 3, 4]) == 2.5
    assert stats.sample_sd([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    assert stats.standard_error([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-15)


def test_too_few_values_give_nan_not_an_exception():
    assert math.isnan(stats.mean([]))
    assert math.isnan(stats.sample_sd([1.0])) and math.isnan(stats.standard_error([1.0]))
    assert stats.mean([1.0]) == 1.0
    m, s = stats.mean_and_sd([None, float("nan"), 2.0, math.inf])  # one finite value
    assert m == 2.0 and math.isnan(s)
    m, se = stats.mean_and_standard_error([1.0, None, 3.0, float("nan")])
    assert m == 2.0 and se == pytest.approx(1.0)  # sd sqrt(2), n 2
    assert all(math.isnan(v) for v in stats.mean_and_sd([]))


def test_mean_is_correctly_rounded_and_order_free():
    xs = [1e16, 1.0, -1e16, 1.0]  # naive left-to-right summation gives 1.0 / 4, the exact mean is 0.5
    assert stats.mean(xs) == 0.5 and stats.mean(list(reversed(xs))) == 0.5


def test_difference_z_against_its_formula_and_the_zero_spread_rule():
    values, baselines = [0.30, 0.25, 0.40, 0.33], [0.1, 0.12, 0.09, 0.11]
    d = np.subtract(values, baselines)
    assert stats.difference_z(values, baselines) == pytest.approx(d.mean() / (d.std(ddof=1) / 2), rel=1e-13)
    assert stats.difference_z([0.2, 0.2, 0.2], [0.1, 0.1, 0.1]) == math.inf
    assert stats.difference_z([0.0, 0.0], [0.1, 0.1]) == -math.inf
    assert stats.difference_z([0.1, 0.1], [0.1, 0.1]) == 0.0
    assert stats.difference_z([5.0 + 1e-12, 5.0 + 1e-12], [5.0, 5.0]) == 0.0  # rounding level of a baseline of 5
    assert math.isnan(stats.difference_z([0.3], [0.1]))
    with pytest.raises(ValueError, match="3 values but 2 baselines"):
        stats.difference_z([1.0, 2.0, 3.0], [1.0, 2.0])


def test_callers_use_the_shared_helper():
    values, baselines = [0.30, 0.25, 0.40], [0.1, 0.12, 0.09]
    assert readings.z_score(values, baselines) == stats.difference_z(values, baselines)
    assert readings.z_score([0.3], [0.1]) is None and readings.z_score([0.3, 0.2], [None, 0.1]) is None
    assert pretrained.over_layers({0: 1.0, 1: 3.0, 2: float("nan")}) == (2.0, 1.0)
    m, se = pretrained.over_layers({4: 1.5})
    assert m == 1.5 and math.isnan(se)  # one layer: no spread, so no rule that needs one passes
    assert rules.fmt_spread([1.0, 3.0]) == "2 ± 1.41 (2 seeds)"


def test_no_statistics_outside_geometry():
    """Averages over layers/seeds and their spreads come from hf_flag.geometry.stats only (DESIGN: math only in
    geometry): no module outside hf_flag/geometry imports the standard library's statistics."""
    offenders = []
    for folder in ("hf_flag", "harness"):
        for path in (REPO / folder).rglob("*.py"):
            if "geometry" in path.relative_to(REPO).parts:
                continue
            if re.search(r"^\s*(import statistics\b|from statistics import)", path.read_text(), re.M):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
