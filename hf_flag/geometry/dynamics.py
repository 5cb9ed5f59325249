"""Decay-rate law of the imbalance under weight decay (MATH.md §2).

Two pure functions: :func:`fit_decay_rate` measures the exponential rate of a logged series, and
:func:`predicted_decay_rate` states what the optimizer's weight decay predicts, with the name of the law used, so a
fitted rate is always reported next to its prediction.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

__all__ = ["fit_decay_rate", "predicted_decay_rate", "optimizer_family"]

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


def predicted_decay_rate(
    optimizer: str, lr: float, weight_decay: float, momentum: float = 0.0
) -> tuple[Optional[float], str]:
    """Predicted per-step decay rate of the imbalance norm ``||D||_F`` and the law it comes from (MATH.md §2).

    - SGD, no momentum (``W <- W - lr (grad + wd W)``): ``D_{t+1} = (1 - lr wd)^2 D_t`` in linear nets, so the rate is
      ``-2 log(1 - lr wd) = 2 lr wd + O((lr wd)^2)``; law ``"exact, discrete GD"``.
    - SGD with momentum ``beta``: ``2 lr wd / (1 - beta)``; law ``"empirical"``.
    - AdamW (``p *= 1 - lr wd``): ``-2 log(1 - lr wd)``; law ``"no exact law; decoupled decay estimate"``.
    - Adam with an L2 penalty in the gradient, or an optimizer this function does not know: ``(None, reason)``.
    - ``weight_decay == 0`` with SGD: ``0.0`` (the imbalance is conserved up to O(lr^2)).

    Raises ``ValueError`` for a non-string ``optimizer``, a negative or non-finite ``lr``/``weight_decay``,
    ``momentum`` outside ``[0, 1)``, or ``lr * weight_decay >= 1`` (the decay factor would not be positive).
    """
    for name, x in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
        if not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"predicted_decay_rate: {name}={x!r} must be a finite number >= 0")
    if momentum >= 1:
        raise ValueError(f"predicted_decay_rate: momentum={momentum!r} must be in [0, 1)")
    if lr * weight_decay >= 1:
        raise ValueError(f"predicted_decay_rate: lr * weight_decay = {lr * weight_decay!r} must be < 1")
    family = optimizer_family(optimizer)
    discrete = -2.0 * math.log1p(-lr * weight_decay)
    if family == "sgd":
        if momentum > 0:
            return 2.0 * lr * weight_decay / (1.0 - momentum), "empirical"
        return discrete, "exact, discrete GD"
    if family == "adamw":
        return discrete, "no exact law; decoupled decay estimate"
    if family == "adam":
        if weight_decay == 0:
            return 0.0, "no weight decay; no exact law for Adam"
        return None, "no law: Adam applies weight decay as an L2 gradient term, rescaled per coordinate"
    return None, f"no law for optimizer {optimizer!r}"
