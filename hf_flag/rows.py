"""The row vocabulary and what every consumer does with rows (ground floor, beside :mod:`hf_flag.report`).

Row kinds (what :func:`hf_flag.analyze` produces; documented with their values in :mod:`hf_flag.analysis.api`):

* pair kinds ``"mlp"``, ``"mlp_gate"``, ``"vo"``, ``"residual"``, ``"linear_chain"`` (MATH.md §2-§4);
* head-overlap kinds ``"head_overlap_{q,k,v,o}"`` and ``"cross_layer_overlap_{q,k,v}"`` (§1, §6);
* composition kinds ``"composition_{q,k,v}"`` (§6).

The CLI table, cards, plots, the sweep, the experiments, the evaluate modules and the callback take these names,
the headline and table metrics, the summary, the table cells' number format, the canonical row order and the merge
of layer shards from here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from hf_flag.geometry.stats import mean
from hf_flag.report import Report, Row

KIND_MLP = "mlp"
KIND_MLP_GATE = "mlp_gate"
KIND_VO = "vo"
KIND_RESIDUAL = "residual"
KIND_LINEAR_CHAIN = "linear_chain"
PAIR_KINDS = (KIND_MLP, KIND_MLP_GATE, KIND_VO, KIND_RESIDUAL, KIND_LINEAR_CHAIN)
HEAD_OVERLAP_KINDS = {s: f"head_overlap_{s}" for s in ("q", "k", "v", "o")}
CROSS_LAYER_KINDS = {s: f"cross_layer_overlap_{s}" for s in ("q", "k", "v")}
COMPOSITION_KINDS = {s: f"composition_{s}" for s in ("q", "k", "v")}
ROW_KINDS = PAIR_KINDS + tuple(HEAD_OVERLAP_KINDS.values()) + tuple(CROSS_LAYER_KINDS.values()) + tuple(
    COMPOSITION_KINDS.values())

#: human-readable name of each row kind (model cards, plots)
KIND_LABELS = {
    KIND_MLP: "MLP", KIND_MLP_GATE: "gated MLP (gate/down)", KIND_VO: "attention V-O",
    KIND_RESIDUAL: "residual (MLP out/in)", KIND_LINEAR_CHAIN: "linear chain",
    HEAD_OVERLAP_KINDS["o"]: "head write-subspace overlap", HEAD_OVERLAP_KINDS["q"]: "head query-subspace overlap",
    HEAD_OVERLAP_KINDS["k"]: "head key-subspace overlap", HEAD_OVERLAP_KINDS["v"]: "head value-subspace overlap",
    CROSS_LAYER_KINDS["q"]: "cross-layer write/query overlap", CROSS_LAYER_KINDS["k"]: "cross-layer write/key overlap",
    CROSS_LAYER_KINDS["v"]: "cross-layer write/value overlap",
    COMPOSITION_KINDS["q"]: "Q-composition", COMPOSITION_KINDS["k"]: "K-composition",
    COMPOSITION_KINDS["v"]: "V-composition",
}

#: the pair rows' ``details`` key saying whether kappa reads as alignment there (MATH.md §3,
#: ``geometry.pairs.commutator_reading_holds``)
KAPPA_READS = "commutator_reading_holds"

#: ordered ``kind/metric`` summary keys for model cards and tables (present ones only are shown)
HEADLINE_METRICS = (
    "mlp/commutator_ratio", "mlp/commutator_ratio_baseline", "mlp/range_overlap", "mlp/range_overlap_baseline",
    "mlp/subspace_score", "mlp/subspace_score_baseline", "mlp_gate/commutator_ratio", "mlp_gate/range_overlap",
    "vo/commutator_ratio", "vo/commutator_ratio_baseline", "residual/commutator_ratio",
    "residual/range_overlap", "residual/range_overlap_baseline",
    "linear_chain/commutator_ratio", "linear_chain/commutator_ratio_baseline",
    "head_overlap_o/overlap", "head_overlap_o/overlap_baseline", "head_overlap_q/overlap",
    "cross_layer_overlap_q/overlap", "composition_q/score", "composition_q/score_baseline", "composition_v/score",
)
PAIR_TABLE_METRICS = ("commutator_ratio", "range_overlap", "relative_imbalance", "subspace_score", "basis_score",
                      "intersection_dim")


def table_metrics(kind: str) -> tuple[str, ...]:
    """Metrics the CLI table shows for ``kind`` (each beside its baseline)."""
    if kind in PAIR_KINDS:
        return PAIR_TABLE_METRICS
    if kind in COMPOSITION_KINDS.values():
        return ("score",)
    return ("overlap", "overlap_zscore")


def summarize(rows: Sequence[Row]) -> dict[str, float]:
    """``summary["kind/metric"]`` = mean of the finite values of ``metric`` over the rows of ``kind``, correctly
    rounded (:func:`hf_flag.geometry.stats.mean`, MATH.md §8: the value does not depend on the order of the rows;
    ``geometry.stats`` is pure Python, the one geometry module the row vocabulary imports)."""
    values: dict[str, list[float]] = {}
    for r in rows:
        for m, v in r.values.items():
            if v is not None and math.isfinite(v):
                values.setdefault(f"{r.kind}/{m}", []).append(float(v))
    return {k: mean(vs) for k, vs in values.items()}


def format_value(value: Optional[float]) -> str:
    """A table cell (CLI table, sweep summary): 4 significant digits, ``-`` for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


def sort_rows(rows: list[Row], kind_order: Sequence[str] = ROW_KINDS) -> list[Row]:
    """Canonical row order (``kind_order``, then layers, then head numbers): independent of sharding."""
    rank = {k: i for i, k in enumerate(kind_order)}

    def key(r: Row) -> tuple:
        return (rank[r.kind], r.layer, r.target_layer, natural(r.source), natural(r.target))
    return sorted(rows, key=key)


def natural(label: str) -> tuple:
    """``"head 10"`` sorts after ``"head 9"``."""
    return tuple(int(t) if t.isdigit() else t for t in label.replace(".", " ").split())


def merge_shards(reports: Sequence[Report]) -> Report:
    """One report from the layer-shard reports of one model: rows concatenated in the canonical order
    (:func:`sort_rows`), summary recomputed by :func:`summarize` (as ``analyze`` does), params of the first shard
    with the merged layer list."""
    if not reports:
        raise ValueError("merge_shards: no shard reports to merge")
    first = reports[0]
    rows = sort_rows([r for rep in reports for r in rep.rows])
    params = dict(first.params)
    params["layers"] = sorted({i for rep in reports for i in rep.params.get("layers", [])})
    params["layers_requested"] = None
    params["shards"] = [rep.params.get("layers") for rep in reports]
    params["elapsed_s"] = sum(rep.params.get("elapsed_s", 0.0) for rep in reports)
    return Report(model=first.model, architecture=first.architecture, layout=dict(first.layout), params=params,
                  summary=summarize(rows), rows=rows)
