"""Claim 4: the pair diagnostics across the residual blocks of a small ResNet (MATH.md §2-§4).

The ResNet runs of claim 3 (:mod:`hf_flag.harness.experiments.digits`, shared through its cache).  Each residual block's
(conv1, conv2) is one layer pair on the hidden space of conv1's output channels = conv2's input channels:
``W_l`` = conv1 ``(c_mid, c_in, k, k) -> (c_mid, c_in*k*k)`` with conv1's bias appended, ``W_next`` = conv2
``(c_out, c_mid, k, k)`` permuted to ``(c_out, k, k, c_mid)`` and reshaped to ``(c_out*k*k, c_mid)``.  Per block:
the decay rate of ``||diag D||`` and ``||D||_F`` against ``predicted_decay_rate`` (the per-channel ReLU symmetry
makes the diagonal law exact under plain SGD), kappa against its random-rotation baseline, the flag identity
fraction and the transport scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from matplotlib.figure import Figure

from hf_flag.harness.experiments import digits
from hf_flag.harness.experiments.common import FLAG_TAU, ClaimResult, fmt, markdown_table
from hf_flag.geometry.dynamics import fit_decay_rate, predicted_decay_rate

TOLERANCE = 0.10  # the diagonal imbalance of every block decays within 10% of the predicted rate
KAPPA_FLOOR = 0.5  # obstruction present: final kappa >= 0.5 x its random-rotation baseline


@dataclass(frozen=True)
class ResNetConfig:
    run: digits.DigitsRun = field(default_factory=lambda: digits.FULL_RUNS["resnet"])
    weight_decays: tuple[float, ...] = digits.WEIGHT_DECAYS

    @classmethod
    def quick(cls) -> "ResNetConfig":
        return cls(run=digits.QUICK_RUNS["resnet"])


def block_rows(r: digits.DigitsResult) -> list[dict]:
    """Per block of one run: fitted vs predicted decay rates, kappa / flag / transport at start and end."""
    tr, spe = r.trace, r.steps_per_epoch
    sgd_steps = [e * spe for e in tr.steps]
    predicted, law = predicted_decay_rate("sgd", r.run.lr, r.run.weight_decay)
    rows = []
    for i in range(r.run.n_blocks):
        v = lambda name: tr.values[f"b{i}_{name}"]  # noqa: E731
        rate_diag, r2_diag = fit_decay_rate(sgd_steps, v("diag"))
        rows.append({
            "block": i, "weight_decay": r.run.weight_decay, "predicted": predicted, "law": law,
            "rate_diag": rate_diag, "r2_diag": r2_diag,
            "rate_full": fit_decay_rate(sgd_steps, v("full"))[0],
            "kappa_start": v("kappa")[0], "kappa_end": v("kappa")[-1],
            "kappa_baseline_end": r.baseline_end[f"b{i}_kappa_baseline"],
            "flag_id_start": v("flag_id")[0], "flag_id_end": v("flag_id")[-1],
            "subspace_start": v("subspace")[0], "subspace_end": v("subspace")[-1],
            "basis_start": v("basis")[0], "basis_end": v("basis")[-1]})
    return rows


def _figure(res: list[digits.DigitsResult]) -> Figure:
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
            d0, rate = r.trace.values["b0_diag"][0], predicted_decay_rate("sgd", r.run.lr, r.run.weight_decay)[0]
            ax.semilogy(steps, [d0 * math.exp(-rate * s) for s in steps], "k:",
                        label="(1 - lr wd)^(2t) law, block 0")
    ax.set_title("Block imbalance (conv1, conv2)", fontsize=9)
    ax2.set_title("kappa per block; dotted: random-rotation baseline", fontsize=9)
    ax3.set_title(f"Transport scores, top-{digits.TRANSPORT_K} window", fontsize=9)
    for a in (ax, ax2, ax3):
        a.set_xlabel("SGD step")
        a.legend(fontsize=6)
    fig.tight_layout()
    return fig


def run(cfg: ResNetConfig, *, threads: int = 1, device: Optional[torch.device] = None) -> ClaimResult:
    """Judge the claim: supported when, with weight decay, every block's ``||diag D||`` decays within 10% of the
    predicted rate and every block's final kappa stays >= 0.5 x its random-rotation baseline (no basis alignment)."""
    res = [digits.train_digits(replace(cfg.run, weight_decay=wd), threads, device) for wd in cfg.weight_decays]
    rows = [row for r in res for row in block_rows(r)]
    decayed = [r for r in rows if r["weight_decay"] > 0]
    if not decayed:
        raise ValueError(f"resnet: weight_decays {cfg.weight_decays} must include a positive value")
    worst = max(abs(r["rate_diag"] / r["predicted"] - 1) for r in decayed)
    obstructed = all(r["kappa_end"] >= KAPPA_FLOOR * r["kappa_baseline_end"] for r in decayed)
    supported = worst <= TOLERANCE and obstructed
    evidence = (f"with weight decay, ‖diag D‖ decays within {100 * worst:.2g}% of -2 log(1 - lr wd) in every block "
                f"(R^2 >= {fmt(min(r['r2_diag'] for r in decayed))}); " + "; ".join(
                    f"wd={r['weight_decay']} block {r['block']}: kappa {fmt(r['kappa_start'])} -> {fmt(r['kappa_end'])} "
                    f"(baseline {fmt(r['kappa_baseline_end'])}), subspace score {fmt(r['subspace_start'])} -> "
                    f"{fmt(r['subspace_end'])}" for r in rows))
    table = markdown_table(
        ["wd", "block", "predicted rate", "law", "fitted ‖diag D‖", "R^2", "fitted ‖D‖_F", "kappa start",
         "kappa end", "kappa baseline end", f"flag identity fraction start (tau {FLAG_TAU})", "end",
         "subspace score start", "end", "basis score start", "end"],
        [[r["weight_decay"], r["block"], r["predicted"], r["law"], r["rate_diag"], r["r2_diag"], r["rate_full"],
          r["kappa_start"], r["kappa_end"], r["kappa_baseline_end"], r["flag_id_start"], r["flag_id_end"],
          r["subspace_start"], r["subspace_end"], r["basis_start"], r["basis_end"]] for r in rows])
    c = cfg.run.channels
    body = f"""How a residual block becomes a layer pair: block = relu(x + conv2(relu(conv1(x)))), 3x3 convolutions with
{c} channels. The shared hidden space is conv1's output channels = conv2's input channels (R^{c}).
W_l = conv1.weight ({c}, {c}, 3, 3) reshaped to ({c}, {c * 9}) with conv1's bias appended as a column (MATH.md §2);
W_next = conv2.weight ({c}, {c}, 3, 3) permuted to (c_out, kh, kw, c_mid) and reshaped to ({c * 9}, {c}), so
W_next^T W_next is the c_mid x c_mid channel Gram matrix summed over output channels and kernel taps. The skip path
adds to conv2's output and is not part of the pair; pairs across blocks (conv2 -> next conv1) are not clean pairs
(the next block also reads the skip), so only within-block pairs are analysed.

Runs: the ResNet of claim 3 ({cfg.run.epochs} epochs, plain SGD lr {cfg.run.lr}, batch {cfg.run.batch_size}),
weight decay {list(cfg.weight_decays)}. Rates per SGD step, fitted over all logged points.

{table}

Reading: the per-channel ReLU rescaling symmetry makes diag E = 0 for each block (as in an MLP), so ‖diag D‖ must
follow the (1 - lr wd)^2 law; the full ‖D‖_F has no such law. Kappa is compared with its random-rotation baseline
(same spectra, random relative basis): a value near the baseline means the two singular bases are no more aligned
than chance, while the transport subspace score shows how far the top-{digits.TRANSPORT_K} subspaces align."""
    return ClaimResult(key="resnet", title="4. Residual networks: diagnostics across residual blocks",
                       verdict="supported" if supported else "not supported", evidence=evidence, markdown=body,
                       figures={"resnet_blocks": _figure(res)},
                       data={"blocks": rows, "diag_rate_worst_relative_error": worst,
                             "kappa_floor": KAPPA_FLOOR, "tolerance": TOLERANCE})
