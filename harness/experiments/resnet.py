"""Claim 4: the pair diagnostics across the residual blocks of a small ResNet (MATH.md §2-§4).

The ResNet runs of claim 3 (:mod:`hf_flag.harness.experiments.digits`, shared through its cache).  Each residual block's
(conv1, conv2) is one layer pair on the hidden space of conv1's output channels = conv2's input channels:
``W_l`` = conv1 ``(c_mid, c_in, k, k) -> (c_mid, c_in*k*k)`` with conv1's bias appended, ``W_next`` = conv2
``(c_out, c_mid, k, k)`` permuted to ``(c_out, k, k, c_mid)`` and reshaped to ``(c_out*k*k, c_mid)``.  Per block:
the decay rate of ``||diag D||`` and ``||D||_F`` against ``predicted_decay_rate`` (the per-channel ReLU symmetry
makes the diagonal law exact under plain SGD), kappa against its random-rotation baseline, the flag identity
fraction and the transport scores.  The verdict (rule v2) reads the claim, alignment of the blocks' singular
subspaces under weight decay (transport subspace score against the control without weight decay and the Haar
value); the diagonal law, an identity of the ReLU rescaling symmetry, is a sanity check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from matplotlib.figure import Figure

from hf_flag.harness.experiments import digits
from hf_flag.harness.experiments.common import FLAG_TAU, SEEDS, ClaimResult, fmt, markdown_table
from hf_flag.geometry.stats import mean_and_sd
from hf_flag.harness.experiments.rules import Rule, fmt_spread, judge
from hf_flag.geometry.baselines import transport_baselines
from hf_flag.geometry.dynamics import fit_decay_rate, predicted_decay_rate

TOLERANCE = 0.10  # the diagonal imbalance of every block decays within 10% of the predicted rate
KAPPA_FLOOR = 0.5  # obstruction present: final kappa >= 0.5 x its random-rotation baseline
MARGIN_SD = 2.0  # alignment above the Haar value by more than 2 seed standard deviations

RULES = (
    Rule(1, f"with weight decay, every block's ‖diag D‖ decays within {100 * TOLERANCE:.0f}% of -2 log(1 - lr wd) and "
            f"every block's final kappa stays >= {KAPPA_FLOOR} x its random-rotation baseline (seed 0)",
         "first full run; the diagonal law is an identity of the per-channel ReLU symmetry"),
    Rule(2, "in every seed and block, the end-of-training top-k transport subspace score of (conv1, conv2) is higher "
            "with weight decay than without, and its seed mean with weight decay exceeds the Haar value k/n by more "
            "than 2 seed standard deviations; the v1 diagonal law stays a sanity check",
         "issue #13, before the seeded runs: test alignment of singular subspaces under weight decay"),
)


@dataclass(frozen=True)
class ResNetConfig:
    run: digits.DigitsRun = field(default_factory=lambda: digits.FULL_RUNS["resnet"])
    weight_decays: tuple[float, ...] = digits.WEIGHT_DECAYS
    seeds: tuple[int, ...] = SEEDS

    @classmethod
    def quick(cls) -> "ResNetConfig":
        return cls(run=digits.QUICK_RUNS["resnet"])


def block_rows(r: digits.DigitsResult) -> list[dict]:
    """Per block of one run: fitted vs predicted decay rates, kappa / flag / transport at start and end."""
    tr, spe = r.trace, r.steps_per_epoch
    sgd_steps = [e * spe for e in tr.steps]
    predicted, law = predicted_decay_rate("sgd", r.run.lr, r.run.weight_decay, full_batch=False)
    rows = []
    for i in range(r.run.n_blocks):
        v = lambda name: tr.values[f"b{i}_{name}"]  # noqa: E731
        rate_diag, r2_diag = fit_decay_rate(sgd_steps, v("diag"))
        rows.append({
            "block": i, "weight_decay": r.run.weight_decay, "seed": r.run.seed, "predicted": predicted, "law": law,
            "rate_diag": rate_diag, "r2_diag": r2_diag,
            "rate_full": fit_decay_rate(sgd_steps, v("full"))[0],
            "kappa_start": v("kappa")[0], "kappa_end": v("kappa")[-1],
            "kappa_baseline_end": r.baseline_end[f"b{i}_kappa_baseline"],
            "subspace_baseline": transport_baselines(digits.TRANSPORT_K, r.run.channels)[0],
            "flag_id_start": v("flag_id")[0], "flag_id_end": v("flag_id")[-1],
            "subspace_start": v("subspace")[0], "subspace_end": v("subspace")[-1],
            "basis_start": v("basis")[0], "basis_end": v("basis")[-1]})
    return rows


def _figure(res: list[digits.DigitsResult]) -> Figure:
    """Curves of the first seed's runs (the tables give every seed)."""
    res = [r for r in res if r.run.seed == min(q.run.seed for q in res)]
    fig = Figure(figsize=(12, 4))
    ax, ax2, ax3 = fig.subplots(1, 3)
    for j, r in enumerate(res):
        steps = [e * r.steps_per_epoch for e in r.trace.steps]
        for i in range(r.run.n_blocks):
            c, ls = f"C{2 * j + i}", "-"
            lab = f"wd={r.run.weight_decay}, block {i}"
            ax.semilogy(steps, r.trace.values[f"b{i}_diag"], color=c, ls=ls, label=f"{lab}: ‖diag D‖")
            ax.semilogy(steps, r.trace.values[f"b{i}_full"], color=c, ls="--", label=f"{lab}: ‖D‖_F")
            ax2.plot(steps, r.trace.values[f"b{i}_kappa"], color=c, label=lab)
            ax2.axhline(r.baseline_end[f"b{i}_kappa_baseline"], color=c, ls=":", lw=1)
            ax3.plot(steps, r.trace.values[f"b{i}_subspace"], color=c, label=f"{lab}: subspace")
            ax3.plot(steps, r.trace.values[f"b{i}_basis"], color=c, ls="--", label=f"{lab}: basis")
        if r.run.weight_decay > 0:
            d0 = r.trace.values["b0_diag"][0]
            rate = predicted_decay_rate("sgd", r.run.lr, r.run.weight_decay, full_batch=False)[0]
            ax.semilogy(steps, [d0 * math.exp(-rate * s) for s in steps], "k:",
                        label="(1 - lr wd)^(2t) law, block 0")
    ax.set_title(f"Block imbalance (conv1, conv2), seed {res[0].run.seed}", fontsize=9)
    ax2.set_title(f"kappa per block, seed {res[0].run.seed}\n(dotted: random-rotation baseline)", fontsize=9)
    ax3.set_title(f"Transport scores, top-{digits.TRANSPORT_K} window, seed {res[0].run.seed}\n(Haar value of the "
                  f"subspace score {fmt(transport_baselines(digits.TRANSPORT_K, res[0].run.channels)[0])})",
                  fontsize=9)
    for a in (ax, ax2, ax3):
        a.set_xlabel("SGD step")
        a.legend(fontsize=6)
    fig.tight_layout()
    return fig


def run(cfg: ResNetConfig, *, threads: int = 1, device: Optional[torch.device] = None) -> ClaimResult:
    """Judge the claim by ``RULES`` (current: v2, subspace alignment of the residual blocks under weight decay)."""
    if 0.0 not in cfg.weight_decays or not any(wd > 0 for wd in cfg.weight_decays):
        raise ValueError(f"resnet: weight_decays {cfg.weight_decays} must include 0.0 and a positive value")
    res = [digits.train_digits(replace(cfg.run, weight_decay=wd, seed=seed), threads, device)
           for seed in cfg.seeds for wd in cfg.weight_decays]
    rows = [row for r in res for row in block_rows(r)]
    seed0, wd_hi = cfg.seeds[0], max(cfg.weight_decays)
    decayed = [r for r in rows if r["weight_decay"] > 0]
    worst = max(abs(r["rate_diag"] / r["predicted"] - 1) for r in decayed)
    first = [r for r in decayed if r["seed"] == seed0]
    worst0 = max(abs(r["rate_diag"] / r["predicted"] - 1) for r in first)
    obstructed0 = all(r["kappa_end"] >= KAPPA_FLOOR * r["kappa_baseline_end"] for r in first)
    end = {(r["seed"], r["block"], r["weight_decay"]): r for r in rows}
    blocks = sorted({r["block"] for r in rows})
    gains = {b: [end[(s, b, wd_hi)]["subspace_end"] - end[(s, b, 0.0)]["subspace_end"] for s in cfg.seeds]
             for b in blocks}
    hi = {b: mean_and_sd([end[(s, b, wd_hi)]["subspace_end"] for s in cfg.seeds]) for b in blocks}
    base = rows[0]["subspace_baseline"]

    def v2() -> tuple[bool, str]:
        ok = all(all(g > 0 for g in gains[b]) and hi[b][0] - base > MARGIN_SD * hi[b][1] for b in blocks)
        return ok, "; ".join(f"block {b}: gain per seed {', '.join(fmt(g) for g in gains[b])}, end {fmt(hi[b][0])} "
                             f"± {fmt(hi[b][1])} vs Haar {fmt(base)}" for b in blocks)

    verdict, outcomes = judge(RULES, {
        1: lambda: (worst0 <= TOLERANCE and obstructed0,
                    f"diag law worst {100 * worst0:.2g}%, kappa >= {KAPPA_FLOOR} baseline: "
                    f"{'yes' if obstructed0 else 'no'}"),
        2: v2})
    sel = lambda b, wd: [end[(s, b, wd)] for s in cfg.seeds]  # noqa: E731
    evidence = (f"top-{digits.TRANSPORT_K} subspace score at the end, wd {wd_hi} vs 0 (Haar {fmt(base)}): " + "; ".join(
        f"block {b} {fmt_spread([r['subspace_end'] for r in sel(b, wd_hi)])} vs "
        f"{fmt_spread([r['subspace_end'] for r in sel(b, 0.0)])}" for b in blocks)
        + "; kappa / baseline at the end, wd vs 0: " + "; ".join(
        f"block {b} {fmt_spread([r['kappa_end'] / r['kappa_baseline_end'] for r in sel(b, wd_hi)])} vs "
        f"{fmt_spread([r['kappa_end'] / r['kappa_baseline_end'] for r in sel(b, 0.0)])}" for b in blocks)
        + f"; sanity: ‖diag D‖ law within {100 * worst:.2g}% in every seed")
    table = markdown_table(
        ["wd", "seed", "block", "predicted rate", "law", "fitted ‖diag D‖", "R^2", "fitted ‖D‖_F", "kappa start",
         "kappa end", "kappa baseline end", f"flag identity fraction start (tau {FLAG_TAU})", "end",
         "subspace score start", "end", "basis score start", "end"],
        [[r["weight_decay"], r["seed"], r["block"], r["predicted"], r["law"], r["rate_diag"], r["r2_diag"],
          r["rate_full"], r["kappa_start"], r["kappa_end"], r["kappa_baseline_end"], r["flag_id_start"],
          r["flag_id_end"], r["subspace_start"], r["subspace_end"], r["basis_start"], r["basis_end"]] for r in rows])
    spread = markdown_table(
        ["wd", "block", "subspace score end", "basis score end", "kappa / baseline end", "fitted ‖diag D‖ rate"],
        [[wd, b, fmt_spread([r["subspace_end"] for r in sel(b, wd)]), fmt_spread([r["basis_end"] for r in sel(b, wd)]),
          fmt_spread([r["kappa_end"] / r["kappa_baseline_end"] for r in sel(b, wd)]),
          fmt_spread([r["rate_diag"] for r in sel(b, wd)])] for wd in cfg.weight_decays for b in blocks])
    c = cfg.run.channels
    body = f"""How a residual block becomes a layer pair: block = relu(x + conv2(relu(conv1(x)))), 3x3 convolutions with
{c} channels. The shared hidden space is conv1's output channels = conv2's input channels (R^{c}).
W_l = conv1.weight ({c}, {c}, 3, 3) reshaped to ({c}, {c * 9}) with conv1's bias appended as a column (MATH.md §2);
W_next = conv2.weight ({c}, {c}, 3, 3) permuted to (c_out, kh, kw, c_mid) and reshaped to ({c * 9}, {c}), so
W_next^T W_next is the c_mid x c_mid channel Gram matrix summed over output channels and kernel taps. The skip path
adds to conv2's output and is not part of the pair; pairs across blocks (conv2 -> next conv1) are not clean pairs
(the next block also reads the skip), so only within-block pairs are analysed. Both weights have full rank {c} in
the hidden space, so kappa reads as basis alignment (MATH.md §3).

Runs: the ResNet of claim 3 ({cfg.run.epochs} epochs, plain SGD lr {cfg.run.lr}, batch {cfg.run.batch_size}),
weight decay {list(cfg.weight_decays)} (0 is the control), seeds {list(cfg.seeds)}. Rates per SGD step, fitted over all
logged points.

What is tested (rule v2): whether weight decay aligns the singular subspaces of conv1 and conv2 (top-{digits.TRANSPORT_K}
transport subspace score, MATH.md §4, Haar value {digits.TRANSPORT_K}/{c}) beyond the control. Basis alignment is
read from kappa / its random-rotation baseline (1 = no more aligned than chance).

End of training, mean ± sd over seeds:

{spread}

Every run:

{table}

Sanity check (rule v1's first half, an identity): the per-channel ReLU rescaling symmetry makes diag E = 0 for each
block, so ‖diag D‖ follows the (1 - lr wd)^2 law up to the minibatch eta^2 term (MATH.md §2: exact only for full-batch
GD; worst deviation here {100 * worst:.2g}% over seeds and blocks); the full ‖D‖_F has no such law."""
    return ClaimResult(key="resnet", title="4. Residual networks: subspace alignment across residual blocks",
                       verdict=verdict, evidence=evidence, markdown=body, rules=outcomes,
                       figures={"resnet_blocks": _figure(res)},
                       data={"blocks": rows, "diag_rate_worst_relative_error": worst, "subspace_gain_per_seed": gains,
                             "kappa_floor": KAPPA_FLOOR, "tolerance": TOLERANCE})
