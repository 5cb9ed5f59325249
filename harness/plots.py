"""Per-model PNG plots of a :class:`hf_flag.report.Report` that a person can read without the code.

* ``commutator_ratio.png``: commutator ratio kappa by layer (MATH.md §3), **one panel per pair kind** (MLP, gated
  MLP, attention value -> output, residual, linear chain), each with its random baseline drawn dashed and labelled;
  layers with a pair where kappa does not read as alignment (MATH.md §3, :func:`hf_flag.integrations.readings.
  select_read`) get hollow markers (with a legend entry), and the panel's title says on how many pairs it reads;
* ``range_overlap.png``: the range overlap by layer (MATH.md §3), the measure that reads on those pairs, with its
  Haar baseline; hollow markers where it is uninformative (the larger range fills the hidden space);
* ``intersection_dim.png``: flag intersection dimension by layer (MATH.md §4), one panel per pair kind, its generic
  baseline dashed and labelled, each point annotated with the cut ``c`` it is taken at, and layers without a value
  named with the reason (the two flags share no cut below the hidden dimension); left out when it equals its
  baseline at every pair (:func:`hf_flag.integrations.readings.intersection_at_baseline`);
* ``head_overlap_o.png``: per layer, the heads' write-subspace overlap matrix (rows ``head_overlap_o``; MATH.md §1,
  §6), one heatmap per layer on a common colour scale, heads ticked on both axes, the Haar baseline marked and
  labelled on the colour bar.

Every axis is labelled in words.  Figures are built with ``matplotlib.figure.Figure`` (Agg canvas; no pyplot, no
global backend state).  The per-layer means are :func:`hf_flag.integrations.readings.layer_series`' (the card's),
and :func:`head_overlap_matrices` is separate and pure, so the plotted numbers can be tested.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hf_flag.atomic import atomic_write
from hf_flag.integrations.readings import RANGE_FILL_LIMIT, intersection_at_baseline, layer_series, select_read
from hf_flag.report import Report, baseline_key
from hf_flag.rows import HEAD_OVERLAP_KINDS, KIND_LABELS, PAIR_KINDS, summarize

#: file stem -> (caption, metric, y-axis label in words) of the by-layer plots
BY_LAYER_PLOTS = {
    "commutator_ratio": ("Commutator ratio by layer", "commutator_ratio",
                         "commutator ratio kappa\n(0 = shared eigenbasis)"),
    "range_overlap": ("Range overlap by layer", "range_overlap",
                      "range overlap\n(1 = one range holds the other)"),
    "intersection_dim": ("Intersection dimension by layer", "intersection_dim",
                         "shared flag directions at cut c\n(intersection dimension)"),
}
#: metrics read only on some pairs (:func:`hf_flag.integrations.readings.select_read`) -> the hollow markers' legend
UNREAD_LEGEND = {"commutator_ratio": "kappa does not read here\n(ranks below n)",
                 "range_overlap": "uninformative here\n(a range fills n)"}
#: why a pair row has no value of a metric (shown in the panel instead of a silent gap)
MISSING_WHY = {"intersection_dim": "the two flags share no cut below\n"
                                   "the hidden dimension (no clear singular-value gap)",
               "commutator_ratio": "not computed for these rows",
               "range_overlap": "kappa reads there (full-rank pairs)"}
HEAD_OVERLAP_KIND = HEAD_OVERLAP_KINDS["o"]
HEAD_OVERLAP_CAPTION = "Head write-subspace overlap per layer"
BASELINE_COLOR = "tab:red"


def _index(label: str) -> int:
    match = re.search(r"(\d+)\s*$", label)
    if match is None:
        raise ValueError(f"row label {label!r}: expected a head label ending in its index, like 'head 3'")
    return int(match.group(1))


def head_overlap_matrices(report: Report, kind: str = HEAD_OVERLAP_KIND) -> dict[int, np.ndarray]:
    """Layer -> symmetric ``(H, H)`` overlap matrix from the ``kind`` rows (``h < h'`` rows mirrored; the
    diagonal, a head with itself, is NaN)."""
    out: dict[int, np.ndarray] = {}
    for layer in sorted({r.layer for r in report.select(kind=kind)}):
        rows = report.select(kind=kind, layer=layer)
        pairs = [(_index(r.source), _index(r.target), r.values.get("overlap")) for r in rows]
        n = max(report.layout.get("n_heads") or 0, 1 + max(max(h, g) for h, g, _ in pairs))
        mat = np.full((n, n), np.nan)
        for h, g, v in pairs:
            mat[h, g] = mat[g, h] = np.nan if v is None else v
        out[layer] = mat
    return out


def short_name(model: str) -> str:
    """A figure title's model name: Hub ids as they are, local paths by their last two components."""
    parts = Path(model).parts
    return model if len(parts) <= 2 else "/".join(parts[-2:])


def figure_head_overlap(report: Report, kind: str = HEAD_OVERLAP_KIND) -> Optional[Figure]:
    """Grid of per-layer heatmaps (common colour scale, heads ticked), the baseline on the colour bar; ``None``
    without ``kind`` rows."""
    mats = head_overlap_matrices(report, kind)
    if not mats:
        return None
    ncols = min(6, len(mats))
    nrows = math.ceil(len(mats) / ncols)
    n_heads = next(iter(mats.values())).shape[0]
    height = 2.4 * nrows + 0.9
    fig = Figure(figsize=(2.4 * ncols + 1.9, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.8, bottom=0.45 / height, top=1 - 0.55 / height, wspace=0.35, hspace=0.45)
    base = summarize(report.select(kind=kind)).get(f"{kind}/{baseline_key('overlap')}")
    finite = [float(np.nanmax(m)) for m in mats.values() if np.isfinite(m).any()]
    vmax = max(finite + ([base] if base is not None else []), default=0.0) or 1.0
    ticks = list(range(n_heads)) if n_heads <= 16 else list(range(0, n_heads, math.ceil(n_heads / 8)))
    image = None
    for i, (ax, (layer, mat)) in enumerate(zip(axes.flat, mats.items())):
        image = ax.imshow(mat, vmin=0.0, vmax=vmax, cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=6)
        if i % ncols == 0:
            ax.set_ylabel("head", fontsize=7)
        if i >= len(mats) - ncols:
            ax.set_xlabel("head", fontsize=7)
    for ax in list(axes.flat)[len(mats):]:
        ax.set_axis_off()
    bar = fig.colorbar(image, cax=fig.add_axes((0.86, 0.45 / height, 0.02, 1 - 1.0 / height)))
    bar.set_label("overlap of the two heads' write subspaces\n(0 = orthogonal, 1 = identical)", fontsize=7)
    if base is not None:
        bar.ax.axhline(base, color=BASELINE_COLOR, linewidth=2)
        bar.ax.text(-0.4, base, f"random\n{base:.3g}", transform=bar.ax.get_yaxis_transform(), color=BASELINE_COLOR,
                    fontsize=7, va="center", ha="right")
    fig.suptitle(f"{short_name(report.model)}: overlap between attention heads' write subspaces, per layer "
                 f"(diagonal: a head with itself, left blank)", fontsize=9)
    return fig


def missing_layers(report: Report, kind: str, metric: str, have: Sequence[int]) -> list[int]:
    """Layers with ``kind`` rows but no value of ``metric``."""
    return sorted({r.layer for r in report.select(kind=kind)} - set(have))


def unread_layers(report: Report, kind: str, metric: str) -> set[int]:
    """Layers with a ``kind`` pair whose ``metric`` does not read (:func:`~hf_flag.integrations.readings.
    select_read`): their markers are drawn hollow."""
    selection = select_read(report, f"{kind}/{metric}")
    read = {id(r) for r in selection.rows}
    return {r.layer for r in selection.valued if id(r) not in read}


def read_caveat(report: Report, kind: str, metric: str) -> str:
    """A panel's title suffix where ``metric`` does not read on every pair (kappa: MATH.md §3; the range overlap:
    uninformative where a range fills the hidden space); ``""`` otherwise."""
    if metric not in UNREAD_LEGEND:
        return ""
    selection = select_read(report, f"{kind}/{metric}")
    if selection.n == selection.of:
        return ""
    if metric == "commutator_ratio":
        if not selection.rows:
            return "\nkappa does not read as alignment (ranks below n): read the range overlap"
        return f"\nkappa reads in {selection.n} of {selection.of} pairs (hollow: ranks below n, read the range overlap)"
    if not selection.rows:
        return f"\nuninformative: the larger range fills the hidden space (max rank / n >= {RANGE_FILL_LIMIT:g})"
    return f"\nreads in {selection.n} of {selection.of} pairs (hollow: a range fills the hidden space)"


def layer_cuts(report: Report, kind: str) -> dict[int, str]:
    """Layer -> the cut(s) ``c`` its intersection dimensions are taken at (``details["intersection_cut"]``), as
    ``"c=1"`` or ``"c=1-3"``."""
    cuts: dict[int, set[int]] = {}
    for r in report.select(kind=kind):
        if r.details.get("intersection_cut") is not None:
            cuts.setdefault(r.layer, set()).add(int(r.details["intersection_cut"]))
    return {layer: f"c={min(c)}" + (f"-{max(c)}" if len(c) > 1 else "") for layer, c in cuts.items()}


def figure_by_layer(report: Report, metric: str, kinds: Sequence[str] = PAIR_KINDS, title: Optional[str] = None,
                    ylabel: Optional[str] = None) -> Optional[Figure]:
    """``metric`` by layer, one panel per pair kind with rows: values (hollow markers where it does not read on a
    pair of the layer), the random baseline dashed and labelled, the intersection dimension's cuts, and the layers
    without a value named with the reason; a kind with rows but the metric at no layer gets no (empty) panel, it is
    named under the title with the reason; ``None`` when no kind has rows or none has the metric anywhere."""
    kinds_with_rows = [k for k in kinds if report.select(kind=k)]
    series = {k: layer_series(report, k, metric) for k in kinds_with_rows}
    panels = [k for k in kinds_with_rows if series[k][0]]
    if not panels:
        return None
    absent = [KIND_LABELS.get(k, k) for k in kinds_with_rows if k not in panels]
    height = 2.3 * len(panels) + 0.9 + 0.25 * bool(absent)
    fig = Figure(figsize=(8.6, height))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    fig.subplots_adjust(left=0.12, right=0.72, bottom=0.55 / height, top=1 - 0.8 / height, hspace=0.8)
    for ax, kind in zip(axes, panels):
        layers, values, baselines = series[kind]
        ax.set_title(KIND_LABELS.get(kind, kind) + read_caveat(report, kind, metric), fontsize=9)
        all_layers = sorted({r.layer for r in report.select(kind=kind)})
        ax.set_xlim(all_layers[0] - 0.5, all_layers[-1] + 0.5)
        missing = missing_layers(report, kind, metric, layers)
        xlabel = "layer"
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            where = f"layer{'s' if len(missing) > 1 else ''} {shown}"
            xlabel += f"   (no value at {where}: {MISSING_WHY.get(metric, 'not computed')})"
        ax.set_xlabel(xlabel, fontsize=7.5)
        ax.set_ylabel(ylabel or metric.replace("_", " "), fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        at = {layer: i for i, layer in enumerate(all_layers)}
        ys, bs = np.full(len(all_layers), np.nan), np.full(len(all_layers), np.nan)
        for layer, v, b in zip(layers, values, baselines):  # NaN at missing layers: the lines break there
            ys[at[layer]], bs[at[layer]] = v, np.nan if b is None else b
        if np.isfinite(bs).any():  # drawn first, wide and pale, so a value equal to it stays visible on top
            ax.plot(all_layers, bs, linestyle="--", linewidth=3.5, color=BASELINE_COLOR, alpha=0.45, marker="_",
                    markersize=16, markeredgewidth=3,
                    label="random baseline", zorder=2)
        same = np.isfinite(bs).any() and bool(np.all(ys[np.isfinite(ys)] == bs[np.isfinite(ys)]))
        unread = unread_layers(report, kind, metric)
        ax.plot(all_layers, ys, marker="o", markersize=3.5, linewidth=1.2, color="C0", zorder=3,
                markevery=[at[layer] for layer in layers if layer not in unread],
                label="value (layer mean)" + ("\n(= baseline at every layer)" if same else ""))
        hollow = [layer for layer in layers if layer in unread]
        if hollow:
            ax.plot(hollow, [ys[at[layer]] for layer in hollow], linestyle="none", marker="o", markersize=5,
                    markerfacecolor="white", markeredgecolor="C0", zorder=4, label=UNREAD_LEGEND[metric])
        if metric == "intersection_dim":  # the value is a count at one cut: say which
            cuts = layer_cuts(report, kind)
            for layer in layers:
                if layer in cuts:
                    ax.annotate(cuts[layer], (layer, ys[at[layer]]), textcoords="offset points", xytext=(0, 5),
                                ha="center", fontsize=6, color="C0")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    heading = title or f"{short_name(report.model)}: {metric.replace('_', ' ')} by layer"
    if absent:
        reason = MISSING_WHY.get(metric, "not computed").replace("\n", " ")
        heading += f"\n(not shown, no value at any layer: {', '.join(absent)}: {reason})"
    fig.suptitle(heading, fontsize=10)
    return fig


def save_plots(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write every plot the report has data for into ``out_dir`` (each PNG atomically: temporary file +
    ``os.replace``); returns caption -> PNG path."""
    out_dir = Path(out_dir)
    figures = {HEAD_OVERLAP_CAPTION: (HEAD_OVERLAP_KIND, figure_head_overlap(report))}
    for stem, (caption, metric, ylabel) in BY_LAYER_PLOTS.items():
        if metric == "intersection_dim" and intersection_at_baseline(report):
            continue  # the baseline alone: the card says why it is left out
        title = f"{short_name(report.model)}: {caption.lower()}"
        figures[caption] = (stem, figure_by_layer(report, metric, title=title, ylabel=ylabel))
    written = {}
    for caption, (stem, fig) in figures.items():
        if fig is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stem}.png"
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=100, format="png"))
        written[caption] = path
    return written


MANIFEST = "plots.json"


def save_plots_once(report: Report, out_dir: str | Path, key: str) -> dict[str, Path]:
    """:func:`save_plots` unless ``out_dir`` already holds the plots made for ``key`` (e.g. the run's fingerprint):
    the sweep plots each model in the process that analysed it, and the merging process reuses them."""
    import json

    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        if manifest["key"] == key and all((out_dir / f).is_file() for f in manifest["plots"].values()):
            return {caption: out_dir / f for caption, f in manifest["plots"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no usable manifest: plot
    written = save_plots(report, out_dir)
    if written:
        from hf_flag.harness.schedule import atomic_write_json

        atomic_write_json(out_dir / MANIFEST, {"key": key, "plots": {c: p.name for c, p in written.items()}})
    return written
