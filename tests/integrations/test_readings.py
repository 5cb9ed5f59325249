"""hf_flag.integrations.readings: per-layer series, z against scipy's one-sample t statistic, the fixed verdict rule,
and kappa read only where the rows say its reading holds."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from hf_flag.integrations import readings
from hf_flag.report import Report, Row


def pair_report(values, baselines, kind="mlp", metric="subspace_score", details=None) -> Report:
    rows = [Row("org/m", kind, i, i, "a", "b", {metric: v, f"{metric}_baseline": b}, dict(details or {}))
            for i, (v, b) in enumerate(zip(values, baselines))]
    summary = {f"{kind}/{metric}": float(np.mean(values)), f"{kind}/{metric}_baseline": float(np.mean(baselines))}
    return Report("org/m", "llama", summary=summary, rows=rows)


def test_z_is_the_one_sample_t_statistic_of_the_per_layer_differences():
    rng = np.random.default_rng(0)
    values, baselines = rng.normal(0.3, 0.05, 7), rng.normal(0.25, 0.01, 7)
    expected = stats.ttest_1samp(values - baselines, 0.0).statistic
    assert readings.z_score(list(values), list(baselines)) == pytest.approx(expected, rel=1e-12)
    assert readings.z_score([0.2, 0.2, 0.2], [0.1, 0.1, 0.1]) == math.inf
    assert readings.z_score([0.1, 0.1], [0.1, 0.1]) == 0.0
    assert readings.z_score([0.1], [0.05]) is None and readings.z_score([0.1, 0.2], [None, 0.1]) is None


def test_verdicts_follow_the_stated_rule():
    # the example: 0.0545 vs 0.051 flipped with a fixed 10% rule; with its spread it is no verdict at all
    noisy = pair_report([0.03, 0.08, 0.05, 0.058], [0.051] * 4)
    r = readings.read_metric(noisy, "mlp/subspace_score")
    assert r.value == pytest.approx(0.0545) and r.verdict == readings.RANDOM and abs(r.z) < 3
    assert r.spread == pytest.approx((np.std(r.values, ddof=1), 0.03, 0.08))
    steady = pair_report([0.0562, 0.0561, 0.0563, 0.0562], [0.051] * 4)
    assert readings.read_metric(steady, "mlp/subspace_score").verdict == readings.ABOVE
    below = pair_report([0.01, 0.02, 0.015], [0.05] * 3)
    assert readings.read_metric(below, "mlp/subspace_score").verdict == readings.BELOW
    two = readings.read_metric(pair_report([0.9, 0.91], [0.05, 0.05]), "mlp/subspace_score")
    assert two.verdict == readings.UNDETERMINED and "the rule needs 3" in two.why


def test_kappa_is_read_only_where_the_rows_say_it_reads():
    values, base = [0.01, 0.012, 0.011], [0.2] * 3
    for flag, verdict in ((True, readings.BELOW), (False, readings.NOT_READ), (None, readings.NOT_READ)):
        details = {} if flag is None else {readings.KAPPA_READS: flag}
        r = readings.read_metric(pair_report(values, base, metric="commutator_ratio", details=details),
                                 "mlp/commutator_ratio")
        assert r.verdict == verdict, flag
    assert "range overlap" in readings.read_metric(
        pair_report(values, base, metric="commutator_ratio", details={readings.KAPPA_READS: False}),
        "mlp/commutator_ratio").why
    mixed = pair_report(values, base, metric="commutator_ratio", details={readings.KAPPA_READS: True})
    mixed.rows[1].details = {readings.KAPPA_READS: False}  # one layer of three does not read: none is read
    r = readings.read_metric(mixed, "mlp/commutator_ratio")
    assert r.verdict == readings.NOT_READ and "in 1 of 3 pairs" in r.why


def test_layer_series_means_per_layer():
    report = pair_report([0.1, 0.3], [0.05, 0.07])
    report.rows.append(Row("org/m", "mlp", 1, 1, "c", "d", {"subspace_score": 0.5, "subspace_score_baseline": 0.09}))
    assert readings.layer_series(report, "mlp", "subspace_score") == ([0, 1], [0.1, pytest.approx(0.4)],
                                                                       [0.05, pytest.approx(0.08)])
