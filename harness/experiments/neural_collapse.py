"""Claim 3: the Level-2 / Level-3 hierarchy of Neural Collapse (MATH.md §5) on scikit-learn's digits.

An MLP and a small ResNet (:mod:`hf_flag.harness.experiments.digits`) trained with plain SGD on the 1797 digits, with and
without weight decay.  Logged over epochs: NC1-NC4 (:func:`hf_flag.geometry.collapse.neural_collapse`), Level-2
(:func:`~hf_flag.geometry.collapse.level2_alignment`: subspace error ``1 - ||P_W P_M||_F^2 / (C-1)`` and largest
principal angle) and Level-3 (:func:`~hf_flag.geometry.collapse.level3_alignment`: NC3 self-duality, basis score)
alignment of the classifier with the class means, and the commutator ratio of the last two layers (fc1, fc).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from matplotlib.figure import Figure

from hf_flag.harness.experiments import digits
from hf_flag.harness.experiments.common import ClaimResult, fmt, markdown_table

LEVEL2_REACHED = 0.10  # Level-2 reached: subspace error <= 0.10 (Haar baseline 1 - (C-1)/p ~ 0.86 for p = 64)
LEVEL3_REACHED = 0.10  # Level-3 reached: NC3 self-duality <= 0.10 (0 = W^T a positive multiple of M; random ~ 2)


@dataclass(frozen=True)
class CollapseConfig:
    runs: dict = field(default_factory=lambda: dict(digits.FULL_RUNS))
    weight_decays: tuple[float, ...] = digits.WEIGHT_DECAYS

    @classmethod
    def quick(cls) -> "CollapseConfig":
        return cls(runs=dict(digits.QUICK_RUNS))


def results(cfg: "CollapseConfig", *, threads: int, device: Optional[torch.device]) -> list[digits.DigitsResult]:
    """The (cached) digits runs: every architecture at every weight decay."""
    return [digits.train_digits(replace(run, weight_decay=wd), threads, device)
            for run in cfg.runs.values() for wd in cfg.weight_decays]


def _end(r: digits.DigitsResult, key: str) -> float:
    return r.trace.last(key)


def ordered(r: digits.DigitsResult) -> bool:
    """Subspace alignment closer to its ideal than basis alignment: Level-2 error < 1 - basis score."""
    return _end(r, "level2_error") < 1.0 - _end(r, "level3_basis")


def _figure(res: list[digits.DigitsResult]) -> Figure:
    panels = [("nc1", "NC1 tr(Σ_W Σ_B⁺)/C"), ("level2_error", "Level-2 subspace error"),
              ("nc3", "Level-3: NC3 self-duality"), ("level3_basis", "Level-3 basis score"),
              ("kappa_last", "kappa(fc1, fc)"), ("train_error", "training error")]
    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title) in zip(axes, panels):
        for i, r in enumerate(res):
            ax.plot(r.trace.steps, r.trace.values[key], color=f"C{i}",
                    label=f"{r.run.arch}, wd={r.run.weight_decay}")
            if key == "kappa_last":
                ax.axhline(r.baseline_end["kappa_last_baseline"], color=f"C{i}", ls=":", lw=1)
        if key in ("nc1", "train_error"):
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    axes[4].set_title("kappa(fc1, fc); dotted: random-rotation baseline", fontsize=9)
    fig.tight_layout()
    return fig


def run(cfg: CollapseConfig, *, threads: int = 1, device: Optional[torch.device] = None) -> ClaimResult:
    """Judge the claim: supported when, with weight decay, every architecture ends with Level-2 reached
    (subspace error <= LEVEL2_REACHED) while Level-3 is not (NC3 self-duality > LEVEL3_REACHED)."""
    res = results(cfg, threads=threads, device=device)
    with_wd = [r for r in res if r.run.weight_decay > 0]
    if not with_wd:
        raise ValueError(f"neural_collapse: weight_decays {cfg.weight_decays} must include a positive value")
    l2 = {r.run.arch: _end(r, "level2_error") <= LEVEL2_REACHED for r in with_wd}
    l3 = {r.run.arch: _end(r, "nc3") <= LEVEL3_REACHED for r in with_wd}
    supported = all(l2.values()) and not any(l3.values())
    evidence = "; ".join(
        f"{r.run.arch} wd={r.run.weight_decay}: Level-2 error {fmt(_end(r, 'level2_error'))} (max angle "
        f"{fmt(_end(r, 'level2_angle'))} rad), NC3 {fmt(_end(r, 'nc3'))}, basis score {fmt(_end(r, 'level3_basis'))}, "
        f"kappa(fc1, fc) {fmt(_end(r, 'kappa_last'))}, train error {fmt(_end(r, 'train_error'))}" for r in res)
    keys = ["train_error", "nc1", "nc2_etf", "nc2_equinorm", "nc3", "nc4", "level2_error", "level2_angle",
            "level3_basis", "level3_kappa", "kappa_last"]
    table = markdown_table(
        ["arch", "wd", "epochs", "train error", "NC1", "NC2 ETF error", "NC2 equinorm CV", "NC3 self-duality",
         "NC4 mismatch", "Level-2 error", "Level-2 max angle", "Level-3 basis score", "kappa(M, W)",
         "kappa(fc1, fc)", "kappa(fc1, fc) baseline"],
        [[r.run.arch, r.run.weight_decay, r.trace.steps[-1]] + [_end(r, k) for k in keys]
         + [r.baseline_end["kappa_last_baseline"]] for r in res])
    trend = markdown_table(
        ["arch", "wd", "epoch"] + ["Level-2 error", "NC3", "basis score", "kappa(fc1, fc)", "train error"],
        [[r.run.arch, r.run.weight_decay, r.trace.steps[t]] + [r.trace.values[k][t] for k in
                                                               ("level2_error", "nc3", "level3_basis", "kappa_last",
                                                                "train_error")]
         for r in res for t in sorted({0, len(r.trace.steps) // 4, len(r.trace.steps) // 2, len(r.trace.steps) - 1})])
    runs = "; ".join(f"{a}: {r.epochs} epochs, lr {r.lr}, batch {r.batch_size}" for a, r in cfg.runs.items())
    reading = []
    for arch in cfg.runs:
        pair = {r.run.weight_decay: r for r in res if r.run.arch == arch}
        lo, hi = pair[min(pair)], pair[max(pair)]
        reading.append(
            f"- {arch}: with weight decay the Level-2 error ends at {fmt(_end(hi, 'level2_error'))} "
            f"({'reached' if l2[arch] else 'not reached'} by our threshold) vs {fmt(_end(lo, 'level2_error'))} "
            f"without ({'lower' if _end(hi, 'level2_error') < _end(lo, 'level2_error') else 'not lower'} with weight "
            f"decay); NC3 {fmt(_end(hi, 'nc3'))} vs {fmt(_end(lo, 'nc3'))} "
            f"(Level-3 {'reached' if l3[arch] else 'not reached'}); kappa(fc1, fc) {fmt(_end(hi, 'kappa_last'))} "
            f"vs {fmt(_end(lo, 'kappa_last'))} (random-rotation baseline "
            f"{fmt(hi.baseline_end['kappa_last_baseline'])}).")
    body = f"""Setup: scikit-learn digits (1797 8x8 images, 10 classes, pixels standardised), all samples used for training;
plain SGD (no momentum), cross-entropy, seed {next(iter(cfg.runs.values())).seed}; {runs}; weight decay
{list(cfg.weight_decays)}. MLP: 64-128-128 (ReLU) trunk; ResNet: stem conv + {next(iter(cfg.runs.values())).n_blocks}
residual blocks of 16 channels (no BatchNorm) + 2x2 average pool; both then fc1 (-> 64, ReLU; the penultimate
features) and the classifier fc (64 -> 10). Metrics on the whole training set at each logged epoch; Level-2/3 use
the class means centred at the global feature mean.

Thresholds of the verdict (our choice, fixed before the runs): Level-2 reached when the subspace error is
<= {LEVEL2_REACHED} (Haar baseline 1 - 9/64 = 0.86); Level-3 reached when NC3 self-duality <= {LEVEL3_REACHED}
(random pair ~2). The prediction (MATH.md §5): weight decay brings Level-2; the commutator obstruction blocks Level-3
in nonlinear nets, i.e. kappa(fc1, fc) stays away from 0.

End of training:

{table}

Over training (first, 1/4, 1/2, last logged epoch):

{trend}

Reading:
{chr(10).join(reading)}
Ordering of the hierarchy at the end (Level-2 error = 1 - subspace overlap vs Level-3 error = 1 - basis score):
""" + "; ".join(f"{r.run.arch} wd={r.run.weight_decay}: {fmt(_end(r, 'level2_error'))} vs "
                f"{fmt(1 - _end(r, 'level3_basis'))} ({'holds' if ordered(r) else 'fails'})" for r in res) + """.
Whether Level-2 is *reached* depends on how long a run stays in the terminal phase, which our CPU budget limits."""
    return ClaimResult(
        key="neural_collapse", title="3. Neural Collapse: Level-2 reached, Level-3 blocked",
        verdict="supported" if supported else "not supported", evidence=evidence, markdown=body,
        figures={"neural_collapse": _figure(res)},
        data={"runs": [{"arch": r.run.arch, "weight_decay": r.run.weight_decay, "epochs": r.trace.steps,
                        "trace": {k: v for k, v in r.trace.values.items() if not digits.is_block_key(k)},
                        "kappa_last_baseline_end": r.baseline_end["kappa_last_baseline"]} for r in res],
              "ordering_holds": {f"{r.run.arch}/wd={r.run.weight_decay}": ordered(r) for r in res},
              "level2_threshold": LEVEL2_REACHED, "level3_threshold": LEVEL3_REACHED})
