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


def test_kappa_is_read_on_the_pairs_where_it_reads_with_their_count():
    """Review s5 item 6: kappa not reading on some pairs (a singular value under the cut) no longer withholds it on
    the others; value, baseline and z are those of the pairs where it reads, and the card says how many."""
    values = [0.020, 0.021, 0.040, 0.022, 0.045, 0.0215]
    base = [0.025, 0.0255, 0.026, 0.0252, 0.027, 0.0251]
    report = pair_report(values, base, kind="residual", metric="commutator_ratio",
                         details={readings.KAPPA_READS: True})
    for layer in (2, 4):  # the largest excursions, where kappa does not read
        report.rows[layer].details = {readings.KAPPA_READS: False}
    read = [0, 1, 3, 5]
    r = readings.read_metric(report, "residual/commutator_ratio")
    assert (r.pairs, r.of, r.layers) == (4, 6, (0, 1, 3, 5))
    assert r.value == pytest.approx(np.mean([values[i] for i in read]), rel=1e-14)
    assert r.baseline == pytest.approx(np.mean([base[i] for i in read]), rel=1e-14)
    d = np.array([values[i] - base[i] for i in read])
    assert r.z == pytest.approx(stats.ttest_1samp(d, 0.0).statistic, rel=1e-12)
    assert r.verdict == readings.BELOW and "on 2 of 6 pairs" in r.unread and r.why == ""
    selection = readings.select_read(report, "residual/commutator_ratio")
    assert selection.note == "4 of 6 read" and selection.means() == (pytest.approx(r.value), pytest.approx(r.baseline))
    everywhere = readings.read_metric(pair_report(values, base, kind="residual", metric="commutator_ratio",
                                                  details={readings.KAPPA_READS: True}), "residual/commutator_ratio")
    assert (everywhere.pairs, everywhere.of, everywhere.unread) == (6, 6, "")
    assert everywhere.value == pytest.approx(np.mean(values), rel=1e-14)


@pytest.mark.parametrize("rank, n, informative", [(570, 576, True), (571, 576, False), (99, 100, False),
                                                   (98, 100, True), (576, 1536, True)])
def test_range_overlap_is_uninformative_where_a_range_fills_the_hidden_space(rank, n, informative):
    """The rule: chance max(r_l, r_next) / n >= RANGE_FILL_LIMIT = 0.99 (the row's range_overlap_baseline) and the
    value too (MATH.md §3): value and chance both near 1 cannot tell alignment from chance."""
    assert readings.RANGE_FILL_LIMIT == 0.99
    baseline = rank / n  # the Haar baseline max(r_l, r_next) / n
    report = pair_report([min(1.0, baseline + 0.001 * i) for i in range(4)], [baseline] * 4, kind="residual",
                         metric="range_overlap")
    r = readings.read_metric(report, "residual/range_overlap")
    if informative:
        assert r.verdict != readings.UNINFORMATIVE and r.pairs == 4 and r.unread == ""
    else:
        assert r.verdict == readings.UNINFORMATIVE and r.z is not None
        assert "on 4 of 4 pairs the larger range fills at least 99% of the hidden space" in r.why
        assert readings.select_read(report, "residual/range_overlap").note == readings.UNINFORMATIVE


def test_intersection_at_baseline_names_the_cuts():
    rows = [Row("m", "mlp", i, i, "a", "b", {"intersection_dim": 0.0, "intersection_dim_baseline": 0.0},
                {"intersection_cut": c}) for i, c in enumerate((1, 3, 1))]
    reason = readings.intersection_at_baseline(Report("m", "bert", rows=rows))
    assert reason.startswith("on every one of its 3 pairs") and reason.endswith("(c = 1 to 3)")
    rows[1].values["intersection_dim"] = 1.0  # one pair shares a direction beyond general position: plotted
    assert readings.intersection_at_baseline(Report("m", "bert", rows=rows)) == ""
    assert readings.intersection_at_baseline(Report("m", "bert")) == ""


def test_layer_series_means_per_layer():
    report = pair_report([0.1, 0.3], [0.05, 0.07])
    report.rows.append(Row("org/m", "mlp", 1, 1, "c", "d", {"subspace_score": 0.5, "subspace_score_baseline": 0.09}))
    assert readings.layer_series(report, "mlp", "subspace_score") == ([0, 1], [0.1, pytest.approx(0.4)],
                                                                       [0.05, pytest.approx(0.08)])


def test_a_range_overlap_far_below_a_filled_chance_is_read():
    """A 5-dim range placed in the complement of a 571-dim row space of R^576: the overlap is 0 (the floor
    max(0, r_l + r_next - n) / min(r_l, r_next) = 0), far below chance 571/576 > 0.99, so it is read, not called
    uninformative (review: the rule on chance alone hid it); values from the geometry, checked against the
    projector formula ||P_next P_l||_F^2 / min(r) = 0."""
    import torch

    from hf_flag.geometry.pairs import range_overlap_from_grams

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(576, 576, generator=g, dtype=torch.float64))
    W_l = Q[:, :5] @ torch.randn(5, 8, generator=g, dtype=torch.float64)  # range: first 5 directions
    W_next = torch.randn(600, 571, generator=g, dtype=torch.float64) @ Q[:, 5:].T  # rows: the other 571
    overlap, chance = (float(v) for v in range_overlap_from_grams(W_l[None], W_next[None], rtol=(1e-10, 1e-10)))
    assert overlap == pytest.approx(0.0, abs=1e-12) and chance == pytest.approx(571 / 576, rel=1e-12)
    rows = [Row("m", "residual", i, i + 1, "a", "b", {"range_overlap": overlap, "range_overlap_baseline": chance})
            for i in range(4)]
    r = readings.read_metric(Report("m", "x", rows=rows), "residual/range_overlap")
    assert r.verdict == readings.BELOW and r.pairs == 4
