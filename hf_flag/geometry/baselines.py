"""Random (Haar) baselines of the subspace and pair diagnostics, variances and z-scores (MATH.md §1-§4, §6, §7).

An overlap without its null value is not interpretable (MATH.md §1): every metric is reported beside the value it
takes for Haar-random subspaces of the same dimensions.  The commutator ratio's Haar value is the closed-form root
mean square :func:`commutator_haar_rms` (no sampling); ``pairs.commutator_baseline`` feeds it a pair's Gram traces.
The imbalance norms' Haar values (:func:`imbalance_haar_rms`, :func:`relative_imbalance_haar_rms`) take the same
traces; the soft intersection count's (:func:`intersection_soft_baseline`) and the GL kernel dimension's
(:func:`gl_kernel_dim_baseline`) take dimensions.  The null model of every pair baseline is the one of kappa's: a
Haar rotation ``Q`` of the hidden basis applied to one side, ``(Q W_l, W_next)``, both spectra kept (MATH.md §3).
"""
from __future__ import annotations

import math
from typing import Union

import torch

__all__ = [
    "overlap_baseline",
    "projection_kernel_moments",
    "overlap_zscore",
    "transport_baselines",
    "intersection_baseline",
    "composition_baseline",
    "commutator_haar_rms",
    "imbalance_haar_rms",
    "relative_imbalance_haar_rms",
    "intersection_soft_baseline",
    "gl_kernel_dim_baseline",
    "gl_kernel_dim_exception_bound",
]


def _check_dims(where: str, n: int, **dims: int) -> None:
    """``ValueError`` unless ``n >= 1`` and every named dimension is an integer in ``[0, n]``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: ambient dimension n={n!r} must be a positive int")
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n:
            raise ValueError(f"{where}: {name}={value!r} must be an int in [0, n={n}]")


def overlap_baseline(p: int, q: int, n: int) -> float:
    """Haar expectation of the normalised overlap ``PK / min(p, q)``: ``max(p, q) / n`` (MATH.md §1).

    0 when ``min(p, q) == 0`` (the overlap of the zero subspace is defined as 0).
    """
    _check_dims("overlap_baseline", n, p=p, q=q)
    return max(p, q) / n if min(p, q) > 0 else 0.0


def projection_kernel_moments(p: int, q: int, n: int) -> tuple[float, float]:
    """Mean and variance of ``PK = tr(P_A P_B)`` for independent Haar-random ``p``- and ``q``-planes in R^n.

    ``E[PK] = p q / n`` (MATH.md §1) and ``Var[PK] = 2 p q (n - p)(n - q) / (n^2 (n - 1)(n + 2))``, from the
    orthogonal Weingarten calculus: for fixed symmetric ``A, B`` and Haar ``O``,
    ``Var tr(A O B O^T) = 2 (n tr A^2 - (tr A)^2)(n tr B^2 - (tr B)^2) / (n^2 (n - 1)(n + 2))``, with
    ``A = P_p``, ``B = P_q``.  Checks: ``q = 1`` gives the Beta(p/2, (n-p)/2) variance; ``n = 2, p = q = 1`` gives
    ``Var cos^2 = 1/8``; the tests confirm it by Monte Carlo.
    """
    _check_dims("projection_kernel_moments", n, p=p, q=q)
    mean = p * q / n
    numerator = 2 * p * q * (n - p) * (n - q)
    return mean, (numerator / (n * n * (n - 1) * (n + 2)) if numerator else 0.0)


def overlap_zscore(overlap: Union[float, torch.Tensor], p: int, q: int, n: int) -> Union[float, torch.Tensor]:
    """``(overlap - E[ov]) / sd(ov)`` for the normalised overlap ``ov = PK / min(p, q)`` (MATH.md §1).

    ``overlap`` may be a float or a tensor (elementwise, e.g. a head-overlap matrix of equal head ranks).
    When the Haar overlap is deterministic (``p`` or ``q`` in ``{0, n}``) the z-score is defined as 0; an overlap
    outside ``[0, 1]`` or non-finite raises ``ValueError``.
    """
    _check_dims("overlap_zscore", n, p=p, q=q)
    values = torch.as_tensor(overlap, dtype=torch.float64)
    if not bool(torch.isfinite(values).all()) or bool((values < -1e-12).any()) or bool((values > 1 + 1e-12).any()):
        raise ValueError(f"overlap_zscore: overlap must be finite and in [0, 1]; got {overlap!r}")
    _, var = projection_kernel_moments(p, q, n)
    if var == 0.0:
        z = torch.zeros_like(values)
    else:
        z = (values - overlap_baseline(p, q, n)) / (math.sqrt(var) / min(p, q))
    return z if isinstance(overlap, torch.Tensor) else float(z)


def transport_baselines(k: int, n: int) -> tuple[float, float]:
    """Haar values of the transport scores (MATH.md §4): subspace score ``k / n`` and basis score ``1 / n``.

    Subspace score ``(1/k) ||T_k||_F^2`` is a normalised overlap of two ``k``-planes; basis score
    ``(1/k) sum T_ii^2`` averages squared cosines of independent uniform unit vectors, ``E = 1/n``.
    """
    _check_dims("transport_baselines", n, k=k)
    if k == 0:
        raise ValueError("transport_baselines: k=0 has no transport score; pass k >= 1")
    return k / n, 1.0 / n


def intersection_baseline(i: int, j: int, n: int) -> int:
    """Generic dimension of ``F_i ∩ G_j`` (an ``i``- and a ``j``-plane in R^n): ``max(0, i + j - n)``, MATH.md §4."""
    _check_dims("intersection_baseline", n, i=i, j=j)
    return max(0, i + j - n)


def composition_baseline(d: int) -> float:
    """RMS composition score of Haar-random matrices: ``1 / sqrt(d)`` (``E[score^2] = 1/d``, MATH.md §6)."""
    _check_dims("composition_baseline", d)
    return 1.0 / math.sqrt(d)


#: the baseline of :func:`commutator_haar_rms`, as reported in ``Report.params``
COMMUTATOR_BASELINE_RULE = "Haar RMS sqrt(E kappa^2) over rotations of the hidden basis, closed form, MATH.md §3"


def commutator_haar_rms(trace_A: torch.Tensor, trace_A2: torch.Tensor, trace_B: torch.Tensor,
                        trace_B2: torch.Tensor, n: int) -> torch.Tensor:
    """Haar root-mean-square of the commutator ratio: ``sqrt(E ||[A, O B O^T]||_F^2) / (||A||_F ||B||_F)`` over
    ``O`` Haar in O(n), for symmetric ``A``, ``B`` (n x n) given by their traces (MATH.md §3), batched.

    ``a1, a2 = tr A, tr A^2`` and ``b1, b2 = tr B, tr B^2``.  ``B' = O B O^T`` is an isotropic random symmetric
    matrix with ``E[B'_ij B'_kl] = alpha d_ij d_kl + beta (d_ik d_jl + d_il d_jk)``; contracting with
    ``E[(tr B')^2] = b1^2`` and ``E[tr B'^2] = b2`` gives ``beta = (n b2 - b1^2) / (n (n - 1)(n + 2))`` and
    ``alpha = (b1^2 - 2 n beta) / n^2``.  Then ``E tr(A^2 B'^2) = a2 b2 / n`` and
    ``E tr(A B' A B') = alpha a2 + beta (a2 + a1^2)``, so
    ``E ||[A, B']||_F^2 = 2 a2 b2 / n - 2 (alpha a2 + beta (a2 + a1^2))``.  Exact (no sampling); the root of the
    mean square is an upper bound of the mean of kappa (Jensen) and equal to it up to the spread of kappa, which
    shrinks as n grows (tests: both against Monte Carlo).  ``A = I`` gives 0; ``n = 1`` gives 0; 0 where
    ``||A|| ||B|| = 0``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"commutator_haar_rms: hidden dimension n={n!r} must be a positive int")
    a1, a2, b1, b2 = (torch.as_tensor(t, dtype=torch.float64) for t in (trace_A, trace_A2, trace_B, trace_B2))
    if n == 1:
        return torch.zeros_like(a1 * a2 * b1 * b2)
    beta = (n * b2 - b1 * b1) / (n * (n - 1) * (n + 2))
    alpha = (b1 * b1 - 2 * n * beta) / (n * n)
    mean_square = 2 * a2 * b2 / n - 2 * (alpha * a2 + beta * (a2 + a1 * a1))
    scale = a2 * b2
    ratio = mean_square.clamp_min(0) / torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, ratio.sqrt(), torch.zeros_like(ratio))


def _traces(where: str, trace_A, trace_A2, trace_B, trace_B2, n: int) -> tuple[torch.Tensor, ...]:
    """The four traces as float64 tensors, after checking the hidden dimension ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: hidden dimension n={n!r} must be a positive int")
    return tuple(torch.as_tensor(t, dtype=torch.float64) for t in (trace_A, trace_A2, trace_B, trace_B2))


def imbalance_haar_rms(trace_A: torch.Tensor, trace_A2: torch.Tensor, trace_B: torch.Tensor,
                       trace_B2: torch.Tensor, n: int) -> torch.Tensor:
    """Haar root-mean-square of the imbalance norm: ``sqrt(E ||A - O B O^T||_F^2)`` over ``O`` Haar in O(n), for
    symmetric ``A``, ``B`` (n x n) given by their traces (MATH.md §2, §7), batched.

    ``E[O B O^T] = (tr B / n) I``, so ``E tr(A O B O^T) = tr A tr B / n`` and
    ``E ||A - O B O^T||_F^2 = tr A^2 + tr B^2 - 2 tr A tr B / n``; for a pair ``tr A = ||W_next||_F^2``,
    ``tr B = ||W_l||_F^2`` (bias-augmented), ``tr A^2 = ||A||_F^2``, ``tr B^2 = ||B||_F^2``.  Non-negative
    (``(tr A)^2 <= n tr A^2``, Cauchy-Schwarz); exact, no sampling.  The root of a mean square: an upper bound of the
    Haar mean of ``||D||_F`` (Jensen), equal to it up to the spread of ``||D||^2``, whose variance is ``4 Var tr(A O B
    O^T)`` (:func:`projection_kernel_moments`' Weingarten formula).  ``A = c I`` gives ``||cI - B||_F`` itself (every
    rotation gives it); ``n = 1`` gives ``|a - b|``.
    """
    a1, a2, b1, b2 = _traces("imbalance_haar_rms", trace_A, trace_A2, trace_B, trace_B2, n)
    return (a2 + b2 - 2 * a1 * b1 / n).clamp_min(0).sqrt()


def relative_imbalance_haar_rms(trace_A: torch.Tensor, trace_A2: torch.Tensor, trace_B: torch.Tensor,
                                trace_B2: torch.Tensor, n: int) -> torch.Tensor:
    """Haar root-mean-square of the relative imbalance ``||D||_F / (||A||_F + ||B||_F)`` (MATH.md §2, §7): the
    rotation leaves ``||A||_F = sqrt(tr A^2)`` and ``||B||_F`` unchanged, so it is :func:`imbalance_haar_rms` over
    ``||A||_F + ||B||_F`` (exactly the RMS of the ratio); 0 where both are 0 (``pairs.relative_imbalance``'s
    convention), batched."""
    a1, a2, b1, b2 = _traces("relative_imbalance_haar_rms", trace_A, trace_A2, trace_B, trace_B2, n)
    den = a2.sqrt() + b2.sqrt()
    rms = imbalance_haar_rms(a1, a2, b1, b2, n)
    return torch.where(den > 0, rms / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(rms))


def intersection_soft_baseline(i: int, j: int, n: int) -> float:
    """Haar expectation of the soft intersection count ``sum cos^2`` of the principal angles between ``F_i`` and
    ``G_j`` (an ``i``- and a ``j``-plane in R^n): the projection kernel's ``E[PK] = i j / n`` (MATH.md §1, §4, §7).

    A mean (the soft count is itself a sum of squares: no root); the hard count's generic value
    :func:`intersection_baseline` ``max(0, i + j - n)`` is at most this (``(n - i)(n - j) >= 0``)."""
    _check_dims("intersection_soft_baseline", n, i=i, j=j)
    return i * j / n


def gl_kernel_dim_baseline(rank_l: int, rank_next: int, n: int) -> int:
    """Value of ``dim(range W_l ∩ ker W_next)`` for Haar-rotated ``(Q W_l, W_next)`` with exact ranks ``rank_l``,
    ``rank_next`` in R^n: ``max(0, rank_l - rank_next)`` (MATH.md §4, §7).

    ``range Q W_l`` is a Haar-random ``rank_l``-plane and ``ker W_next`` a fixed ``(n - rank_next)``-plane; two such
    planes meet in the generic dimension ``max(0, rank_l + (n - rank_next) - n)`` with probability 1, so this is
    the value almost surely (its mean and its RMS alike) when ranks are exact.  With ranks counted at a relative
    cut (``gl_invariant_kernel_dim``) it holds only up to :func:`gl_kernel_dim_exception_bound`."""
    _check_dims("gl_kernel_dim_baseline", n, rank_l=rank_l, rank_next=rank_next)
    return max(0, rank_l - rank_next)


def gl_kernel_dim_exception_bound(rank_l: int, rank_next: int, n: int, cut_ratio: float) -> float:
    """Upper bound of the Haar probability that a rotation ``(Q W_l, W_next)`` gives a GL kernel dimension other
    than :func:`gl_kernel_dim_baseline` when ranks are counted at a relative cut (MATH.md §4).

    ``cut_ratio`` is ``c0 = rtol sigma_1(W_l) sigma_1(W_next) / (sigma_{rank_l}(W_l) sigma_{rank_next}(W_next))``:
    the product's cut over the product of the smallest singular values kept on each side.  Horn's inequality
    ``sigma_{i+j-1}(AB) <= sigma_i(A) sigma_j(B)`` caps the product's counted rank at ``m = min(rank_l,
    rank_next)`` for every rotation (the value is never below the baseline); it reaches ``m`` unless
    ``sigma_m(M) <= c0``, with ``M`` the ``rank_next x rank_l`` block ``V_next^T Q U_l`` of cosines between the two
    kept singular subspaces (``sigma_j(W_next Q W_l) >= sigma_{rank_next} sigma_{rank_l} sigma_j(M)``).  So:

    * ``m = 0``: every rotation gives the baseline (0.0);
    * ``max(rank_l, rank_next) = n``: ``M`` is an isometry, every rotation gives it iff ``c0 < 1`` (0.0, else 1.0);
    * otherwise ``Q U_l = G (G^T G)^{-1/2}`` with ``G`` Gaussian ``n x m`` gives ``sigma_m(M) >= sigma_min(H) /
      sigma_max(G)``, ``H`` an ``m x m`` Gaussian block; ``P(sigma_min(H) <= x) <= 2.35 x sqrt(m)`` (Sankar,
      Spielman & Teng 2006, Thm 3.1) and ``P(sigma_max(G) > sqrt n + sqrt m + u) <= exp(-u^2/2)`` (Gordon, Gaussian
      concentration) give ``a (sqrt n + sqrt m + sqrt(2 ln(1/a)) + 1)`` with ``a = 2.35 sqrt(m) c0`` (``u`` chosen so
      that ``exp(-u^2/2) = a``), capped at 1.
    """
    _check_dims("gl_kernel_dim_exception_bound", n, rank_l=rank_l, rank_next=rank_next)
    if not cut_ratio >= 0:
        raise ValueError(f"gl_kernel_dim_exception_bound: cut_ratio={cut_ratio!r} must be a number >= 0")
    m = min(rank_l, rank_next)
    if m == 0:
        return 0.0
    if max(rank_l, rank_next) == n:
        return 0.0 if cut_ratio < 1 else 1.0
    a = 2.35 * math.sqrt(m) * cut_ratio
    if a >= 1:
        return 1.0
    if a == 0:
        return 0.0
    return min(1.0, a * (math.sqrt(n) + math.sqrt(m) + math.sqrt(2 * math.log(1 / a)) + 1))
