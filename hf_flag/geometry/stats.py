"""Summary statistics of a value over layers or seeds: mean, sample sd, standard error, z of a difference (MATH.md §8).

The one place where hf-flag averages a value over layers or seeds and states its spread: the card and plot readings
(:mod:`hf_flag.integrations.readings`) and the reproduction's verdict rules (``hf_flag.harness.experiments``) call
these functions and do no statistics of their own.

Inputs are sequences of Python floats (a 1-D tensor works too: each element is read with ``float``).  Means and
standard deviations are the standard library's correctly rounded ``statistics.mean`` / ``statistics.stdev``
(exact rational sums), so a value does not depend on the order of the layers.  Below the number of values a
statistic needs, the result is NaN (never an exception), so a rule that needs a spread cannot pass on one value.
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional, Sequence

__all__ = ["finite", "mean", "sample_sd", "standard_error", "mean_and_sd", "mean_and_standard_error",
           "difference_z", "ROUNDING_RTOL"]

#: a mean difference at most this times ``max(1, |baselines|)`` counts as zero when every difference is the same
#: (MATH.md §8): equal rounding-level differences are no difference
ROUNDING_RTOL = 1e-12


def finite(values: Iterable[Optional[float]]) -> list[float]:
    """The finite values as floats (``None``, NaN and +-inf left out)."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, correctly rounded (MATH.md §8); NaN for no values."""
    xs = [float(v) for v in values]
    return statistics.mean(xs) if xs else math.nan


def sample_sd(values: Sequence[float]) -> float:
    """Sample standard deviation, ``n - 1`` degrees of freedom (MATH.md §8); NaN below two values."""
    xs = [float(v) for v in values]
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean, ``sample_sd / sqrt(n)`` (MATH.md §8); NaN below two values."""
    xs = [float(v) for v in values]
    return sample_sd(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


def mean_and_sd(values: Iterable[Optional[float]]) -> tuple[float, float]:
    """``(mean, sample sd)`` of the :func:`finite` values (NaN mean for none, NaN sd below two)."""
    xs = finite(values)
    return mean(xs), sample_sd(xs)


def mean_and_standard_error(values: Iterable[Optional[float]]) -> tuple[float, float]:
    """``(mean, standard error)`` of the :func:`finite` values (NaN mean for none, NaN standard error below two)."""
    xs = finite(values)
    return mean(xs), standard_error(xs)


def difference_z(values: Sequence[float], baselines: Sequence[float]) -> float:
    """``z = mean(d) / (sd(d) / sqrt(L))`` of the differences ``d_l = values_l - baselines_l`` (MATH.md §8).

    NaN below two pairs.  When every difference is the same (``sd = 0``): 0 if the mean difference is at rounding
    level (``|mean| <= ROUNDING_RTOL * max(1, |baselines|)``), else ``+-inf`` with the sign of the mean.  Raises
    ``ValueError`` when the two sequences differ in length.
    """
    if len(values) != len(baselines):
        raise ValueError(f"difference_z: {len(values)} values but {len(baselines)} baselines; pass one per value")
    diffs = [float(v) - float(b) for v, b in zip(values, baselines)]
    if len(diffs) < 2:
        return math.nan
    mean_diff = mean(diffs)
    sd = sample_sd(diffs)
    if sd == 0.0:
        scale = max(1.0, *(abs(float(b)) for b in baselines))
        return 0.0 if abs(mean_diff) <= ROUNDING_RTOL * scale else math.copysign(math.inf, mean_diff)
    return mean_diff / (sd / math.sqrt(len(diffs)))
