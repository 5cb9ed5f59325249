"""hf_flag.harness.plots: the plotted numbers are the report's numbers (checked on the figures' artists), PNGs
written."""
from __future__ import annotations


import numpy as np
import pytest

from hf_flag.harness import plots
from hf_flag.integrations.readings import layer_series
from hf_flag.report import Report, Row
from hf_flag.rows import KIND_LABELS


def test_layer_series_means_per_layer(report):
    layers, values, baselines = layer_series(report, "vo", "commutator_ratio")
    assert layers == [0, 1]
    # vo rows of layer l: 0.01 (h + 1) + l for h = 0, 1, 2 -> mean 0.02 + l
    assert values == pytest.approx([0.02, 1.02], abs=1e-15)
    assert baselines == pytest.approx([0.2, 0.2])
    assert layer_series(report, "mlp", "intersection_dim") == ([0, 1], [2.0, 3.0], [0.0, 0.0])
    assert layer_series(report, "mlp_gate", "commutator_ratio") == ([], [], [])


def test_layer_series_skips_missing_values():
    rows = [Row("m", "mlp", 0, 0, "a", "b", {"commutator_ratio": None}),
            Row("m", "mlp", 1, 1, "a", "b", {"commutator_ratio": 0.5, "commutator_ratio_baseline": None}),
            Row("m", "mlp", 2, 2, "a", "b", {"commutator_ratio": float("nan")})]
    assert layer_series(Report("m", "x", rows=rows), "mlp", "commutator_ratio") == ([1], [0.5], [None])


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


def lines_of(ax) -> dict:
    return {line.get_label().split("\n")[0]: line for line in ax.get_lines()}


def test_by_layer_figure_one_panel_per_pair_kind_with_labelled_baselines(report):
    fig = plots.figure_by_layer(report, "commutator_ratio", ylabel="commutator ratio kappa")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [KIND_LABELS["mlp"], KIND_LABELS["vo"]]
    for ax in panels:
        assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "commutator ratio kappa"
        assert set(lines_of(ax)) == {"value (layer mean)", "random baseline"}
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["random baseline", "value (layer mean)"]
    mlp, vo = (lines_of(ax) for ax in panels)
    assert list(mlp["value (layer mean)"].get_xdata()) == [0, 1]
    assert list(mlp["value (layer mean)"].get_ydata()) == pytest.approx([0.3, 0.4])
    assert list(vo["random baseline"].get_ydata()) == pytest.approx([0.2, 0.2])
    assert vo["random baseline"].get_linestyle() == "--"
    assert plots.figure_by_layer(report, "no_such_metric") is None


def test_missing_layers_are_named_with_the_reason_and_the_cut_stated_without_windows():
    """Review s5 item 7: the intersection dimension is a count at one cut c: each point says its cut, and no
    transport window is drawn beside it."""
    rows = [Row("m", "vo", layer, layer, "head 0", "head 0",
                {"intersection_dim": None if layer in (1, 2) else 0.0, "intersection_dim_baseline": 0.0,
                 "window_in": 4.0 + layer, "window_out": 3.0}, {"intersection_cut": None if layer in (1, 2) else 1})
            for layer in range(4)]
    rows.append(Row("m", "vo", 3, 3, "head 1", "head 1", {"intersection_dim": 0.0, "intersection_dim_baseline": 0.0},
                    {"intersection_cut": 2}))
    fig = plots.figure_by_layer(Report("m", "llama", rows=rows), "intersection_dim",
                                ylabel=plots.BY_LAYER_PLOTS["intersection_dim"][2])
    assert len(fig.axes) == 1  # no second (window) axis
    [panel] = fig.axes
    assert "no value at layers 1, 2: the two flags share no cut below" in panel.get_xlabel()
    assert "at cut c" in panel.get_ylabel()
    value = lines_of(panel)["value (layer mean)"]
    assert np.isnan(value.get_ydata()[1:3]).all() and list(value.get_ydata()[[0, 3]]) == [0.0, 0.0]
    assert value.get_label().endswith("(= baseline at every layer)")
    assert [(t.get_text(), t.xy) for t in panel.texts] == [("c=1", (0, 0.0)), ("c=1-2", (3, 0.0))]
    none = [Row("m", "vo", 0, 0, "h", "h", {"intersection_dim": None}),
            Row("m", "mlp", 0, 0, "a", "b", {"intersection_dim": 1.0})]
    fig = plots.figure_by_layer(Report("m", "x", rows=none), "intersection_dim")
    # a kind with the metric at no layer gets no empty panel: named under the title with the reason
    assert [ax.get_title() for ax in fig.axes] == [KIND_LABELS["mlp"]]
    assert (f"not shown, no value at any layer: {KIND_LABELS['vo']}: the two flags share no cut below the hidden"
            in fig._suptitle.get_text())


def test_head_overlap_figure_ticks_heads_and_marks_the_baseline_on_the_colour_bar(report):
    fig = plots.figure_head_overlap(report)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 2
    expected = plots.head_overlap_matrices(report)
    for ax, layer in zip(heatmaps, (0, 1)):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array().filled(np.nan)), expected[layer])
        assert list(ax.get_xticks()) == [0, 1, 2] and list(ax.get_yticks()) == [0, 1, 2]
        assert ax.get_xlabel() == "head"
    bar = [ax for ax in fig.axes if not ax.images and ax.get_ylabel().startswith("overlap")][0]
    assert [line.get_ydata()[0] for line in bar.get_lines()] == [pytest.approx(0.25)]
    assert "random\n0.25" in [t.get_text() for t in bar.texts]


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


def test_kappa_panels_say_where_kappa_does_not_read_and_the_range_overlap_is_plotted(tmp_path):
    """MATH.md §3: kappa reads as alignment only where a weight has rank n. A panel whose rows record that it
    does not read says so (with the count when only some pairs do not), no window is drawn beside the exact kappa,
    and range_overlap.png plots the measure that reads there, beside its Haar baseline."""
    rows = [Row("m", "mlp", layer, layer, "a", "b",
                {"commutator_ratio": 0.03, "commutator_ratio_baseline": 0.028, "range_overlap": 0.4 + 0.1 * layer,
                 "range_overlap_baseline": 0.375, "window_in": 1.0, "window_out": 0.0},
                {"commutator_reading_holds": False}) for layer in range(3)]
    rows += [Row("m", "residual", layer, layer + 1, "a", "b",
                  {"commutator_ratio": 0.02, "commutator_ratio_baseline": 0.025},
                  {"commutator_reading_holds": layer != 1}) for layer in range(3)]
    rows += [Row("m", "vo", 0, 0, "h", "h", {"commutator_ratio": 0.02, "commutator_ratio_baseline": 0.025},
                 {"commutator_reading_holds": True})]
    report = Report("m", "llama", rows=rows)
    fig = plots.figure_by_layer(report, "commutator_ratio")
    titles = {ax.get_title().split("\n")[0]: ax.get_title() for ax in fig.axes if ax.get_title()}
    assert titles[KIND_LABELS["mlp"]].endswith("kappa does not read as alignment (ranks below n): "
                                              "read the range overlap")
    assert "kappa reads in 2 of 3 pairs (hollow: ranks below n" in titles[KIND_LABELS["residual"]]
    assert titles[KIND_LABELS["vo"]] == KIND_LABELS["vo"]
    assert all(ax.get_title() for ax in fig.axes)  # no window axis beside kappa
    written = plots.save_plots(report, tmp_path / "plots")
    assert "Range overlap by layer" in written
    overlap = plots.figure_by_layer(report, "range_overlap")
    [panel] = [ax for ax in overlap.axes if ax.get_title() == KIND_LABELS["mlp"]]
    assert list(lines_of(panel)["value (layer mean)"].get_ydata()) == pytest.approx([0.4, 0.5, 0.6])
    assert list(lines_of(panel)["random baseline"].get_ydata()) == pytest.approx([0.375] * 3)



def test_layers_where_kappa_does_not_read_have_hollow_markers_with_a_legend_entry():
    """Review s5 item 6: the plot marks the layers where kappa does not read (filled elsewhere)."""
    rows = [Row("m", "residual", layer, layer + 1, "a", "b",
                {"commutator_ratio": 0.02 + 0.01 * layer, "commutator_ratio_baseline": 0.025},
                {"commutator_reading_holds": layer not in (1, 3)}) for layer in range(5)]
    fig = plots.figure_by_layer(Report("m", "llama", rows=rows), "commutator_ratio")
    [panel] = fig.axes
    lines = lines_of(panel)
    assert list(lines["value (layer mean)"].get_markevery()) == [0, 2, 4]  # filled markers where kappa reads
    hollow = lines["kappa does not read here"]
    assert list(hollow.get_xdata()) == [1, 3] and list(hollow.get_ydata()) == pytest.approx([0.03, 0.05])
    assert hollow.get_markerfacecolor() == "white" and hollow.get_linestyle() == "None"
    legend = [t.get_text() for t in panel.get_legend().get_texts()]
    assert "kappa does not read here\n(ranks below n)" in legend
    reading = [Row("m", "vo", 0, 0, "h", "h", {"commutator_ratio": 0.02}, {"commutator_reading_holds": True})]
    [panel] = plots.figure_by_layer(Report("m", "llama", rows=reading), "commutator_ratio").axes
    assert set(lines_of(panel)) == {"value (layer mean)"}


def test_intersection_plot_left_out_when_it_equals_its_baseline_at_every_pair(report, tmp_path):
    for row in report.rows:
        if "intersection_dim" in row.values:
            row.values["intersection_dim"] = row.values["intersection_dim_baseline"]
    assert "Intersection dimension by layer" not in plots.save_plots(report, tmp_path)
    assert not (tmp_path / "intersection_dim.png").exists()
