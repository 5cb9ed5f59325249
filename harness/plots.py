"""Per-model PNG plots of a :class:`hf_flag.report.Report`, each with its random baseline.

* ``head_overlap_o.png``: per layer, the heads' write-subspace overlap matrix (rows ``head_overlap_o``; MATH.md §1,
  §6), one heatmap per layer on a common colour scale, the Haar baseline in the title;
* ``commutator_ratio.png``: commutator ratio kappa by layer (MATH.md §3) for ``mlp`` and ``vo`` (and ``mlp_gate``
  when present), mean over a layer's rows, with the random-rotation baseline dashed;
* ``intersection_dim.png``: flag intersection dimension by layer (MATH.md §4), with the generic baseline dashed.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas; no pyplot, no global backend state).  The data
extraction (:func:`layer_series`, :func:`head_overlap_matrices`) is separate and pure, so it can be tested.
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
from hf_flag.report import Report, baseline_key
from hf_flag.rows import HEAD_OVERLAP_KINDS, KIND_MLP, KIND_MLP_GATE, KIND_VO, summarize

BY_LAYER_KINDS = (KIND_MLP, KIND_MLP_GATE, KIND_VO)
#: file stem -> (caption, metric) of the by-layer plots
BY_LAYER_PLOTS = {"commutator_ratio": ("Commutator ratio by layer", "commutator_ratio"),
                  "intersection_dim": ("Intersection dimension by layer", "intersection_dim")}
HEAD_OVERLAP_KIND = HEAD_OVERLAP_KINDS["o"]
HEAD_OVERLAP_CAPTION = "Head write-subspace overlap per layer"


def layer_series(report: Report, kind: str, metric: str) -> tuple[list[int], list[float], list[Optional[float]]]:
    """``(layers, means, baseline means)`` of ``metric`` over the ``kind`` rows of each layer (layers where the
    metric is missing are skipped); the means are ``hf_flag.rows.summarize``'s, as in ``Report.summary``."""
    layers, values, baselines = [], [], []
    for layer in sorted({r.layer for r in report.select(kind=kind)}):
        means = summarize(report.select(kind=kind, layer=layer))
        if f"{kind}/{metric}" not in means:
            continue
        layers.append(layer)
        values.append(means[f"{kind}/{metric}"])
        baselines.append(means.get(f"{kind}/{baseline_key(metric)}"))
    return layers, values, baselines


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
    """Grid of per-layer heatmaps (common colour scale), or ``None`` without ``kind`` rows."""
    mats = head_overlap_matrices(report, kind)
    if not mats:
        return None
    ncols = min(6, len(mats))
    nrows = math.ceil(len(mats) / ncols)
    fig = Figure(figsize=(2.2 * ncols + 1.0, 2.2 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.84, bottom=0.04, top=0.86, wspace=0.1, hspace=0.25)
    vmax = max(float(np.nanmax(m)) if np.isfinite(m).any() else 0.0 for m in mats.values()) or 1.0
    image = None
    for ax, (layer, mat) in zip(axes.flat, mats.items()):
        image = ax.imshow(mat, vmin=0.0, vmax=vmax, cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(mats):]:
        ax.set_axis_off()
    fig.colorbar(image, cax=fig.add_axes((0.86, 0.1, 0.02, 0.7)), label="overlap")
    base = summarize(report.select(kind=kind)).get(f"{kind}/{baseline_key('overlap')}")
    fig.suptitle(f"{short_name(report.model)}: {kind} (random baseline {base:.3g})" if base is not None
                 else f"{short_name(report.model)}: {kind}", fontsize=9)
    return fig


def figure_by_layer(report: Report, metric: str, kinds: Sequence[str] = BY_LAYER_KINDS,
                    title: Optional[str] = None) -> Optional[Figure]:
    """``metric`` by layer, one solid line per kind and its baseline dashed in the same colour; ``None`` when no
    kind has the metric."""
    series = {k: layer_series(report, k, metric) for k in kinds}
    series = {k: s for k, s in series.items() if s[0]}
    if not series:
        return None
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.9)
    for i, (kind, (layers, values, baselines)) in enumerate(series.items()):
        color = f"C{i}"
        ax.plot(layers, values, marker="o", color=color, label=kind)
        base = [(l, b) for l, b in zip(layers, baselines) if b is not None]
        if base:
            ax.plot(*zip(*base), linestyle="--", color=color, label=f"{kind} random baseline")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{short_name(report.model)}: {metric}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def save_plots(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write every plot the report has data for into ``out_dir`` (each PNG atomically: temporary file +
    ``os.replace``); returns caption -> PNG path."""
    out_dir = Path(out_dir)
    figures = {HEAD_OVERLAP_CAPTION: (HEAD_OVERLAP_KIND, figure_head_overlap(report))}
    for stem, (caption, metric) in BY_LAYER_PLOTS.items():
        figures[caption] = (stem, figure_by_layer(report, metric, title=f"{short_name(report.model)}: {caption.lower()}"))
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
