"""Pairs of adjacent layers: imbalance, commutator obstruction, transport scores (MATH.md §2, §3, §4).

Notation (MATH.md): ``W_l`` is ``n x k`` and ``W_next`` (= W_{l+1}) is ``m x n`` (``nn.Linear`` out x in); they
share the hidden space R^n.  ``A = W_next^T W_next`` and ``B = W_l W_l^T`` are ``n x n`` and are formed only by
:func:`imbalance`, ``method="direct"``, and when n is at most both outer dims (then they are the smallest factors);
otherwise everything goes through the Gram factors ``G_P = W_next W_next^T`` (m x m), ``G_Q = W_l^T W_l`` (k x k)
and ``C = W_next W_l`` (m x k).

All functions accept leading batch dimensions (equal on both sides), compute in ``dtype`` (float64 by default) on
the inputs' device and raise ``ValueError`` naming the shapes for mismatched or non-finite input.

Zero matrices: a zero side commutes with and balances against anything trivially, so ``commutator_ratio`` and
``relative_imbalance`` return 0 when ``||A||_F ||B||_F = 0`` (resp. ``||A||_F + ||B||_F = 0``) instead of 0/0.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from hf_flag.geometry.angles import (QR_FIRST_RATIO, thin_svd_in_dtype, check_dtype, check_matrix, default_rtol,
                                     normalised_overlap)
from hf_flag.geometry.baselines import commutator_haar_rms, imbalance_haar_rms, relative_imbalance_haar_rms

#: ``method="auto"`` recomputes kappa with the factored form when the trace form gives kappa below this value.
#: The trace form subtracts two terms of size ``||A||^2 ||B||^2``; its relative error on kappa is about
#: ``eps / kappa^2`` (<= ~2e-10 at kappa = 1e-3 in float64), the factored form's about ``eps / kappa``.
AUTO_FACTORED_BELOW = 1e-3

#: ``imbalance_norm`` recomputes ``||D||_F`` with the factored form when ``||D||^2 < this * (||A||^2 + ||B||^2)``
#: (trace-form relative error ~ ``eps / this`` on ``||D||^2`` above it).
IMBALANCE_FACTORED_BELOW = 1e-4

_METHODS = ("auto", "trace", "factored", "direct")

#: kappa lies in [0, 1/sqrt(2)] (Bottcher-Wenzel, MATH.md §3): this factor maps it onto [0, 1]
COMMUTATOR_RATIO_SCALE = math.sqrt(2.0)
#: the transport window rule of :func:`transport_k`, as reported in ``Report.params``
TRANSPORT_K_RULE = "min(k_in, m_out, ceil(n / 2))"


def normalized_commutator_ratio(kappa):
    """``sqrt(2) kappa`` in [0, 1] (MATH.md §3), for a float or a tensor of kappa values."""
    return COMMUTATOR_RATIO_SCALE * kappa


def transport_k(n: int, k_in: int, m_out: int) -> int:
    """Transport window size ``min(k_in, m_out, ceil(n/2))`` for a pair with hidden dim ``n``: the top-k window
    never covers the whole hidden space, where the subspace score would be trivially 1 (MATH.md §4)."""
    return max(1, min(k_in, m_out, (n + 1) // 2))


def augment(W: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``[W | b]`` over the last two dims: the affine layer as one matrix (MATH.md §2)."""
    return W if bias is None else torch.cat([W, bias.unsqueeze(-1).to(W)], dim=-1)


def _shape(W: object) -> object:
    return tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__


def _check_pair(W_l: torch.Tensor, W_next: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """Raise ``ValueError`` unless ``W_l`` (..., n, k) and ``W_next`` (..., m, n) are a finite real pair sharing n and
    the batch dims, and ``dtype`` is a precision to compute in (:func:`_prepare` without converting anything)."""
    check_matrix("W_l", W_l, where=where)
    check_matrix("W_next", W_next, where=where)
    check_dtype(dtype, where=where)
    if W_l.shape[-2] != W_next.shape[-1]:
        raise ValueError(
            f"{where}: hidden dims differ: W_l {tuple(W_l.shape)} is (..., n, k) and W_next {tuple(W_next.shape)} is "
            f"(..., m, n); pass nn.Linear weights (out x in), transposing GPT-2 Conv1D weights"
        )
    if W_l.shape[:-2] != W_next.shape[:-2]:
        raise ValueError(f"{where}: batch dims differ: W_l {tuple(W_l.shape)} vs W_next {tuple(W_next.shape)}")


def _prepare(
    W_l: torch.Tensor, W_next: torch.Tensor, bias_l: Optional[torch.Tensor], dtype: torch.dtype, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair and return ``([W_l | b_l], W_next)`` in ``dtype`` on ``W_l``'s device (MATH.md §2)."""
    _check_pair(W_l, W_next, dtype, where)
    W_l = W_l.to(dtype)
    W_next = W_next.to(device=W_l.device, dtype=dtype)
    if bias_l is not None:
        if not isinstance(bias_l, torch.Tensor) or tuple(bias_l.shape) != tuple(W_l.shape[:-1]):
            raise ValueError(f"{where}: bias_l must have shape {tuple(W_l.shape[:-1])} (W_l without its last dim); "
                             f"got {_shape(bias_l)}")
        if bias_l.is_complex() or not torch.isfinite(bias_l).all():
            raise ValueError(f"{where}: bias_l of shape {tuple(bias_l.shape)} is complex or contains NaN or Inf; "
                             f"pass a real, finite bias")
        W_l = torch.cat([W_l, bias_l.to(device=W_l.device, dtype=dtype).unsqueeze(-1)], dim=-1)
    return W_l, W_next


def _fro2(X: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm over the last two dims."""
    return X.square().sum(dim=(-2, -1))


def _small_gram(W: torch.Tensor) -> torch.Tensor:
    """The smaller of ``W W^T`` and ``W^T W`` (same nonzero spectrum, same Frobenius norm)."""
    return W @ W.mT if W.shape[-2] <= W.shape[-1] else W.mT @ W


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (the zero-matrix convention of the module docstring)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _sandwich_norm(F: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``||F K F^T||_F`` for ``F`` (..., n, r) without an n x n product when ``n > r`` (thin QR: ``||R K R^T||``)."""
    if F.shape[-2] > F.shape[-1]:
        F = torch.linalg.qr(F, mode="r").R
    return torch.linalg.matrix_norm(F @ K @ F.mT)


def _refine(mask: torch.Tensor, value: torch.Tensor, fn: Callable[..., torch.Tensor], *args: torch.Tensor):
    """Replace ``value[mask]`` by ``fn`` evaluated on the masked batch members of ``args`` only."""
    if not bool(mask.any()):
        return value
    if value.ndim == 0:
        return fn(*args)
    flat = value.reshape(-1).clone()
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    flat[idx] = fn(*(a.reshape(-1, *a.shape[-2:])[idx] for a in args)).to(flat.dtype)
    return flat.reshape(value.shape)


def _stacked(W_l: torch.Tensor, W_next: torch.Tensor) -> torch.Tensor:
    """``F = [W_next^T | W_l]`` (n x (m + k)): both ``A - B`` and ``[A, B]`` are ``F K F^T`` (MATH.md §2, §3)."""
    return torch.cat([W_next.mT, W_l], dim=-1)


def _imbalance_factored(W_l: torch.Tensor, W_next: torch.Tensor) -> torch.Tensor:
    """``||D||_F = ||F diag(I_m, -I_k) F^T||_F`` in float64 (MATH.md §2)."""
    W_l, W_next = W_l.double(), W_next.double()
    m, k = W_next.shape[-2], W_l.shape[-1]
    J = torch.cat([torch.ones(m, dtype=W_l.dtype, device=W_l.device),
                   -torch.ones(k, dtype=W_l.dtype, device=W_l.device)])
    return _sandwich_norm(_stacked(W_l, W_next), torch.diag(J))


def imbalance(
    W_l: torch.Tensor, W_next: torch.Tensor, *, bias_l: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Imbalance ``D = W_next^T W_next - W_l W_l^T`` (n x n; MATH.md §2); ``W_l -> [W_l | b_l]`` given a bias.

    Forms the n x n matrix: for small hidden sizes (tests, toy nets). Use :func:`imbalance_norm` otherwise.
    """
    W_l, W_next = _prepare(W_l, W_next, bias_l, dtype, "imbalance")
    return W_next.mT @ W_next - W_l @ W_l.mT


def _imbalance_parts(W_l: torch.Tensor, W_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(||D||_F, ||A||_F, ||B||_F)`` through the smaller Gram of each side (MATH.md §2)."""
    return _imbalance_from_norms(W_l, W_next, _fro2(_small_gram(W_next)), _fro2(_small_gram(W_l)),
                                 _fro2(W_next @ W_l))


def _imbalance_from_norms(W_l: torch.Tensor, W_next: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                          c2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(||D||_F, ||A||_F, ||B||_F)`` from ``||A||^2``, ``||B||^2`` and ``c2 = ||W_next W_l||^2`` by
    ``||D||^2 = ||A||^2 + ||B||^2 - 2 c2`` (MATH.md §2), factored form where that cancels."""
    d2 = a2 + b2 - 2.0 * c2
    d = d2.clamp_min(0).sqrt()
    d = _refine(d2 < IMBALANCE_FACTORED_BELOW * (a2 + b2), d, _imbalance_factored, W_l, W_next)
    return d, a2.sqrt(), b2.sqrt()


def imbalance_norm(
    W_l: torch.Tensor, W_next: torch.Tensor, *, bias_l: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``||D||_F`` through Gram factors, never n x n (MATH.md §2).

    ``||D||^2 = ||A||^2 + ||B||^2 - 2 tr(AB)`` with ``tr(AB) = ||W_next W_l||_F^2``; when ``||D||^2`` is below
    ``IMBALANCE_FACTORED_BELOW * (||A||^2 + ||B||^2)`` the subtraction cancels and the factored float64 form
    ``||R diag(I, -I) R^T||_F`` (``R`` from the thin QR of ``[W_next^T | W_l]``) is used instead.
    """
    return _imbalance_parts(*_prepare(W_l, W_next, bias_l, dtype, "imbalance_norm"))[0]


def relative_imbalance(
    W_l: torch.Tensor, W_next: torch.Tensor, *, bias_l: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``||D||_F / (||A||_F + ||B||_F)`` in [0, 1] (MATH.md §2); 0 when both sides are zero."""
    d, a, b = _imbalance_parts(*_prepare(W_l, W_next, bias_l, dtype, "relative_imbalance"))
    return safe_ratio(d, a + b)


def imbalance_diagonal_norm(
    W_l: torch.Tensor, W_next: torch.Tensor, *, bias_l: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``||diag D||_2`` from column norms of ``W_next`` and row norms of ``[W_l | b_l]`` (MATH.md §2).

    The part of the imbalance that weight decay drives to zero even in ReLU nets (``diag E = 0``).
    """
    if bias_l is None:
        _check_pair(W_l, W_next, dtype, "imbalance_diagonal_norm")
    else:  # [W_l | b_l]: one copy
        W_l, W_next = _prepare(W_l, W_next, bias_l, dtype, "imbalance_diagonal_norm")
    return imbalance_diagonal_from_norms(weight_norms(W_l, dtype), weight_norms(W_next.to(W_l.device), dtype))


def imbalance_diagonal_from_norms(norms_l: "WeightNorms", norms_next: "WeightNorms") -> torch.Tensor:
    """``||diag D||_2 = ||col norms^2 of W_next - row norms^2 of W_l||`` from the pair's :func:`weight_norms`
    (MATH.md §2)."""
    return torch.linalg.vector_norm(norms_next.cols - norms_l.rows, dim=-1)


def _commutator_factored(W_l: torch.Tensor, W_next: torch.Tensor) -> torch.Tensor:
    """``||[A, B]||_F = ||W_next^T C W_l^T - W_l C^T W_next||_F`` in float64 (MATH.md §3)."""
    W_l, W_next = W_l.double(), W_next.double()
    C = W_next @ W_l
    m, k = C.shape[-2:]
    K = torch.zeros(*C.shape[:-2], m + k, m + k, dtype=C.dtype, device=C.device)
    K[..., :m, m:] = C
    K[..., m:, :m] = -C.mT
    return _sandwich_norm(_stacked(W_l, W_next), K)


def _kappa_factored(W_l: torch.Tensor, W_next: torch.Tensor) -> torch.Tensor:
    """kappa from :func:`_commutator_factored`, all in float64."""
    W_l, W_next = W_l.double(), W_next.double()
    den = torch.linalg.matrix_norm(_small_gram(W_next)) * torch.linalg.matrix_norm(_small_gram(W_l))
    return safe_ratio(_commutator_factored(W_l, W_next), den)


def _hidden_is_small(W_l: torch.Tensor, W_next: torch.Tensor) -> bool:
    """True when the hidden dim n is at most both outer dims (per-head V -> O pairs, the residual stream of a
    wide MLP): then ``A`` and ``B`` (n x n) are the smallest factors and are formed directly (MATH.md §3)."""
    return W_l.shape[-2] <= min(W_l.shape[-1], W_next.shape[-2])


def _hidden_grams(W_l: torch.Tensor, W_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (W_next^T W_next, W_l W_l^T)``, n x n (MATH.md §2, §3)."""
    return W_next.mT @ W_next, W_l @ W_l.mT


def _kappa_direct(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """kappa from the n x n symmetric ``A``, ``B``: ``||AB - BA||_F / (||A||_F ||B||_F)`` with ``BA = (AB)^T`` (one
    product); absolute error ~ eps, so no cancellation issue for tiny kappa (MATH.md §3)."""
    den = torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B)
    AB = A @ B
    return safe_ratio(torch.linalg.matrix_norm(AB - AB.mT), den)


def _gram_factors(W_l: torch.Tensor, W_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C, G_P, G_Q) = (W_next W_l, W_next W_next^T, W_l^T W_l)``: the three products with n (MATH.md §3)."""
    return W_next @ W_l, W_next @ W_next.mT, W_l.mT @ W_l


def _kappa_trace(C: torch.Tensor, G_P: torch.Tensor, G_Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kappa, ||A||_F ||B||_F)`` by ``||[A,B]||_F^2 = 2 tr(G_P C G_Q C^T) - 2 ||C^T C||_F^2`` (MATH.md §3).

    ``||A||_F = ||G_P||_F`` and ``||B||_F = ||G_Q||_F`` reuse the same Grams (:func:`_gram_factors`).
    """
    small = C.mT @ C if C.shape[-1] <= C.shape[-2] else C @ C.mT
    small2 = small.square_().sum(dim=(-2, -1))  # in place: two m x k temporaries at a time, not four
    del small
    left = G_P @ C
    num2 = 2.0 * left.mul_(C @ G_Q).sum(dim=(-2, -1)) - 2.0 * small2
    del left
    den = torch.linalg.matrix_norm(G_P) * torch.linalg.matrix_norm(G_Q)
    return safe_ratio(num2.clamp_min(0).sqrt(), den), den


def commutator_ratio(
    W_l: torch.Tensor, W_next: torch.Tensor, *, bias_l: Optional[torch.Tensor] = None, method: str = "auto",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Commutator obstruction ``kappa = ||[A, B]||_F / (||A||_F ||B||_F)`` (MATH.md §3).

    ``kappa`` lies in ``[0, 1/sqrt(2)]`` (Bottcher-Wenzel); ``sqrt(2) * kappa`` is the normalised value in [0, 1].
    Methods: ``"trace"`` the Gram-factor trace form (all factors m x m, k x k, m x k); ``"factored"`` the float64
    form ``||W_next^T C W_l^T - W_l C^T W_next||_F`` reduced by a thin QR of ``[W_next^T | W_l]`` (accurate for
    tiny kappa, ~3-5x the trace cost); ``"direct"`` forms the n x n matrices (reference, small n only);
    ``"auto"`` (default) runs the trace form and recomputes, per batch member, with ``"factored"`` where the
    trace value is below ``AUTO_FACTORED_BELOW`` (1e-3), or uses ``"direct"`` when the hidden dim n is at most
    both outer dims (then n x n is the smallest form).  Zero ``W_l`` or ``W_next`` gives 0.
    """
    if method not in _METHODS:
        raise ValueError(f"commutator_ratio: method must be one of {_METHODS}; got {method!r}")
    W_l, W_next = _prepare(W_l, W_next, bias_l, dtype, "commutator_ratio")
    if method == "direct" or (method == "auto" and _hidden_is_small(W_l, W_next)):
        return _kappa_direct(*_hidden_grams(W_l, W_next))
    if method == "factored":
        return _kappa_factored(W_l, W_next)
    if method == "trace":
        return _kappa_trace(*_gram_factors(W_l, W_next))[0]
    return _kappa_auto(W_l, W_next, _gram_factors(W_l, W_next))


def _kappa_auto(W_l: torch.Tensor, W_next: torch.Tensor,
                grams: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``method="auto"`` kappa from precomputed :func:`_gram_factors` of the pair (MATH.md §3)."""
    kappa, den = _kappa_trace(*grams)
    return _refine((kappa < AUTO_FACTORED_BELOW) & (den > 0), kappa, _kappa_factored, W_l, W_next)


class GramDiagnostics(NamedTuple):
    """Commutator ratio and imbalance of a pair from one set of Gram factors (MATH.md §2, §3)."""

    commutator_ratio: torch.Tensor
    imbalance_norm: torch.Tensor
    relative_imbalance: torch.Tensor
    commutator_haar_rms: torch.Tensor


def gram_diagnostics(
    W_l: torch.Tensor, W_next: torch.Tensor, *, bias_l: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> GramDiagnostics:
    """``commutator_ratio`` (``method="auto"``), ``imbalance_norm`` and ``relative_imbalance`` of a pair from one
    computation of ``C = W_next W_l``, ``G_P = W_next W_next^T``, ``G_Q = W_l^T W_l`` (MATH.md §2, §3).

    Same values as the three separate functions (up to rounding), a third of their products with ``n``:
    ``||A||^2 = ||G_P||^2``, ``||B||^2 = ||G_Q||^2``, ``tr(AB) = ||C||^2``; kappa's Haar RMS
    (:func:`commutator_baseline`) from the same traces.
    """
    W_l, W_next = _prepare(W_l, W_next, bias_l, dtype, "gram_diagnostics")
    g = gram_pair_values(W_l, W_next, dtype=dtype)
    return GramDiagnostics(g.commutator_ratio, g.imbalance_norm, g.relative_imbalance, g.commutator_haar_rms)


def commutator_baseline(
    W_l: torch.Tensor, W_next: torch.Tensor, *, bias_l: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Null value of kappa: its root mean square over Haar-random rotations ``Q`` of the hidden basis, ``kappa`` of
    ``(Q W_l, W_next)`` (both spectra kept), in closed form (MATH.md §3).

    :func:`~hf_flag.geometry.baselines.commutator_haar_rms` of ``tr A = ||W_next||_F^2``, ``tr A^2 = ||G_P||_F^2``,
    ``tr B = ||W_l||_F^2``, ``tr B^2 = ||G_Q||_F^2`` (the smaller Gram of each side); exact, no sampling.
    """
    W_l, W_next = _prepare(W_l, W_next, bias_l, dtype, "commutator_baseline")
    return commutator_haar_rms(_fro2(W_next), _fro2(_small_gram(W_next)), _fro2(W_l), _fro2(_small_gram(W_l)),
                               W_l.shape[-2])


class SpectralPairValues(NamedTuple):
    """Pair diagnostics from the thin SVDs of both weights (:func:`pair_values_from_svd`, MATH.md §2-§4)."""

    commutator_ratio: torch.Tensor
    commutator_haar_rms: torch.Tensor
    imbalance_norm: torch.Tensor
    relative_imbalance: torch.Tensor
    imbalance_diagonal_norm: torch.Tensor
    transport: torch.Tensor
    product_rank: torch.Tensor
    range_overlap: torch.Tensor
    range_overlap_baseline: torch.Tensor
    imbalance_haar_rms: torch.Tensor
    relative_imbalance_haar_rms: torch.Tensor


#: :func:`pair_values_from_svd`'s ``product_rank`` counts the singular values of ``W_next W_l`` above this times
#: ``sigma_1(W_l) sigma_1(W_next)`` (the GL-invariant kernel dimension's cut, MATH.md §4)
PRODUCT_RANK_RTOL = 1e-8


def product_rank_rtol(rank_rtol: tuple[float, float]) -> float:
    """The relative cut (of ``sigma_1(W_l) sigma_1(W_next)``) at which the GL kernel dimension counts the ranks of
    ``W_l``, ``W_next`` and ``W_next W_l`` (MATH.md §4): :data:`PRODUCT_RANK_RTOL`, or the sum of the two weights'
    storage-precision cuts ``rank_rtol`` (§1) where that is coarser, since rounding each factor by ``rtol sigma_1``
    moves the product's singular values by up to ``(rtol_l + rtol_next) sigma_1 sigma_1``: a bf16 product of a
    range inside a kernel has singular values ~1e-3 of that scale, which a 1e-8 cut would count as rank.  Capped at
    1/2 (4-bit float storage, eps 0.5, would put the cut at sigma_1 sigma_1 itself: only values above half of it
    are then told from rounding)."""
    return min(0.5, max(PRODUCT_RANK_RTOL, float(rank_rtol[0]) + float(rank_rtol[1])))


def product_rank(M: torch.Tensor, scale: torch.Tensor, *, rtol: float = PRODUCT_RANK_RTOL,
                 gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Number of singular values of ``M`` (..., p, q) above ``rtol * scale`` (``scale`` (...)), batched.

    Full rank ``r = min(p, q)`` is certified without singular values where a Cholesky factorisation of the
    smaller Gram ``G`` (``M^T M`` or ``M M^T``, pass it as ``gram`` when formed already) shifted down by
    ``tau = (rtol scale)^2 + delta`` completes: then ``sigma_min(M)^2 > (rtol scale)^2``.  ``delta = 2 (r + c + 2)
    eps ||M||_F^2`` (``c = max(p, q)``) is twice the rounding of the three steps in the 2-norm: forming ``G``
    (``|dG| <= gamma_c |M|^T |M|``, so ``||dG|| <= c eps ||M||_F^2``), the shift (``eps ||M||_F^2``), and the
    factorisation (``R^T R = G - tau I + E`` with ``|E| <= gamma_(r+1) |R|^T |R|``, Higham Thm. 10.3, so
    ``||E|| <= (r + 1) eps ||R||_F^2 ~ (r + 1) eps tr G``); ``R^T R`` is positive semi-definite, hence
    ``lambda_min(M^T M) >= tau - delta / 2``.  Elsewhere (a kernel, or a smallest singular value below
    ``~sqrt(delta)``, ``7e-7 ||M||_F`` at r = c = 576) the singular values decide (``torch.linalg.svdvals``), so the
    count is always the one they give."""
    p, q = M.shape[-2:]
    if min(p, q) == 0:
        return torch.zeros(M.shape[:-2], dtype=torch.int64, device=M.device)
    if gram is None:
        gram = M.mT @ M if q <= p else M @ M.mT
    r, c = min(p, q), max(p, q)
    cut2 = (rtol * scale).square()
    delta = 2.0 * (r + c + 2) * torch.finfo(M.dtype).eps * _fro2(M)
    eye = torch.eye(r, dtype=M.dtype, device=M.device)
    info = torch.linalg.cholesky_ex(gram - (cut2 + delta)[..., None, None] * eye).info
    rank = torch.full(info.shape, r, dtype=torch.int64, device=M.device)
    if bool((info != 0).any()):
        uncertain = info != 0
        s = torch.linalg.svdvals(M[uncertain])
        rank[uncertain] = (s > (rtol * scale[uncertain]).unsqueeze(-1)).sum(-1)
    return rank


def pair_values_from_svd(
    W_l: torch.Tensor, W_next: torch.Tensor, svd_l: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    svd_next: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, storage_eps: Optional[float] = None,
) -> SpectralPairValues:
    """Commutator ratio (``method="auto"``) and its Haar RMS, ``||D||_F``, relative imbalance, ``||diag D||``, the
    transport matrix and the rank of ``W_next W_l`` from the thin SVDs of both weights, with no product over the
    hidden dim n beyond ``T`` itself (MATH.md §2-§4).

    ``svd_l = (U_l, s_l, Vh_l)`` of ``W_l`` (..., n, k) and ``svd_next = (U_n, s_n, Vh_n)`` of ``W_next``
    (..., m, n), float64 (:func:`~hf_flag.geometry.angles.thin_svd`; callers reuse one SVD per weight across the
    pairs it belongs to).  With ``T = Vh_n U_l`` (r_n x r_l, MATH.md §4) and ``M = S_n T S_l`` (so
    ``W_next W_l = U_n M Vh_l``): ``||A||^2 = sum s_n^4``, ``||B||^2 = sum s_l^4``, ``tr(AB) = ||M||^2``,
    ``tr(A^2 B^2) = ||S_n^2 T S_l^2||^2`` and ``tr(ABAB) = ||M^T M||^2`` (the smaller Gram of ``M``), hence
    ``||[A,B]||^2 = 2 ||S_n^2 T S_l^2||^2 - 2 ||M^T M||^2`` (MATH.md §3) and
    ``||D||^2 = ||A||^2 + ||B||^2 - 2 ||M||^2`` (§2).  Where those subtractions cancel (kappa below
    ``AUTO_FACTORED_BELOW``, ``||D||^2`` below ``IMBALANCE_FACTORED_BELOW`` of its scale) the value is recomputed
    from ``W_l``, ``W_next`` by the factored float64 forms, as in :func:`commutator_ratio`.  ``product_rank``:
    the rank of ``W_next W_l`` (= that of ``M``) at :func:`product_rank_rtol` of the storage cuts
    (:func:`product_rank`: certified by a Cholesky factorisation of the same Gram, singular values only where that
    cannot decide).  The Haar RMS is
    :func:`~hf_flag.geometry.baselines.commutator_haar_rms` of the four traces, as are the imbalance norms' Haar
    RMS (:func:`~hf_flag.geometry.baselines.imbalance_haar_rms`, ``relative_imbalance_haar_rms``); ``||diag D||`` as
    :func:`imbalance_diagonal_norm`.  ``range_overlap`` and its Haar value: :func:`range_overlap_from_svd` on the
    same ``T`` (MATH.md §3), ranks at the §1 cut of the storage precision ``storage_eps`` (default: the dtype the
    weights are passed in; pass the stored precision when they were upcast, as the full report does).
    """
    stored = (W_l, W_next)
    W_l, W_next = _prepare(W_l, W_next, None, torch.float64, "pair_values_from_svd")
    (U_l, s_l, _), (_, s_n, Vh_n) = svd_l, svd_next
    if U_l.shape[-2] != W_l.shape[-2] or Vh_n.shape[-1] != W_next.shape[-1] or \
            s_l.shape[-1] != U_l.shape[-1] or s_n.shape[-1] != Vh_n.shape[-2]:
        raise ValueError(f"pair_values_from_svd: svd_l (U {_shape(U_l)}, s {_shape(s_l)}) and svd_next (s "
                         f"{_shape(s_n)}, Vh {_shape(Vh_n)}) are not thin SVDs of W_l {tuple(W_l.shape)} and "
                         f"W_next {tuple(W_next.shape)}; pass thin_svd(W_l) and thin_svd(W_next)")
    T = Vh_n @ U_l
    a_sq, b_sq = s_n.square(), s_l.square()
    M = s_n.unsqueeze(-1) * T * s_l.unsqueeze(-2)
    gram = _small_gram(M)
    a2, b2 = a_sq.square().sum(-1), b_sq.square().sum(-1)
    comm2 = 2.0 * _fro2(a_sq.unsqueeze(-1) * T * b_sq.unsqueeze(-2)) - 2.0 * _fro2(gram)
    den = (a2 * b2).sqrt()
    kappa = safe_ratio(comm2.clamp_min(0).sqrt(), den)
    kappa = _refine((kappa < AUTO_FACTORED_BELOW) & (den > 0), kappa, _kappa_factored, W_l, W_next)
    d, a, b = _imbalance_from_norms(W_l, W_next, a2, b2, _fro2(M))
    traces = (a_sq.sum(-1), a2, b_sq.sum(-1), b2, W_l.shape[-2])
    baseline = commutator_haar_rms(*traces)
    rtol = (default_rtol(stored[0], storage_eps), default_rtol(stored[1], storage_eps))
    overlap = range_overlap_from_svd(T, s_l, s_n, W_l.shape[-2], rtol=rtol)
    scale = s_l[..., 0] * s_n[..., 0] if min(s_l.shape[-1], s_n.shape[-1]) else _fro2(M)  # (0 x 0 M: rank 0)
    diagonal = torch.linalg.vector_norm(W_next.square().sum(-2) - W_l.square().sum(-1), dim=-1)
    return SpectralPairValues(kappa, baseline, d, safe_ratio(d, a + b), diagonal, T,
                              product_rank(M, scale, rtol=product_rank_rtol(rtol), gram=gram), *overlap,
                              imbalance_haar_rms(*traces),
                              relative_imbalance_haar_rms(*traces))


def range_overlap_from_svd(T: torch.Tensor, s_l: torch.Tensor, s_next: torch.Tensor, n: int, *,
                           rtol: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(range_overlap, range_overlap_baseline)`` of a pair from its transport matrix (MATH.md §3, §1).

    ``range_overlap = ||P_{range W_l} P_{row W_next}||_F^2 / min(r_l, r_next)``: the normalised projection-kernel
    overlap of ``range B = col(W_l)`` with ``range A = row(W_next)`` (ranks ``r`` by the §1 cut ``s > s_max *
    rtol``), i.e. the sum of the squared entries of the ``r_next x r_l`` window of ``T = V^(l+1)T U^(l)`` over
    ``min(r_l, r_next)``.  In [0, 1], monotone in the principal angles between the two ranges: 0 when
    ``range W_l`` lies in ``ker W_next`` (where kappa is 0 too), 1 when one range contains the other.  Haar value
    ``max(r_l, r_next) / n`` (0 when a rank is 0).  ``T`` (..., r_next', r_l'), ``s_l``, ``s_next`` descending,
    batched; ``rtol = (rtol_l, rtol_next)`` (:func:`~hf_flag.geometry.angles.default_rtol` of the stored weights).
    """
    keep_l = s_l > s_l[..., :1] * rtol[0]
    keep_n = s_next > s_next[..., :1] * rtol[1]
    pk = (T.square() * keep_n.unsqueeze(-1).to(T.dtype) * keep_l.unsqueeze(-2).to(T.dtype)).sum((-2, -1))
    r_l, r_n = keep_l.sum(-1), keep_n.sum(-1)
    baseline = torch.where(torch.minimum(r_l, r_n) > 0, torch.maximum(r_l, r_n).to(T.dtype) / n,
                           torch.zeros_like(pk))
    return normalised_overlap(pk, r_l, r_n), baseline


class GramCut(NamedTuple):
    """A Gram ``G`` (..., r, r) at the rank cut (:func:`gram_cut`, MATH.md §1, §3): ``full`` (bool, (...,)) whether
    every eigenvalue is above the cut (rank ``r``); ``factor`` the lower Cholesky factor of ``G`` when ``full`` holds
    for every batch member (else ``None``)."""

    full: torch.Tensor
    factor: Optional[torch.Tensor]
    resolved: bool = True


def gram_resolves(G: torch.Tensor, rtol: float) -> bool:
    """Whether a Gram in its dtype resolves the §1 cut ``s > s_max rtol``: its eigenvalues' rounding
    ``size eps_Gram lambda_max`` is at most the cut ``rtol^2 lambda_max`` (a float32 Gram of bf16 weights does not
    above ``size ~ 520``; then :func:`gram_cut` decides only what it can prove and :func:`resolved_gram_cut` asks a
    float64 Gram for the rest)."""
    return G.shape[-1] * torch.finfo(G.dtype).eps <= rtol * rtol


def gram_cut_level(G: torch.Tensor, rtol: float) -> float:
    """The eigenvalue cut of a Gram relative to ``lambda_max``: ``max(rtol^2, size eps_Gram)``, the §1 singular-value
    cut ``s > s_max rtol`` as far as a Gram in its dtype resolves it (its eigenvalues carry rounding of order
    ``size eps_Gram lambda_max``; MATH.md §3)."""
    return max(rtol * rtol, G.shape[-1] * torch.finfo(G.dtype).eps)


def _positive_definite(G: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Whether ``G - shift I`` is positive definite, per batch member (a Cholesky succeeds: ``info == 0``)."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return torch.linalg.cholesky_ex(G - shift[..., None, None] * eye).info == 0


def gram_cut(G: torch.Tensor, rtol: float, *, top: Optional[torch.Tensor] = None) -> GramCut:
    """Whether the PSD Gram ``G = W W^T`` (or ``W^T W``, (..., r, r)) has rank ``r`` at the MATH.md §1 cut
    ``s > s_max rtol`` of ``W``, and its Cholesky factor where it does (MATH.md §3), without an eigendecomposition.

    Every eigenvalue exceeds ``tau = lambda_max c`` (``c`` = :func:`gram_cut_level`) iff ``G - tau I`` is positive
    definite: one Cholesky.  ``lambda_max = top^2`` with ``top`` the largest singular value of ``W`` (e.g. a partial
    SVD's ``s[..., 0]``, shape (...,)).  Without it, ``lambda_max`` is bracketed: ``||G||_F >= lambda_max`` (a
    success at that shift proves full rank) and a Rayleigh quotient of two power steps ``<= lambda_max`` (a failure
    there proves a deficit); the members these leave undecided take the eigenvalues (``eigvalsh``).  A zero ``G``
    has rank 0.  Where the Gram's dtype does not resolve the cut (:func:`gram_resolves`), ``full`` is decided at
    ``c = rtol^2 + size eps_Gram`` (so a success proves full rank at the cut) and ``resolved`` is False unless every
    member is full: the members below are undecided at this precision (:func:`resolved_gram_cut`)."""
    resolves = gram_resolves(G, rtol)
    c = gram_cut_level(G, rtol) if resolves else rtol * rtol + G.shape[-1] * torch.finfo(G.dtype).eps
    if top is not None:
        full = _positive_definite(G, top.to(G.dtype).square() * c)
    else:
        upper = torch.linalg.matrix_norm(G)
        x = G.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # a start with a component on the top eigenvector
        for _ in range(2):
            x = G @ x
        lower = ((x.mT @ G @ x) / (x.mT @ x).clamp_min(torch.finfo(G.dtype).tiny)).reshape(upper.shape)
        lower = lower * (1 - G.shape[-1] * torch.finfo(G.dtype).eps)  # a Rayleigh quotient rounded up stays below
        full = _positive_definite(G, upper * c)
        undecided = ~full & _positive_definite(G, lower * c)
        if bool(undecided.any()):
            lam = torch.linalg.eigvalsh(G[undecided])
            full = full.clone()
            full[undecided] = lam[..., 0] > lam[..., -1].clamp_min(0) * c
    factor = None
    if full.numel() and bool(full.all()):
        factor, info = torch.linalg.cholesky_ex(G)
        if bool((info != 0).any()):  # cannot happen for a G - tau I > 0 with tau >= 0; stay on the safe side
            factor = None
    return GramCut(full, factor, resolves or bool(full.all()))


def resolved_gram_cut(W: torch.Tensor, side: str, rtol: float, *, gram: torch.Tensor,
                      top: Optional[torch.Tensor] = None) -> tuple[GramCut, torch.Tensor]:
    """``(cut, G)``: :func:`gram_cut` of ``W``'s Gram ``gram`` (:func:`weight_gram` on ``side``), decided again on
    the float64 Gram when ``gram``'s dtype leaves it unresolved (``cut.resolved`` False: a float32 Gram of wide bf16
    weights with a singular value near the cut); ``G`` is the Gram the cut was decided on (for the eigenvectors
    and Cholesky factors read with it, MATH.md §1, §3)."""
    cut = gram_cut(gram, rtol, top=top)
    if cut.resolved:
        return cut, gram
    G = weight_gram(W, side, dtype=torch.float64)
    return gram_cut(G, rtol, top=top), G


def _full_rank(cut: GramCut) -> torch.Tensor:
    """The ranks of Grams that are full at the cut: their size, shape ``cut.full.shape``."""
    return torch.full(cut.full.shape, cut.factor.shape[-1], device=cut.factor.device)


def _kept_eigenvectors(G: torch.Tensor, rtol: float, whiten: bool = False,
                       eigh: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, rank)`` with ``F F^T`` the projector onto the eigenvectors of ``G`` above the cut
    (:func:`gram_cut_level`), or with ``whiten`` its pseudo-inverse ``G^+`` at the cut (columns scaled by
    ``lambda^{-1/2}``; discarded columns zero).  Eigendecomposition in the Gram's own dtype, or ``eigh``
    (``torch.linalg.eigh(G)``) when precomputed."""
    lam, V = torch.linalg.eigh(G) if eigh is None else eigh
    keep = lam > lam[..., -1:].clamp_min(0) * gram_cut_level(G, rtol)
    weight = lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt() if whiten else torch.ones_like(lam)
    return V * torch.where(keep, weight, torch.zeros_like(lam)).unsqueeze(-2), keep.sum(-1)


def range_overlap_from_grams(W_l: torch.Tensor, W_next: torch.Tensor, *, rtol: tuple[float, float],
                             gram_l: Optional[torch.Tensor] = None, gram_next: Optional[torch.Tensor] = None,
                             product: Optional[torch.Tensor] = None,
                             cuts: tuple[Optional[GramCut], Optional[GramCut]] = (None, None),
                             eighs: tuple[Optional[tuple], Optional[tuple]] = (None, None)
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`range_overlap_from_svd`'s ``(range_overlap, range_overlap_baseline)`` from Gram factors, without
    singular vectors (MATH.md §3, §1), in the Grams' dtype; ``W_l`` (..., n, k) bias-augmented, ``W_next`` (..., m, n).

    ``||P_{col W_l} P_{row W_next}||_F^2 = tr(G_Q^+ C^T G_P^+ C)`` with ``C = W_next W_l``, ``G_Q = W_l^T W_l``,
    ``G_P = W_next W_next^T`` when n is large (:func:`pair_gram_sides` ``("cols", "rows")``), and
    ``tr(P_B P_A)`` with the projectors onto the ranges of ``B = W_l W_l^T`` and ``A = W_next^T W_next`` when n is
    small.  Pseudo-inverses and projectors keep the eigenvalues above ``lambda_max max(rtol^2, size eps_Gram)``
    (:func:`gram_cut_level`: the §1 singular-value cut ``s > s_max rtol``, ``rtol = (rtol_l, rtol_next)``, as far
    as a Gram resolves it: ``s > s_max sqrt(size eps_Gram)``, 7e-8 for float64 Grams of 24 x 24), whose counts are
    the ranks.  The trace is ``||F_P^T C F_Q||_F^2`` with ``G^+ = F F^T``: where a Gram has full rank at the cut
    (:func:`gram_cut`; the common case) ``F = L^{-T}`` from its Cholesky factor (a triangular solve), otherwise its
    eigenvectors above the cut scaled by ``lambda^{-1/2}``; where both ``B`` and ``A`` have full rank their
    projectors are the identity.  ``gram_l``, ``gram_next``: the Grams :func:`pair_gram_sides` names,
    when shared (:func:`weight_gram`); ``product``: ``C`` when shared (:func:`pair_product`); ``cuts``: their
    :func:`gram_cut` at ``rtol`` when shared, with ``gram_l`` / ``gram_next`` the Grams they were decided on
    (:func:`resolved_gram_cut`); ``eighs``: their ``torch.linalg.eigh`` when already computed (e.g.
    by a window SVD on the same Gram), used where a Gram is not full at the cut."""
    side_l, side_next = pair_gram_sides(W_l, W_next)
    n = W_l.shape[-2]
    g_l = weight_gram(W_l, side_l, dtype=torch.float64) if gram_l is None else gram_l
    g_next = weight_gram(W_next, side_next, dtype=torch.float64) if gram_next is None else gram_next
    if cuts[0] is None:
        cut_l, g_l = resolved_gram_cut(W_l, side_l, rtol[0], gram=g_l)
    else:
        cut_l = cuts[0]
    if cuts[1] is None:
        cut_next, g_next = resolved_gram_cut(W_next, side_next, rtol[1], gram=g_next)
    else:
        cut_next = cuts[1]
    eighs = tuple(e if e is not None and e[0].dtype == g.dtype else None for e, g in zip(eighs, (g_l, g_next)))
    if side_l == "rows":  # n x n: B = W_l W_l^T, A = W_next^T W_next; tr(P_B P_A)
        if cut_l.factor is not None and cut_next.factor is not None:  # P_B = P_A = I_n
            r_l = r_next = torch.full(cut_l.full.shape, n, device=g_l.device)
            pk = r_l.double()
        else:
            (F_l, r_l), (F_next, r_next) = (_kept_eigenvectors(g_l, rtol[0], eigh=eighs[0]),
                                            _kept_eigenvectors(g_next, rtol[1], eigh=eighs[1]))
            wide = torch.promote_types(F_l.dtype, F_next.dtype)
            pk = (F_l.to(wide).mT @ F_next.to(wide)).square().sum((-2, -1), dtype=torch.float64)
    else:  # tr(G_Q^+ C^T G_P^+ C) = ||F_P^T C F_Q||_F^2 with G^+ = F F^T (Cholesky: F = L^{-T}, else eigenvectors)
        C = pair_product(W_l, W_next, g_next.dtype) if product is None else product.to(g_next.dtype)
        if cut_next.factor is not None:
            X, r_next = torch.linalg.solve_triangular(cut_next.factor, C, upper=False), _full_rank(cut_next)
        else:
            F, r_next = _kept_eigenvectors(g_next, rtol[1], whiten=True, eigh=eighs[1])
            X = F.mT @ C
        X = X.to(g_l.dtype)  # the two Grams' dtypes differ where one cut was decided in float64
        if cut_l.factor is not None:
            X, r_l = torch.linalg.solve_triangular(cut_l.factor.mT, X, upper=True, left=False), _full_rank(cut_l)
        else:
            F, r_l = _kept_eigenvectors(g_l, rtol[0], whiten=True, eigh=eighs[0])
            X = X @ F
        pk = X.square().sum((-2, -1), dtype=torch.float64)
    baseline = torch.where(torch.minimum(r_l, r_next) > 0, torch.maximum(r_l, r_next).double() / n,
                           torch.zeros_like(pk))
    return normalised_overlap(pk, r_l, r_next), baseline


def commutator_reading_holds(rank_a: int, rank_b: int, n: int) -> bool:
    """Whether ``kappa`` (and ``kappa / baseline``) reads as alignment for ``A = W_next^T W_next`` of rank
    ``rank_a`` and ``B = W_l W_l^T`` of rank ``rank_b`` in R^n (MATH.md §3, "When kappa reads as alignment").

    ``[A, B] = 0`` iff ``A`` and ``B`` share an eigenbasis.  If ``A`` has full rank (``ker A = 0``), every
    eigenvector of ``B`` with a nonzero eigenvalue is then an eigenvector of ``A`` with a nonzero eigenvalue: a
    direction ``W_l`` writes is a singular direction ``W_next`` reads, so small kappa means aligned bases;
    likewise if ``B`` has full rank.  If both have kernels, directions of ``range B`` inside ``ker A`` commute
    for free: ``range B`` in ``ker A`` (possible when ``rank_a + rank_b <= n``) gives kappa = 0 with orthogonal
    ranges, and a shared range with unrelated bases gives kappa above its Haar value (whose random rotations move
    ``range B`` partly into ``ker A``).  So the reading holds iff ``max(rank_a, rank_b) == n``; otherwise read
    ``range_overlap`` against ``range_overlap_baseline`` (:func:`range_overlap_from_svd`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"commutator_reading_holds: n={n!r} must be a positive int (the hidden dimension)")
    for name, value in (("rank_a", rank_a), ("rank_b", rank_b)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n:
            raise ValueError(f"commutator_reading_holds: {name}={value!r} must be an int in [0, n={n}]")
    return max(rank_a, rank_b) == n


def commutator_reading_of_pairs(W_l: torch.Tensor, W_next: torch.Tensor, *, storage_eps: Optional[float] = None,
                                s_l: Optional[torch.Tensor] = None, s_next: Optional[torch.Tensor] = None,
                                cuts: tuple[Optional[GramCut], Optional[GramCut]] = (None, None)) -> list[bool]:
    """:func:`commutator_reading_holds` for each pair of a batch, ``W_l`` (..., n, k), ``W_next`` (..., m, n), with
    the ranks counted at the MATH.md §1 cut (:func:`~hf_flag.geometry.angles.default_rtol` with the storage
    precision ``storage_eps`` of the weights, default their dtype's).

    Only whether one of the two weights has rank ``n`` matters: a weight whose shorter side is below ``n`` cannot
    (MLP pairs: ``n = d_ff`` above both ranks), so its rank is never computed; otherwise the rank comes from the
    complete spectra ``s_l`` / ``s_next`` when given (a thin SVD's), else from the weight's hidden-side Gram
    (``B = W_l W_l^T``, ``A = W_next^T W_next``, n x n) at the cut (:func:`gram_cut`): ``cuts`` when shared (the
    n x n Grams :func:`gram_pair_values` forms when n is small), else formed here in the weight's dtype (at least
    float32)."""
    n = W_l.shape[-2]
    batch = W_l.shape[:-2].numel()
    holds = torch.zeros(batch, dtype=torch.bool)
    for W, s, cut, side in ((W_l, s_l, cuts[0], "rows"), (W_next, s_next, cuts[1], "cols")):
        if min(W.shape[-2:]) < n or bool(holds.all()):  # cannot have rank n, or already decided
            continue
        rtol = default_rtol(W, storage_eps)
        if s is not None:
            full = (s > s[..., :1] * rtol).sum(-1) == n
        elif cut is not None:
            full = cut.full
        else:
            G = weight_gram(W, side, dtype=torch.promote_types(W.dtype, torch.float32))
            full = resolved_gram_cut(W, side, rtol, gram=G)[0].full
        holds |= full.reshape(-1).cpu()
    return holds.tolist()


def hidden_coordinates(W_l: torch.Tensor, W_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair in orthonormal coordinates of ``S = range [W_l | W_next^T]`` (MATH.md §4 invariance), float64.

    ``[W_l | W_next^T] = Q R`` (thin QR, ``R`` only): returns ``(X, Y) = (Q^T W_l, W_next Q) = (R[:, :k],
    R[:, k:]^T)``, hidden dim ``k + m`` instead of ``n``.  Commutator ratio, imbalance norms, transport scores,
    flag rank/soft matrices and the GL kernel dimension are invariant under an orthogonal change of the hidden
    basis and every subspace involved lies in ``S``, so they are the same on ``(X, Y)`` (up to rounding), at
    ``O((k+m)^3)`` after one ``O(n (k+m)^2)`` QR (Householder: backward stable column by column, so small
    principal angles between ``range W_l`` and ``row W_next`` stay resolved).  Reduces only when
    ``n >= QR_FIRST_RATIO (k + m)``; otherwise returns float64 copies of the pair.  Not for basis-dependent
    values (``diag D``, the Haar-rotation baseline).  Leading batch dims as in :func:`commutator_ratio`.
    """
    W_l, W_next = _prepare(W_l, W_next, None, torch.float64, "hidden_coordinates")
    k = W_l.shape[-1]
    if W_l.shape[-2] < QR_FIRST_RATIO * (k + W_next.shape[-2]):
        return W_l, W_next
    R = torch.linalg.qr(torch.cat([W_l, W_next.mT], dim=-1), mode="r").R
    return R[..., :k], R[..., k:].mT


def transport_matrix(W_l: torch.Tensor, W_next: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Transport matrix ``T = V^(l+1)T U^(l)`` (MATH.md §4), shape (..., min(m, n), min(n, k)).

    ``U^(l)``: left singular vectors of ``W_l``; ``V^(l+1)``: right singular vectors of ``W_next``, both in
    descending singular-value order (thin SVD).  Signs are arbitrary (scores use squares); where singular values
    are degenerate the individual vectors, hence the basis score, are not defined.
    """
    W_l, W_next = _prepare(W_l, W_next, None, dtype, "transport_matrix")
    return thin_svd_in_dtype(W_next)[2] @ thin_svd_in_dtype(W_l)[0]


def transport_scores(
    W_l: torch.Tensor, W_next: torch.Tensor, k: int, *, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(subspace, basis) = ((1/k) ||T_k||_F^2, (1/k) sum_i T_ii^2)``, T_k the top k x k window (MATH.md §4).

    Both are 1 for aligned top-k singular subspaces / bases; Haar baselines ``k/n`` and ``1/n``.
    """
    W_l, W_next = _prepare(W_l, W_next, None, dtype, "transport_scores")
    _check_window(k, min(W_l.shape[-2:]), min(W_next.shape[-2:]), where="transport_scores")
    return transport_scores_from_svd(thin_svd_in_dtype(W_l)[0], thin_svd_in_dtype(W_next)[2], k)


def _check_window(k: int, r_l: int, r_next: int, *, where: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(r_l, r_next):
        raise ValueError(f"{where}: k must be an int in [1, {min(r_l, r_next)}] (the thin-SVD ranks of W_l and "
                         f"W_next are {r_l}, {r_next}); got {k!r}")


def transport_scores_from_svd(U: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`transport_scores` from precomputed thin-SVD factors (MATH.md §4): ``U (..., n', r_l)`` left singular
    vectors of ``W_l`` and ``Vh (..., r_next, n')`` right singular vectors of ``W_next``, descending, in any common
    orthonormal coordinates of the hidden space (``T = Vh U`` does not depend on them).  Forms only ``T_k``.
    """
    if not (isinstance(U, torch.Tensor) and isinstance(Vh, torch.Tensor) and U.ndim >= 2
            and U.shape[-2] == Vh.shape[-1]):
        raise ValueError(f"transport_scores_from_svd: U {_shape(U)} (..., n, r_l) and Vh {_shape(Vh)} "
                         f"(..., r_next, n) must share the hidden dim n; pass thin-SVD factors of one pair")
    _check_window(k, U.shape[-1], Vh.shape[-2], where="transport_scores_from_svd")
    return transport_scores_from_matrix(Vh[..., :k, :] @ U[..., :k], k)


def transport_scores_from_matrix(T: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`transport_scores` of a transport matrix ``T = V^(l+1)T U^(l)`` (..., r_next, r_l) already formed
    (e.g. by :func:`pair_values_from_svd`), from its top ``k x k`` window (MATH.md §4)."""
    if not isinstance(T, torch.Tensor) or T.ndim < 2:
        raise ValueError(f"transport_scores_from_matrix: T must be a (..., r_next, r_l) tensor; got {_shape(T)}")
    _check_window(k, T.shape[-1], T.shape[-2], where="transport_scores_from_matrix")
    T_k = T[..., :k, :k]
    return _fro2(T_k) / k, torch.diagonal(T_k, dim1=-2, dim2=-1).square().sum(-1) / k


class GramPairValues(NamedTuple):
    """Kappa, its Haar RMS and the imbalance norms of a pair from one set of Gram factors (MATH.md §2, §3)."""

    commutator_ratio: torch.Tensor
    commutator_haar_rms: torch.Tensor
    imbalance_norm: torch.Tensor
    relative_imbalance: torch.Tensor
    imbalance_haar_rms: torch.Tensor
    relative_imbalance_haar_rms: torch.Tensor


def pair_gram_sides(W_l: torch.Tensor, W_next: torch.Tensor) -> tuple[str, str]:
    """Which Gram of each weight :func:`gram_pair_values` uses: ``("cols", "rows")`` (``G_Q = W_l^T W_l``,
    ``G_P = W_next W_next^T``) when the hidden dim n is large, ``("rows", "cols")`` (``B = W_l W_l^T``,
    ``A = W_next^T W_next``) when n is at most both outer dims (MATH.md §3)."""
    return ("rows", "cols") if _hidden_is_small(W_l, W_next) else ("cols", "rows")


def bf16_exact(X: torch.Tensor) -> bool:
    """Whether the float32 tensor ``X`` holds only bf16 numbers (the low 16 bits of every entry are zero: weights
    stored in bf16), checked a slice at a time (no full-size copy)."""
    if X.dtype != torch.float32:
        return False
    rows = max(1, 2 ** 22 // max(1, X.shape[-1]))
    return not any(bool(part.view(torch.int32).bitwise_and(0xFFFF).any())
                   for M in X.reshape(-1, *X.shape[-2:]) for part in M.split(rows))


@contextlib.contextmanager
def storage_exact_matmul(*factors: torch.Tensor) -> Iterator[bool]:
    """Float32 CPU matmuls on bf16 inputs with float32 accumulation (oneDNN, ``torch.backends.mkldnn.matmul.
    fp32_precision = "bf16"``) while inside, when every factor is a float32 CPU tensor of bf16 numbers
    (:func:`bf16_exact`: bf16-stored weights, never a derived matrix): the products of two bf16 numbers are exact
    in float32, so only the accumulation rounds, as in a float32 matmul (measured relative error 2.6e-7 against
    1.7e-7 at 4096 x 11008 x 4096), at half the cost on CPUs with bf16 dot products.  Otherwise (derived or
    float64 factors, other devices, a torch without the setting) nothing changes.  Yields whether the setting is
    on; restores it on exit."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    use = (matmul is not None and hasattr(matmul, "fp32_precision") and torch.backends.mkldnn.is_available()
           and all(F.device.type == "cpu" and bf16_exact(F) for F in factors))
    if not use:
        yield False
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield True
    finally:
        matmul.fp32_precision = before


#: at most this many bytes of a weight are converted to another dtype at a time (:func:`weight_gram`,
#: :func:`weight_norms`, :func:`pair_product`; e.g. a float32 weight's float64 Gram), so that no full-size converted
#: copy exists beside the weight: the default report's peak memory (issue #11 item 4, ``bench_lazy_rss.py``)
CONVERT_CHUNK_BYTES = 4 << 20


def _slices(W: torch.Tensor, dim: int, dtype: torch.dtype) -> list[slice]:
    """Index ranges along ``dim`` (-2 rows, -1 columns) of ``W`` whose slices, converted to ``dtype``, hold at most
    :data:`CONVERT_CHUNK_BYTES` each (at least one row or column; one range when ``W`` is empty)."""
    size = W.shape[dim]
    step = max(1, CONVERT_CHUNK_BYTES // max(1, W.numel() // max(1, size) * dtype.itemsize))
    return [slice(i, min(i + step, size)) for i in range(0, max(size, 1), step)]


def _take(W: torch.Tensor, dim: int, index: slice) -> torch.Tensor:
    """The slice ``index`` of ``W`` along ``dim`` (-2 or -1), a view."""
    return W[..., index, :] if dim == -2 else W[..., index]


def weight_gram(W: torch.Tensor, side: str, *, dtype: torch.dtype) -> torch.Tensor:
    """``W W^T`` (``side="rows"``) or ``W^T W`` (``"cols"``) in ``dtype``, batched: a Gram that several pairs
    share (a weight belongs to up to three pairs; :func:`gram_pair_values` takes it precomputed).  A float32 Gram
    of bf16-stored weights takes the storage-exact product (:func:`storage_exact_matmul`).  A weight in another
    dtype is converted a slice of the contracted dim at a time (:data:`CONVERT_CHUNK_BYTES`), the slices' Grams
    summed: no converted copy of the whole weight (the sum's rounding differs from one product's by a few ulp of
    ``dtype``)."""
    if side not in ("rows", "cols"):
        raise ValueError(f"weight_gram: side must be 'rows' or 'cols'; got {side!r}")
    check_matrix("W", W, where="weight_gram")
    G = None
    contracted = -1 if side == "rows" else -2
    for index in _slices(W, contracted, dtype) if W.dtype != dtype else (slice(None),):
        X = _take(W, contracted, index).to(dtype)
        with storage_exact_matmul(X):
            P = X @ X.mT if side == "rows" else X.mT @ X
        G = P if G is None else G.add_(P)
        del X, P
    return G


class WeightNorms(NamedTuple):
    """Squared norms of a weight ``W`` (..., r, c) in one dtype (:func:`weight_norms`, MATH.md §2)."""

    rows: torch.Tensor  # (..., r): ||W[i, :]||^2
    cols: torch.Tensor  # (..., c): ||W[:, j]||^2
    fro2: torch.Tensor  # (...): ||W||_F^2 (the sum of ``rows``)


def weight_norms(W: torch.Tensor, dtype: torch.dtype) -> WeightNorms:
    """:class:`WeightNorms` of ``W`` in ``dtype``, one pass over row slices of at most :data:`CONVERT_CHUNK_BYTES`
    (each row's norm summed whole, the columns' summed slice by slice), never a weight-sized temporary:
    ``tr A = ||W_next||_F^2``, ``tr B = ||W_l||_F^2`` (kappa's Haar RMS, MATH.md §3) and ``diag D``
    (:func:`imbalance_diagonal_from_norms`, §2) read them."""
    check_matrix("W", W, where="weight_norms")
    rows, cols = [], None
    for index in _slices(W, -2, dtype):
        squares = _take(W, -2, index).to(dtype).square()
        rows.append(squares.sum(-1))
        cols = squares.sum(-2) if cols is None else cols.add_(squares.sum(-2))
        del squares
    rows = torch.cat(rows, dim=-1)
    return WeightNorms(rows, cols, rows.sum(-1))


def pair_product(W_l: torch.Tensor, W_next: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``C = W_next W_l`` (..., m, k) in ``dtype``, the product :func:`gram_pair_values` and
    :func:`range_overlap_from_grams` share (MATH.md §3); storage-exact for bf16-stored float32 weights
    (:func:`storage_exact_matmul`).  Weights in another dtype are converted a slice of the hidden dim n at a time
    (:data:`CONVERT_CHUNK_BYTES` per weight), the slices' products summed, as in :func:`weight_gram`."""
    if W_l.dtype == dtype and W_next.dtype == dtype:
        indices = [slice(None)]
    else:
        wider = W_l if W_l.numel() >= W_next.numel() else W_next
        indices = _slices(wider, -2 if wider is W_l else -1, dtype)
    C = None
    for index in indices:
        L, N = _take(W_l, -2, index).to(dtype), _take(W_next, -1, index).to(dtype)
        with storage_exact_matmul(L, N):
            P = N @ L
        C = P if C is None else C.add_(P)
        del L, N, P
    return C


def gram_pair_values(W_l: torch.Tensor, W_next: torch.Tensor, *, dtype: torch.dtype,
                     gram_l: Optional[torch.Tensor] = None, gram_next: Optional[torch.Tensor] = None,
                     product: Optional[torch.Tensor] = None,
                     norms: tuple[Optional[WeightNorms], Optional[WeightNorms]] = (None, None)) -> GramPairValues:
    """:func:`gram_diagnostics` plus :func:`commutator_baseline` from the same Grams, in ``dtype``, no SVD and no
    ``n x n`` matrix unless n is at most both outer dims (MATH.md §2, §3); ``W_l`` already bias-augmented.

    The exact values the windowed report keeps beside its leading singular subspaces
    (:mod:`hf_flag.geometry.spectral`): the Haar RMS of kappa and of the imbalance norms
    (:mod:`~hf_flag.geometry.baselines`) need ``tr A = ||W_next||^2``, ``tr A^2 = ||G_P||^2``,
    ``tr B = ||W_l||^2``, ``tr B^2 = ||G_Q||^2``, which the commutator's Gram factors already hold.  Kappa below
    ``AUTO_FACTORED_BELOW`` and cancelling imbalances are recomputed by the factored float64 forms (as
    :func:`commutator_ratio` ``method="auto"``).  ``gram_l``, ``gram_next``: the weights' Grams on the sides
    :func:`pair_gram_sides` names (:func:`weight_gram`, in ``dtype``) when the caller shares them across pairs;
    ``product``: ``C = W_next W_l`` (:func:`pair_product`) when shared (used when n is large); ``norms``: the
    weights' :func:`weight_norms` in ``dtype`` when shared.  The weights are never converted whole (each of those
    converts a slice at a time).
    """
    _check_pair(W_l, W_next, dtype, "gram_pair_values")
    W_next = W_next.to(W_l.device)
    n = W_l.shape[-2]
    side_l, side_next = pair_gram_sides(W_l, W_next)
    gram_l = weight_gram(W_l, side_l, dtype=dtype) if gram_l is None else gram_l.to(dtype)
    gram_next = weight_gram(W_next, side_next, dtype=dtype) if gram_next is None else gram_next.to(dtype)
    norms_l, norms_next = (weight_norms(W, dtype) if v is None else v for W, v in zip((W_l, W_next), norms))
    if side_l == "rows":  # hidden dim small: B = W_l W_l^T, A = W_next^T W_next (n x n)
        A, B = gram_next, gram_l
        a2, b2 = _fro2(A), _fro2(B)
        d = torch.linalg.matrix_norm(A - B)
        kappa = _kappa_direct(A, B)
    else:  # the factored forms (_refine) read the weights in float64 themselves
        C = pair_product(W_l, W_next, dtype) if product is None else product.to(dtype)
        grams = (C, gram_next, gram_l)  # (C, G_P, G_Q)
        a2, b2 = _fro2(gram_next), _fro2(gram_l)
        d, _, _ = _imbalance_from_norms(W_l, W_next, a2, b2, _fro2(grams[0]))
        kappa = _kappa_auto(W_l, W_next, grams)
    traces = (norms_next.fro2.double(), a2.double(), norms_l.fro2.double(), b2.double(), n)
    baseline = commutator_haar_rms(*traces)
    return GramPairValues(kappa, baseline.to(kappa.dtype), d, safe_ratio(d, a2.sqrt() + b2.sqrt()),
                          imbalance_haar_rms(*traces).to(d.dtype), relative_imbalance_haar_rms(*traces).to(d.dtype))
