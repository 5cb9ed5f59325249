"""Claim 1: weight decay drives the imbalance (hence subspace alignment) to zero at an exponential rate (MATH.md §2).

Deep linear, ReLU and GELU MLPs on a tanh-teacher regression task, trained with full-batch plain SGD (the exact
discrete law ``D_{t+1} = (1 - lr wd)^2 D_t`` for linear nets) at several weight decays, and with AdamW (decoupled
decay: no exact law).  For every run the per-step decay rate of ``‖D‖_F`` and of ``‖diag D‖`` is fitted
(:func:`hf_flag.geometry.dynamics.fit_decay_rate`) and set beside the prediction
(:func:`hf_flag.geometry.dynamics.predicted_decay_rate`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from matplotlib.figure import Figure
from torch import nn

from hf_flag.harness.experiments.common import (
    ClaimResult,
    MLPRun,
    fmt,
    least_squares_slope,
    markdown_table,
    mlp_pairs,
    train_teacher_mlp,
)
from hf_flag.geometry.dynamics import fit_decay_rate, predicted_decay_rate
from hf_flag.geometry.pairs import imbalance_diagonal_norm, imbalance_norm

METRICS = {"full": "‖D‖_F", "diag": "‖diag D‖"}
TOLERANCE = 0.10  # linear nets: fitted rate within 10% of the prediction


@dataclass(frozen=True)
class WeightDecayConfig:
    base: MLPRun = MLPRun(activation="linear", lr=0.05, steps=2000, record_every=50)
    activations: tuple[str, ...] = ("linear", "relu", "gelu")
    weight_decays: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.04)
    adamw_lr: float = 0.005
    adamw_weight_decays: tuple[float, ...] = (0.05, 0.2, 0.8)  # same lr*wd products as SGD's 0.005/0.02/0.08 range

    @classmethod
    def quick(cls) -> "WeightDecayConfig":
        return cls(base=MLPRun(activation="linear", lr=0.05, steps=600, record_every=30),
                   weight_decays=(0.005, 0.01, 0.02), adamw_weight_decays=(0.2,))


def imbalance_probe(model: nn.Module, step: int) -> dict[str, float]:
    """``‖D‖_F`` and ``‖diag D‖`` of every adjacent pair, bias-augmented (MATH.md §2)."""
    out: dict[str, float] = {}
    for i, (W, W_next, b) in enumerate(mlp_pairs(model)):
        out[f"full{i}"] = float(imbalance_norm(W, W_next, bias_l=b))
        out[f"diag{i}"] = float(imbalance_diagonal_norm(W, W_next, bias_l=b))
    return out


def fit_run(run: MLPRun, *, threads: int, device: Optional[torch.device]) -> dict:
    """Train one run and fit the decay rate of each metric, averaged over the pairs (worst R^2 kept)."""
    trace = train_teacher_mlp(run, imbalance_probe, threads=threads, device=device)
    predicted, law = predicted_decay_rate(run.optimizer, run.lr, run.weight_decay)
    n_pairs = len(run.widths) - 2
    row = {"activation": run.activation, "optimizer": run.optimizer, "lr": run.lr,
           "weight_decay": run.weight_decay, "predicted": predicted, "law": law,
           "final_loss": trace.last("loss"), "steps": trace.steps}
    for metric in METRICS:
        fits = [fit_decay_rate(trace.steps, trace.values[f"{metric}{i}"]) for i in range(n_pairs)]
        row[f"rate_{metric}"] = sum(f[0] for f in fits) / n_pairs
        row[f"r2_{metric}"] = min(f[1] for f in fits)
        row[f"curve_{metric}"] = trace.values[f"{metric}0"]
    return row


def _slopes(rows: list[dict], activations: tuple[str, ...]) -> dict[str, dict[str, float]]:
    sgd = [r for r in rows if r["optimizer"] == "sgd"]
    return {act: {m: least_squares_slope([r["predicted"] for r in sgd if r["activation"] == act],
                                         [r[f"rate_{m}"] for r in sgd if r["activation"] == act])
                  for m in METRICS} for act in activations}


def _figure(rows: list[dict], cfg: WeightDecayConfig) -> Figure:
    fig = Figure(figsize=(11, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    colors = {"linear": "C0", "relu": "C1", "gelu": "C2"}
    top = max(r["predicted"] for r in rows)
    ax.plot([0, top], [0, top], "k--", lw=1, label="fitted = predicted (2 lr wd)")
    for act in cfg.activations:
        for metric, marker in (("full", "o"), ("diag", "s")):
            sel = [r for r in rows if r["activation"] == act and r["optimizer"] == "sgd"]
            ax.plot([r["predicted"] for r in sel], [r[f"rate_{metric}"] for r in sel], marker=marker, ls="-",
                    color=colors[act], mfc="none" if metric == "diag" else colors[act],
                    label=f"SGD {act}, {METRICS[metric]}")
        sel = [r for r in rows if r["activation"] == act and r["optimizer"] == "adamw"]
        ax.plot([r["predicted"] for r in sel], [r["rate_full"] for r in sel], marker="x", ls="none",
                color=colors[act], ms=9, label=f"AdamW {act}, ‖D‖_F (no exact law)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("predicted rate per step, -2 log(1 - lr wd)")
    ax.set_ylabel("fitted decay rate per step")
    ax.set_title("Imbalance decay rate over the weight-decay sweep")
    ax.ticklabel_format(style="sci", scilimits=(0, 0))
    ax.legend(fontsize=6.5, loc="lower left")
    wd_mid = cfg.weight_decays[len(cfg.weight_decays) // 2]
    for act in cfg.activations:
        r = next(r for r in rows if r["activation"] == act and r["optimizer"] == "sgd" and r["weight_decay"] == wd_mid)
        ax2.semilogy(r["steps"], r["curve_full"], color=colors[act], label=f"{act}: ‖D‖_F")
        ax2.semilogy(r["steps"], r["curve_diag"], color=colors[act], ls=":", label=f"{act}: ‖diag D‖")
    lin = next(r for r in rows if r["activation"] == "linear" and r["optimizer"] == "sgd"
               and r["weight_decay"] == wd_mid)
    pred = [lin["curve_full"][0] * math.exp(-lin["predicted"] * s) for s in lin["steps"]]
    ax2.semilogy(lin["steps"], pred, "k--", lw=1, label="(1 - lr wd)^(2t) law")
    ax2.set_xlabel("SGD step")
    ax2.set_ylabel("imbalance of the first pair")
    ax2.set_title(f"Imbalance over training, lr={cfg.base.lr}, wd={wd_mid}")
    ax2.legend(fontsize=6.5)
    fig.tight_layout()
    return fig


def run(cfg: WeightDecayConfig, *, threads: int = 1, device: Optional[torch.device] = None) -> ClaimResult:
    """Run the sweep and judge the claim: supported when every linear-net fit is within 10% of ``2 lr wd``."""
    rows = [fit_run(replace(cfg.base, activation=act, weight_decay=wd), threads=threads, device=device)
            for act in cfg.activations for wd in cfg.weight_decays]
    rows += [fit_run(replace(cfg.base, activation=act, optimizer="adamw", lr=cfg.adamw_lr, weight_decay=wd),
                     threads=threads, device=device)
             for act in cfg.activations for wd in cfg.adamw_weight_decays]
    slopes = _slopes(rows, cfg.activations)
    linear = [r for r in rows if r["activation"] == "linear" and r["optimizer"] == "sgd"]
    worst = max(abs(r[f"rate_{m}"] / r["predicted"] - 1) for r in linear for m in METRICS)
    supported = worst <= TOLERANCE
    evidence = (f"linear nets: fitted/predicted slope {fmt(slopes['linear']['full'], 4)} (‖D‖_F), "
                f"worst run off by {100 * worst:.2g}% ; " +
                "; ".join(f"{a}: slope {fmt(slopes[a]['full'])} (‖D‖_F), {fmt(slopes[a]['diag'])} (‖diag D‖)"
                          for a in cfg.activations if a != "linear"))
    table = markdown_table(
        ["activation", "optimizer", "lr", "wd", "predicted rate", "law", "fitted ‖D‖_F", "R^2", "fitted ‖diag D‖",
         "R^2", "final loss"],
        [[r["activation"], r["optimizer"], r["lr"], r["weight_decay"], r["predicted"], r["law"], r["rate_full"],
          r["r2_full"], r["rate_diag"], r["r2_diag"], r["final_loss"]] for r in rows])
    slope_table = markdown_table(["activation (SGD)", "slope ‖D‖_F", "slope ‖diag D‖"],
                                 [[a, slopes[a]["full"], slopes[a]["diag"]] for a in cfg.activations])
    b = cfg.base
    body = f"""Setup: MLP widths {list(b.widths)} (biases on; the imbalance uses the bias-augmented [W_l | b_l], MATH.md §2),
tanh-teacher regression ({b.n_samples} Gaussian inputs), full-batch plain SGD (lr {b.lr}, no momentum) for {b.steps}
steps, imbalance logged every {b.record_every} steps, seed {b.seed}. Rate = least-squares slope of log(imbalance) over
all logged steps, averaged over the {len(b.widths) - 2} adjacent pairs (R^2: the worst pair). Prediction:
`predicted_decay_rate` = -2 log(1 - lr wd) ~ 2 lr wd (exact for linear nets under discrete GD). AdamW rows
(lr {cfg.adamw_lr}) are labelled "no exact law": decoupled decay gives the same shrink factor but Adam's normalised
gradient step keeps a cross term even in linear nets.

Slope of fitted vs predicted rate over the SGD sweep (least squares through the origin):

{slope_table}

All runs:

{table}

Reading: for linear nets the imbalance follows the (1 - lr wd)^2 law to within {100 * worst:.2g}% (theory: exact).
For ReLU nets only the diagonal of D obeys it (diag E = 0 for ReLU, MATH.md §2), the off-diagonal part is driven by
the commutator term E; for GELU neither part has a law (diag E != 0). A negative rate means the imbalance grew."""
    return ClaimResult(
        key="weight_decay", title="1. Weight decay drives alignment exponentially",
        verdict="supported" if supported else "not supported", evidence=evidence, markdown=body,
        figures={"weight_decay_rates": _figure(rows, cfg)},
        data={"slopes": slopes, "worst_linear_relative_error": worst,
              "runs": [{k: v for k, v in r.items() if not k.startswith("curve_") and k != "steps"} for r in rows]})
