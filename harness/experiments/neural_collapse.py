"""Claim 3: the Level-2 / Level-3 hierarchy of Neural Collapse (MATH.md §5) on scikit-learn's digits.

An MLP and a small ResNet (:mod:`hf_flag.harness.experiments.digits`) trained with plain SGD on the 1797 digits, with and
without weight decay.  Logged over epochs: NC1-NC4 (:func:`hf_flag.geometry.collapse.neural_collapse`), Level-2
(:func:`~hf_flag.geometry.collapse.level2_alignment`: subspace error ``1 - ||P_W P_M||_F^2 / min(rank W, rank M)``,
Haar value ``1 - max(rank W, rank M) / p`` = 1 - 10/64 here, and largest
principal angle) and Level-3 (:func:`~hf_flag.geometry.collapse.level3_alignment`: NC3 self-duality, basis score)
alignment of the classifier with the class means, and the commutator ratio of the last two layers (fc1, fc).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from matplotlib.figure import Figure

from hf_flag.harness.experiments import digits
from hf_flag.harness.experiments.common import SEEDS, ClaimResult, fmt, markdown_table
from hf_flag.harness.experiments.rules import Rule, fmt_spread, judge

LEVEL2_REACHED = 0.10  # Level-2 reached: subspace error <= 0.10 (Haar value 1 - C/p = 1 - 10/64 for p = 64)
LEVEL3_REACHED = 0.10  # Level-3 reached: NC3 self-duality <= 0.10 (0 = W^T a positive multiple of M; random ~ 2)

RULES = (
    Rule(1, f"with weight decay, every architecture ends with Level-2 reached (subspace error <= {LEVEL2_REACHED}) "
            f"and Level-3 not reached (NC3 self-duality > {LEVEL3_REACHED}) (seed 0)", "first full run"),
    Rule(2, "rule v1 in every seed", "issue #13, before the seeded runs: every verdict over at least 3 seeds"),
)


@dataclass(frozen=True)
class CollapseConfig:
    runs: dict = field(default_factory=lambda: dict(digits.FULL_RUNS))
    weight_decays: tuple[float, ...] = digits.WEIGHT_DECAYS
    seeds: tuple[int, ...] = SEEDS

    @classmethod
    def quick(cls) -> "CollapseConfig":
        return cls(runs=dict(digits.QUICK_RUNS))


def results(cfg: "CollapseConfig", *, threads: int, device: Optional[torch.device]) -> list[digits.DigitsResult]:
    """The (cached) digits runs: every architecture at every weight decay."""
    return [digits.train_digits(replace(run, weight_decay=wd, seed=seed), threads, device)
            for seed in cfg.seeds for run in cfg.runs.values() for wd in cfg.weight_decays]


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
        groups = sorted({(r.run.arch, r.run.weight_decay) for r in res})
        for r in res:
            i = groups.index((r.run.arch, r.run.weight_decay))
            first = r.run.seed == min(q.run.seed for q in res)
            ax.plot(r.trace.steps, r.trace.values[key], color=f"C{i}", alpha=1.0 if first else 0.45,
                    lw=1.5 if first else 0.8, label=f"{r.run.arch}, wd={r.run.weight_decay}" if first else None)
            if key == "kappa_last" and first:
                ax.axhline(r.baseline_end["kappa_last_baseline"], color=f"C{i}", ls=":", lw=1)
        if key in ("nc1", "train_error"):
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7, title="thin lines: other seeds", title_fontsize=7)
    axes[4].set_title("kappa(fc1, fc); dotted: random-rotation baseline", fontsize=9)
    fig.tight_layout()
    return fig


def _checks(with_wd: list[digits.DigitsResult]) -> tuple[bool, dict[str, tuple[bool, bool]]]:
    """Rule v1 on one seed's runs with weight decay: (holds, {arch: (Level-2 reached, Level-3 reached)})."""
    per_arch = {r.run.arch: (_end(r, "level2_error") <= LEVEL2_REACHED, _end(r, "nc3") <= LEVEL3_REACHED)
                for r in with_wd}
    return all(l2 for l2, _ in per_arch.values()) and not any(l3 for _, l3 in per_arch.values()), per_arch


def run(cfg: CollapseConfig, *, threads: int = 1, device: Optional[torch.device] = None) -> ClaimResult:
    """Judge the claim by ``RULES`` (current: v2, the Level-2 / Level-3 thresholds in every seed)."""
    res = results(cfg, threads=threads, device=device)
    if not any(wd > 0 for wd in cfg.weight_decays):
        raise ValueError(f"neural_collapse: weight_decays {cfg.weight_decays} must include a positive value")
    per_seed = {seed: _checks([r for r in res if r.run.seed == seed and r.run.weight_decay > 0])
                for seed in cfg.seeds}
    seed0 = cfg.seeds[0]
    describe = lambda seed: ", ".join(  # noqa: E731
        f"{a} L2 {'yes' if l2 else 'no'} L3 {'yes' if l3 else 'no'}" for a, (l2, l3) in per_seed[seed][1].items())
    verdict, outcomes = judge(RULES, {
        1: lambda: (per_seed[seed0][0], f"seed {seed0}: {describe(seed0)}"),
        2: lambda: (all(ok for ok, _ in per_seed.values()),
                    "; ".join(f"seed {s}: {describe(s)}" for s in cfg.seeds))})
    groups = [(arch, wd, [r for r in res if r.run.arch == arch and r.run.weight_decay == wd])
              for arch in cfg.runs for wd in cfg.weight_decays]
    ends = lambda sel, key: [_end(r, key) for r in sel]  # noqa: E731
    evidence = "; ".join(
        f"{arch} wd={wd}: Level-2 error {fmt_spread(ends(sel, 'level2_error'))} (Haar "
        f"{fmt(_end(sel[0], 'level2_error_baseline'))}), NC3 {fmt_spread(ends(sel, 'nc3'))}"
        for arch, wd, sel in groups)
    keys = ["train_error", "nc1", "nc2_etf", "nc2_equinorm", "nc3", "nc4", "level2_error", "level2_error_baseline",
            "level2_angle", "level3_basis", "level3_kappa", "kappa_last"]
    table = markdown_table(
        ["arch", "wd", "seed", "epochs", "train error", "NC1", "NC2 ETF error", "NC2 equinorm CV", "NC3 self-duality",
         "NC4 mismatch", "Level-2 error", "its Haar value", "Level-2 max angle", "Level-3 basis score",
         "kappa(M, W)", "kappa(fc1, fc)", "kappa(fc1, fc) baseline"],
        [[r.run.arch, r.run.weight_decay, r.run.seed, r.trace.steps[-1]] + [_end(r, k) for k in keys]
         + [r.baseline_end["kappa_last_baseline"]] for r in res])
    spread = markdown_table(
        ["arch", "wd", "Level-2 error", "NC3 self-duality", "Level-3 basis score", "kappa(fc1, fc) / baseline",
         "train error"],
        [[arch, wd, fmt_spread(ends(sel, "level2_error")), fmt_spread(ends(sel, "nc3")),
          fmt_spread(ends(sel, "level3_basis")),
          fmt_spread([_end(r, "kappa_last") / r.baseline_end["kappa_last_baseline"] for r in sel]),
          fmt_spread(ends(sel, "train_error"))] for arch, wd, sel in groups])
    first = [r for r in res if r.run.seed == seed0]
    trend = markdown_table(
        ["arch", "wd", "epoch"] + ["Level-2 error", "NC3", "basis score", "kappa(fc1, fc)", "train error"],
        [[r.run.arch, r.run.weight_decay, r.trace.steps[t]] + [r.trace.values[k][t] for k in
                                                               ("level2_error", "nc3", "level3_basis", "kappa_last",
                                                                "train_error")]
         for r in first for t in sorted({0, len(r.trace.steps) // 4, len(r.trace.steps) // 2,
                                         len(r.trace.steps) - 1})])
    runs = "; ".join(f"{a}: {r.epochs} epochs, lr {r.lr}, batch {r.batch_size}" for a, r in cfg.runs.items())
    base = _end(res[0], "level2_error_baseline")
    body = f"""Setup: scikit-learn digits (1797 8x8 images, 10 classes, pixels standardised), all samples used for training;
plain SGD (no momentum), cross-entropy, seeds {list(cfg.seeds)} (initialisation and batch order); {runs}; weight decay
{list(cfg.weight_decays)}. MLP: 64-128-128 (ReLU) trunk; ResNet: stem conv + {next(iter(cfg.runs.values())).n_blocks}
residual blocks of 16 channels (no BatchNorm) + 2x2 average pool; both then fc1 (-> 64, ReLU; the penultimate
features) and the classifier fc (64 -> 10). Metrics on the whole training set at each logged epoch; Level-2/3 use
the class means centred at the global feature mean.

Thresholds of the verdict (our choice, fixed before the runs): Level-2 reached when the subspace error is
<= {LEVEL2_REACHED} (its Haar value 1 - max(rank W, rank M)/p = 1 - 10/64 = {fmt(base)}, MATH.md §5); Level-3 reached
when NC3 self-duality <= {LEVEL3_REACHED} (random pair ~2). The prediction (MATH.md §5): weight decay brings Level-2;
the commutator obstruction blocks Level-3 in nonlinear nets. kappa(fc1, fc) reads as basis alignment: fc1's weight
(64 x trunk width) has full rank in the 64-dim hidden space (MATH.md §3, `commutator_reading_holds`).

End of training, mean ± sd over seeds:

{spread}

Every run:

{table}

Over training, seed {seed0} (first, 1/4, 1/2, last logged epoch):

{trend}

Ordering of the hierarchy at the end (Level-2 error = 1 - subspace overlap vs Level-3 error = 1 - basis score):
""" + "; ".join(f"{r.run.arch} wd={r.run.weight_decay} seed {r.run.seed}: {fmt(_end(r, 'level2_error'))} vs "
                f"{fmt(1 - _end(r, 'level3_basis'))} ({'holds' if ordered(r) else 'fails'})" for r in res) + """.
Whether Level-2 is *reached* depends on how long a run stays in the terminal phase, which our CPU budget limits."""
    return ClaimResult(
        key="neural_collapse", title="3. Neural Collapse: Level-2 reached, Level-3 blocked",
        verdict=verdict, evidence=evidence, markdown=body, rules=outcomes,
        figures={"neural_collapse": _figure(res)},
        data={"runs": [{"arch": r.run.arch, "weight_decay": r.run.weight_decay, "seed": r.run.seed,
                        "epochs": r.trace.steps,
                        "trace": {k: v for k, v in r.trace.values.items() if not digits.is_block_key(k)},
                        "kappa_last_baseline_end": r.baseline_end["kappa_last_baseline"]} for r in res],
              "ordering_holds": {f"{r.run.arch}/wd={r.run.weight_decay}/seed={r.run.seed}": ordered(r) for r in res},
              "level2_threshold": LEVEL2_REACHED, "level3_threshold": LEVEL3_REACHED})
