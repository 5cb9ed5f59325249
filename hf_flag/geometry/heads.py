"""Attention-head subspace overlaps, weight-only (MATH.md §6).

Read subspaces are ``col(W_Q^h)``, ``col(W_K^h)``, ``col(W_V^h)`` (``(d, d_h)`` slices, ``x @ W`` convention) and
the write subspace is ``row(W_O^h)``, i.e. ``col(W_O^h ^T)``.  Pass column spaces: ``W_O.transpose(-2, -1)`` for
writes.  Uses: same-layer write/write and read/read redundancy, cross-layer write(l) vs read(l+1).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from hf_flag.geometry.angles import check_matrix, normalised_overlap, padded_orthonormal_basis
from hf_flag.geometry.baselines import overlap_baseline

__all__ = ["head_overlap_matrix", "head_overlap_baseline", "HeadBases", "head_bases", "overlap_from_bases"]


class HeadBases(NamedTuple):
    """Zero-padded float64 orthonormal bases ``Q`` (H, d, r) of per-head column spaces and their ranks ``(H,)``."""

    Q: torch.Tensor
    rank: torch.Tensor


def head_bases(X: torch.Tensor) -> HeadBases:
    """One batched float64 SVD of ``X: (H, d, r)`` with the MATH.md §1 rank cut (columns beyond a head's rank are
    zeroed).  Compute once per layer and tensor; reuse for within-layer and cross-layer overlaps."""
    check_matrix("X", X, where="head_bases")
    if X.ndim != 3:
        raise ValueError(f"head_bases: X has shape {tuple(X.shape)}; pass (heads, d, r)")
    return HeadBases(*padded_orthonormal_basis(X))


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
    Each head is orthonormalised by a batched float64 SVD with the MATH.md §1 rank cut; columns beyond a head's
    rank are zeroed, so rank-deficient heads are normalised by their true rank (a zero head has overlap 0).
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
