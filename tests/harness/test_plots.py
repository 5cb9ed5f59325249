"""hf_flag.harness.plots: the plotted numbers are the report's numbers (checked on the figures' artists), PNGs
written."""
from __future__ import annotations


import numpy as np
import pytest

from hf_flag.harness import plots
from hf_flag.report import Report, Row


def test_layer_series_means_per_layer(report):
    layers, values, baselines = plots.layer_series(report, "vo", "commutator_ratio")
    assert layers == [0, 1]
    # vo rows of layer l: 0.01 (h + 1) + l for h = 0, 1, 2 -> mean 0.02 + l
    assert values == pytest.approx([0.02, 1.02], abs=1e-15)
    assert baselines == pytest.approx([0.2, 0.2])
    assert plots.layer_series(report, "mlp", "intersection_dim") == ([0, 1], [2.0, 3.0], [0.0, 0.0])
    assert plots.layer_series(report, "mlp_gate", "commutator_ratio") == ([], [], [])


def test_layer_series_skips_missing_values():
    rows = [Row("m", "mlp", 0, 0, "a", "b", {"commutator_ratio": None}),
            Row("m", "mlp", 1, 1, "a", "b", {"commutator_ratio": 0.5, "commutator_ratio_baseline": None}),
            Row("m", "mlp", 2, 2, "a", "b", {"commutator_ratio": float("nan")})]
    assert plots.layer_series(Report("m", "x", rows=rows), "mlp", "commutator_ratio") == ([1], [0.5], [None])


def test_head_overlap_matrices_symmetric_with_empty_diagonal(report):
    mats = plots.head_overlap_matrices(report)
    assert sorted(mats) == [0, 1]
    for layer, mat in mats.items():
        assert mat.shape == (3, 3)
        assert np.isnan(np.diag(mat)).all()
        for h in range(3):
            for g in range(3):
                if h != g:
                    assert mat[h, g] == pytest.approx(0.1 * (h + g) + 0.01 * layer)


def test_head_label_without_index_is_a_value_error():
    rows = [Row("m", "head_overlap_o", 0, 0, "first", "second", {"overlap": 0.1})]
    with pytest.raises(ValueError, match="'first'"):
        plots.head_overlap_matrices(Report("m", "x", rows=rows))


def test_by_layer_figure_draws_values_and_dashed_baselines(report):
    fig = plots.figure_by_layer(report, "commutator_ratio")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"mlp", "mlp random baseline", "vo", "vo random baseline"}
    assert list(lines["mlp"].get_xdata()) == [0, 1]
    assert list(lines["mlp"].get_ydata()) == pytest.approx([0.3, 0.4])
    assert list(lines["vo random baseline"].get_ydata()) == pytest.approx([0.2, 0.2])
    assert lines["vo random baseline"].get_linestyle() == "--"
    assert lines["vo random baseline"].get_color() == lines["vo"].get_color()
    assert plots.figure_by_layer(report, "no_such_metric") is None


def test_head_overlap_figure_shows_each_layer(report):
    fig = plots.figure_head_overlap(report)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    expected = plots.head_overlap_matrices(report)
    for image, layer in zip(images, (0, 1)):
        np.testing.assert_array_equal(np.asarray(image.get_array().filled(np.nan)), expected[layer])
    assert "random baseline 0.25" in fig._suptitle.get_text()


def test_save_plots_writes_pngs(report, tmp_path):
    written = plots.save_plots(report, tmp_path / "plots")
    assert {p.name for p in written.values()} == {"head_overlap_o.png", "commutator_ratio.png",
                                                  "intersection_dim.png"}
    for path in written.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only_mlp = Report("m", "x", rows=[r for r in report.rows if r.kind == "mlp"])
    written = plots.save_plots(only_mlp, tmp_path / "mlp_only")
    assert set(written) == {"Commutator ratio by layer", "Intersection dimension by layer"}
    assert plots.save_plots(Report("m", "x"), tmp_path / "empty") == {}
    assert not (tmp_path / "empty").exists()


def test_save_plots_once_reuses_plots_made_for_the_same_key(report, tmp_path):
    first = plots.save_plots_once(report, tmp_path, "fp1")
    inodes = {c: p.stat().st_ino for c, p in first.items()}
    again = plots.save_plots_once(report, tmp_path, "fp1")
    assert again == first and {c: p.stat().st_ino for c, p in again.items()} == inodes  # not redrawn
    redone = plots.save_plots_once(report, tmp_path, "fp2")  # other inputs: drawn again (atomic replace)
    assert redone == first and {c: p.stat().st_ino for c, p in redone.items()} != inodes
    next(iter(first.values())).unlink()
    assert set(plots.save_plots_once(report, tmp_path, "fp2")) == set(first)  # a missing file: redrawn
    assert all(p.is_file() for p in first.values())
