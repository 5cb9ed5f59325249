"""Decay-rate law of the imbalance under weight decay (MATH.md §2).

:func:`fit_decay_rate` measures the exponential rate of a logged series; :func:`predicted_decay_rate` states what
the optimizer's weight decay predicts, with the name of the law used (a number only where one is derived: SGD,
exact for full-batch GD; none for AdamW and the rest); :func:`imbalance_law_scope` says which part of the
imbalance the law governs for a pair's hidden units; :func:`predicted_decay_curve` is the law's value of a series.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

__all__ = ["fit_decay_rate", "predicted_decay_rate", "optimizer_family", "imbalance_law_scope", "predicted_decay_curve",
           "NO_LAW", "GATED_LINEAR", "HOMOGENEOUS_ACTIVATIONS", "momentum_decay_factor"]

# HF ``TrainingArguments.optim`` names and torch class names, lower-cased, mapped to one family.
_SGD_NAMES = ("sgd",)
_ADAMW_PREFIXES = ("adamw", "paged_adamw")
_ADAM_L2_NAMES = ("adam",)


def fit_decay_rate(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """Exponential decay rate per step of ``values`` over ``steps`` (MATH.md §2).

    Least squares on ``log v = a - rate * step`` over the points with ``v > 0`` (non-positive and non-finite values
    are ignored). Returns ``(rate_per_step, r_squared)``; ``rate > 0`` means decay, and ``r_squared`` is the
    coefficient of determination of the log-linear fit (1.0 when the log values are exactly linear or constant).

    Raises ``ValueError`` when the lengths differ or fewer than 3 usable points (or fewer than 2 distinct steps) remain.
    """
    steps = [float(s) for s in steps]
    values = [float(v) for v in values]
    if len(steps) != len(values):
        raise ValueError(f"fit_decay_rate: steps has {len(steps)} entries but values has {len(values)}; "
                         f"pass equal lengths")
    pts = [(s, math.log(v)) for s, v in zip(steps, values) if math.isfinite(s) and math.isfinite(v) and v > 0]
    if len(pts) < 3:
        raise ValueError(
            f"fit_decay_rate: only {len(pts)} positive finite values out of {len(values)}; log at least 3 points"
        )
    n = len(pts)
    s_mean = math.fsum(p[0] for p in pts) / n
    y_mean = math.fsum(p[1] for p in pts) / n
    sxx = math.fsum((p[0] - s_mean) ** 2 for p in pts)
    if sxx == 0.0:
        raise ValueError("fit_decay_rate: all usable points share one step; log values at at least 2 distinct steps")
    sxy = math.fsum((p[0] - s_mean) * (p[1] - y_mean) for p in pts)
    slope = sxy / sxx
    ss_tot = math.fsum((p[1] - y_mean) ** 2 for p in pts)
    ss_res = math.fsum((p[1] - y_mean - slope * (p[0] - s_mean)) ** 2 for p in pts)
    r_squared = 1.0 if ss_tot == 0.0 else max(0.0, 1.0 - ss_res / ss_tot)
    return -slope, r_squared


def optimizer_family(optimizer: str) -> Optional[str]:
    """``"sgd"``, ``"adamw"`` (decoupled decay), ``"adam"`` (L2 penalty through the gradient) or ``None`` (unknown).

    Accepts torch class names (``"SGD"``, ``"AdamW"``) and ``TrainingArguments.optim`` values
    (``"adamw_torch"``, ``"adamw_torch_fused"``, ``"sgd"``, ...).
    """
    if not isinstance(optimizer, str):
        raise ValueError(f"optimizer_family: optimizer={optimizer!r} must be a name such as 'SGD' or 'adamw_torch'")
    name = optimizer.strip().lower()
    if name in _SGD_NAMES:
        return "sgd"
    if name.startswith(_ADAMW_PREFIXES):
        return "adamw"
    if name in _ADAM_L2_NAMES:
        return "adam"
    return None


#: law name of every optimizer without a derived rate (AdamW, Adam, Adafactor, ...): the measured rate stands alone
NO_LAW = "no closed-form law"

_BATCH_CLAUSE = {
    True: "full-batch GD: exact up to the lr^2 gradient term",
    False: "minibatch SGD: the lr^2 gradient-noise term sets a floor; the rate holds only while the imbalance is far "
           "above it, later fitted rates fall below it",
    None: "exact only for full-batch GD; under minibatch SGD the lr^2 gradient-noise term sets a floor",
}


def _check_hyperparameters(lr: float, weight_decay: float, momentum: float, dampening: float) -> None:
    for name, x in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum), ("dampening", dampening)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"predicted_decay_rate: {name}={x!r} must be a finite number >= 0")
    if momentum >= 1:
        raise ValueError(f"predicted_decay_rate: momentum={momentum!r} must be in [0, 1)")
    if dampening > 1:
        raise ValueError(f"predicted_decay_rate: dampening={dampening!r} must be in [0, 1]")
    if lr * weight_decay >= 1:
        raise ValueError(f"predicted_decay_rate: lr * weight_decay = {lr * weight_decay!r} must be < 1")


def momentum_decay_factor(lr_wd: float, momentum: float, *, nesterov: bool = False) -> float:
    """Per-step factor ``|z|`` of the slow mode of torch's SGD momentum recursion on the decay term alone
    (``g = wd W``, ``lr_wd = lr wd (1 - dampening)``): the larger root of ``z^2 - (1 + beta - lr_wd) z + beta = 0``
    (heavy ball) or ``z^2 - (1 + beta - lr_wd (1 + beta)) z + beta (1 - lr_wd) = 0`` (Nesterov), ``sqrt`` of the
    constant term when the roots are complex.  ``1 - lr_wd / (1 - beta) + O(lr_wd^2)`` (MATH.md §2)."""
    b = 1.0 + momentum - lr_wd * ((1.0 + momentum) if nesterov else 1.0)
    c = momentum * ((1.0 - lr_wd) if nesterov else 1.0)
    disc = b * b - 4.0 * c
    if disc < 0:
        return math.sqrt(c)
    return 0.5 * (b + math.sqrt(disc))


def predicted_decay_rate(
    optimizer: str, lr: float, weight_decay: float, momentum: float = 0.0, *, dampening: float = 0.0,
    nesterov: bool = False, full_batch: Optional[bool] = None,
) -> tuple[Optional[float], str]:
    """Predicted per-step decay rate of the imbalance the law governs, and the name of the law (MATH.md §2).

    The law governs ``||D||_F`` of linear pairs (``E = 0``) and ``||diag D||`` of pairs whose hidden units have the
    per-unit rescaling symmetry (:func:`imbalance_law_scope`), on the parameters the optimizer decays (a bias
    outside the decayed group is left out of ``D``).

    - SGD, no momentum (``W <- W - lr (grad + wd W)``): ``D_{t+1} = (1 - lr wd)^2 D_t`` plus the ``lr^2`` gradient
      term, so the rate is ``-2 log(1 - lr wd) = 2 lr wd + O((lr wd)^2)``.  ``full_batch``: True (full-batch GD:
      exact up to that term), False (minibatch: that term is gradient noise and sets a floor) or None (unknown;
      the law says both).
    - SGD with momentum ``beta`` (heavy ball or ``nesterov``; torch's ``dampening``): ``-2 log z`` with ``z`` the
      slow mode of the momentum recursion on the decay term (:func:`momentum_decay_factor`), which is
      ``2 lr wd (1 - dampening) / (1 - beta)`` to first order; approximate (the momentum buffer carries gradients
      of earlier steps, so ``E`` no longer cancels exactly); the same batch clause.
    - ``weight_decay == 0`` with SGD: ``0.0`` (the imbalance is conserved up to the ``lr^2`` term).
    - AdamW, Adam and every other optimizer: ``(None, "no closed-form law ...")``: the per-coordinate step rescales
      the gradient, so the cross term ``E`` survives even in linear nets (MATH.md §2); only a measured rate exists.

    Raises ``ValueError`` for a non-string ``optimizer``, a negative or non-finite hyperparameter, ``momentum``
    outside ``[0, 1)``, ``dampening > 1`` or ``lr * weight_decay >= 1`` (the decay factor would not be positive).
    """
    _check_hyperparameters(lr, weight_decay, momentum, dampening)
    if full_batch not in (True, False, None):
        raise ValueError(f"predicted_decay_rate: full_batch={full_batch!r} must be True, False or None")
    family = optimizer_family(optimizer)
    if family != "sgd":
        detail = {"adamw": "AdamW: decoupled decay beside a per-coordinate gradient step",
                  "adam": "Adam: weight decay enters the gradient and is rescaled per coordinate"}
        return None, f"{NO_LAW} ({detail.get(family, f'optimizer {optimizer!r}')}; measured rate only)"
    batch = _BATCH_CLAUSE[full_batch]
    if weight_decay == 0:
        return 0.0, f"no weight decay: D conserved ({batch})"
    if momentum > 0:
        z = momentum_decay_factor(lr * weight_decay * (1.0 - dampening), momentum, nesterov=bool(nesterov))
        return -2.0 * math.log(z), (f"SGD momentum: -2 log of the momentum recursion's slow mode, ~ 2 lr wd "
                                    f"(1 - dampening) / (1 - momentum), approximate ({batch})")
    return -2.0 * math.log1p(-lr * weight_decay), f"SGD: (1 - lr wd)^2 per step ({batch})"


#: activation names whose hidden units have the per-unit positive rescaling symmetry (diag E = 0, MATH.md §2)
HOMOGENEOUS_ACTIVATIONS = frozenset({"relu", "leaky_relu", "prelu"})
#: the hidden unit multiplies W_l's output by a gate computed from other weights (the up projection of a GLU):
#: linear in W_l's output, so per-unit rescaling is a symmetry and diag E = 0
GATED_LINEAR = "gated_linear"


def imbalance_law_scope(activation: Optional[str]) -> Optional[str]:
    """Which part of ``D`` the weight-decay law governs for a pair whose ``W_next`` reads ``act(W_l x + b)``
    (MATH.md §2): ``"full"`` for ``"identity"`` (``E = 0``), ``"diagonal"`` for positively homogeneous activations
    (:data:`HOMOGENEOUS_ACTIVATIONS`) and :data:`GATED_LINEAR` units (``diag E = 0``), ``None`` for every other
    activation (GELU, SiLU, tanh, ...: ``diag E != 0``) and for ``None`` (``W_next`` does not read ``W_l``'s output
    directly, e.g. across a residual stream with norms and attention between, or a value projection shared by
    several query heads)."""
    if activation == "identity":
        return "full"
    if activation in HOMOGENEOUS_ACTIVATIONS or activation == GATED_LINEAR:
        return "diagonal"
    return None


def predicted_decay_curve(first_value: float, steps: Sequence[float], rate: float) -> list[float]:
    """``first_value * exp(-rate (step - steps[0]))`` at each step: the law's prediction of a logged series from
    its first value (MATH.md §2)."""
    if not steps:
        return []
    s0 = float(steps[0])
    return [float(first_value) * math.exp(-float(rate) * (float(s) - s0)) for s in steps]
