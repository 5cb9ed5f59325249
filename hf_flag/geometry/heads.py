"""Attention-head subspace overlaps, weight-only (MATH.md §6).

Read subspaces are ``col(W_Q^h)``, ``col(W_K^h)``, ``col(W_V^h)`` (``(d, d_h)`` slices, ``x @ W`` convention) and
the write subspace is ``row(W_O^h)``, i.e. ``col(W_O^h ^T)``.  Pass column spaces: ``W_O.transpose(-2, -1)`` for
writes.  Uses: same-layer write/write and read/read redundancy, cross-layer write(l) vs read(l+1).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from hf_flag.geometry.angles import check_dtype, check_matrix, default_rtol, normalised_overlap
from hf_flag.geometry.baselines import overlap_baseline

__all__ = ["head_overlap_matrix", "head_overlap_baseline", "HeadBases", "head_bases", "overlap_from_bases"]


class HeadBases(NamedTuple):
    """Zero-padded orthonormal bases ``Q`` (H, d, r) of per-head column spaces and their ranks ``(H,)``."""

    Q: torch.Tensor
    rank: torch.Tensor


def head_bases(X: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> HeadBases:
    """Orthonormal bases of the column spaces of ``X: (H, d, r)``, in ``dtype``, with the MATH.md §1 rank cut
    ``s > s_max default_rtol(X)`` (of ``X`` cast to ``dtype`` when that is coarser; columns beyond a head's rank
    are zero).  Compute once per layer and tensor; reuse for within-layer and cross-layer overlaps.

    ``dtype`` float64 (``full=True``): the left singular vectors of one batched SVD of ``X``.  float32 (the default
    report of coarse storage, MATH.md §4's precision policy; the cut is then at least ``6.9e-5 s_max`` for
    d = 576, far above float32's resolution of a singular value, ``~1e-7 s_max``): one batched thin QR
    ``X = Q R`` and the singular values of the small ``R`` (those of ``X``), at half the cost; a head of full
    column rank keeps ``Q`` (the same subspace as its left singular vectors, so every overlap is the same up to
    rounding), a rank-deficient one ``Q U_R`` over its kept directions (``R = U_R S V_R^T``)."""
    check_matrix("X", X, where="head_bases")
    check_dtype(dtype, where="head_bases")
    if X.ndim != 3:
        raise ValueError(f"head_bases: X has shape {tuple(X.shape)}; pass (heads, d, r)")
    stored, X = X, X.to(dtype)
    rtol = max(default_rtol(stored), default_rtol(X))  # the storage's cut, or the compute precision's if coarser
    if dtype == torch.float64 or X.shape[1] < X.shape[2]:  # (more columns than dimensions: R is not square)
        U, s, _ = torch.linalg.svd(X, full_matrices=False)
    else:
        Q, R = torch.linalg.qr(X)
        s = torch.linalg.svdvals(R)
        U = None
    keep = s > s[..., :1] * rtol
    if U is None and bool(keep.all()):
        return HeadBases(Q, keep.sum(-1))
    if U is None:
        U = Q @ torch.linalg.svd(R)[0]
    return HeadBases(U * keep.unsqueeze(-2), keep.sum(-1))


def overlap_from_bases(X: HeadBases, Y: HeadBases) -> torch.Tensor:
    """``(H, H')`` normalised overlaps ``||Q_{X_h}^T Q_{Y_g}||_F^2 / min(rank X_h, rank Y_g)`` of two
    :class:`HeadBases` in the same R^d, from one ``(H r) x (H' r')`` matmul (MATH.md §1, §6)."""
    (H, d, rx), (G, d2, ry) = X.Q.shape, Y.Q.shape
    if d != d2:
        raise ValueError(f"overlap_from_bases: bases of shape {tuple(X.Q.shape)} and {tuple(Y.Q.shape)} live in "
                         f"different model dimensions; pass heads of the same d")
    cross = X.Q.permute(0, 2, 1).reshape(H * rx, d) @ Y.Q.to(X.Q.device).permute(1, 0, 2).reshape(d, G * ry)
    pk = cross.pow(2).reshape(H, rx, G, ry).sum((1, 3))
    return normalised_overlap(pk, X.rank[:, None], Y.rank.to(X.rank.device)[None, :])


def head_overlap_matrix(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Normalised overlaps ``ov[h, g] = ||Q_{X_h}^T Q_{Y_g}||_F^2 / min(rank X_h, rank Y_g)`` (MATH.md §1, §6).

    ``X: (H, d, r)``, ``Y: (H', d, r')`` hold one column space per head; returns float64 ``(H, H')`` in [0, 1].
    Each head is orthonormalised in float64 with the MATH.md §1 rank cut (:func:`head_bases`); columns beyond a
    head's rank are zeroed, so rank-deficient heads are normalised by their true rank (a zero head has overlap 0).
    All pairs come from one ``(H r) x (H' r')`` matmul (:func:`head_bases` + :func:`overlap_from_bases`, which
    callers comparing one layer's heads several times should use directly).  Baseline: :func:`head_overlap_baseline`.
    """
    where = "head_overlap_matrix"
    check_matrix("X", X, where=where)
    check_matrix("Y", Y, where=where)
    if X.ndim != 3 or Y.ndim != 3 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"{where}: X has shape {tuple(X.shape)} and Y has shape {tuple(Y.shape)}; pass "
                         f"(heads, d, r) and (heads', d, r') with the same model dimension d")
    return overlap_from_bases(head_bases(X), head_bases(Y))


def head_overlap_baseline(r: int, r_prime: int, d: int) -> float:
    """Haar value of a head overlap for ranks ``r``, ``r_prime`` in R^d: ``max(r, r') / d`` (MATH.md §6, §1)."""
    return overlap_baseline(r, r_prime, d)
