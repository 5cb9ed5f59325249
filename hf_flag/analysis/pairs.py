"""Pair rows' values: one pair ``W_l`` (n x k) -> ``W_next`` (m x n) sharing the hidden space R^n (MATH.md §2-§4).

Helpers of :mod:`hf_flag.analyze` (which documents the row kinds and values).
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch

from hf_flag.geometry.pairs import hidden_coordinates

#: Monte-Carlo samples of the commutator baseline: 8, or 2 when the hidden dim exceeds 512 (kappa of a Haar-rotated
#: pair concentrates as n grows, and each sample costs a full Gram-factor kappa, ~O(n k m))
COMMUTATOR_BASELINE_SAMPLES = 8
COMMUTATOR_BASELINE_SAMPLES_LARGE = 2
COMMUTATOR_BASELINE_LARGE_N = 512
SQRT2 = math.sqrt(2.0)


def batch_seed(kind: str, layer: int) -> int:
    """Seed of a batch of rows' Monte-Carlo baselines: a function of (kind, layer) only, so shards agree."""
    return zlib.crc32(f"{kind}|{layer}".encode())


def transport_k(n: int, k_in: int, m_out: int) -> int:
    """Transport window size ``min(k_in, m_out, ceil(n/2))`` for a pair with hidden dim ``n``: the top-k window
    never covers the whole hidden space, where the subspace score would be trivially 1 (MATH.md §4)."""
    return max(1, min(k_in, m_out, (n + 1) // 2))


def augment(W: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``[W | b]`` over the last two dims: the affine layer as one matrix (MATH.md §2)."""
    return W if bias is None else torch.cat([W, bias.unsqueeze(-1).to(W)], dim=-1)


def flag_details(flag) -> dict:
    """JSON-sized facts of a flag relative position: cuts, rank matrix, the block permutation as its nonzero
    entries ``[a, b, P_ab]``, and whether it is a (partial) permutation (MATH.md §4)."""
    P = flag.permutation
    return {"cuts_left": flag.cuts_left, "cuts_right": flag.cuts_right, "rank_matrix": flag.rank_matrix.tolist(),
            "permutation": [[a, b, int(P[a, b])] for a, b in P.nonzero().tolist()],
            "is_permutation": flag.is_permutation, "permutation_word": flag.permutation_word,
            "intersection_cut": flag.intersection_cut}


def flag_values(flag) -> dict[str, Optional[float]]:
    """Scalar values of a flag relative position at its largest common cut (``None`` when there is none)."""
    c = flag.intersection_cut
    soft = None if c is None else float(flag.soft_matrix[flag.cuts_left.index(c), flag.cuts_right.index(c)])
    return {"intersection_dim": None if c is None else float(flag.intersection_dim),
            "intersection_dim_baseline": None if c is None else float(flag.intersection_baseline),
            "intersection_soft": soft, "flag_tau": float(flag.tau)}


def pair_geometry_values(W_l: torch.Tensor, W_next: torch.Tensor, *, storage_eps: float,
                         commutator_baseline: Optional[torch.Tensor] = None) -> list[tuple[dict, dict]]:
    """(values, details) of a batch of full pair rows (``W_l`` (B, n, k) bias-augmented, ``W_next`` (B, m, n)):
    every value of :func:`pair_values` with ``cheap=False``; ``commutator_ratio_baseline`` only when
    ``commutator_baseline`` (B,) is given (the Monte-Carlo part, MATH.md §3).

    Factorisations are shared: one QR to :func:`~hf_flag.geometry.pairs.hidden_coordinates`, one set of Gram
    factors for kappa and the imbalance norms (MATH.md §2, §3), one thin SVD per side for transport scores, flags
    and the GL kernel dimension (MATH.md §4)."""
    from hf_flag.geometry.angles import default_rtol, thin_svd
    from hf_flag.geometry.baselines import transport_baselines
    from hf_flag.geometry.flags import flag_position_from_svd, gl_kernel_dim_from_spectra
    from hf_flag.geometry.pairs import transport_scores_from_svd

    X, Y = hidden_coordinates(W_l, W_next)
    rows = _gram_rows(X, Y, diagonal_of=(W_l, W_next))
    n, k = W_l.shape[-2], transport_k(W_l.shape[-2], W_l.shape[-1], W_next.shape[-2])
    sub_base, basis_base = transport_baselines(k, n)
    U, s_l, _ = thin_svd(X)
    _, s_next, Vh = thin_svd(Y)
    s_product = torch.linalg.svdvals(Y @ X)
    subspace, basis = transport_scores_from_svd(U, Vh, k)
    rank_rtol = (default_rtol(W_l), default_rtol(W_next))
    out = []
    for i in range(W_l.shape[0]):
        flag = flag_position_from_svd(U[i], s_l[i], Vh[i], s_next[i], n=n, rank_rtol=rank_rtol,
                                      storage_eps=storage_eps)
        if commutator_baseline is not None:
            rows[i]["commutator_ratio_baseline"] = float(commutator_baseline[i])
        rows[i].update({"subspace_score": float(subspace[i]), "subspace_score_baseline": sub_base,
                        "basis_score": float(basis[i]), "basis_score_baseline": basis_base,
                        **flag_values(flag), "gl_kernel_dim": float(gl_kernel_dim_from_spectra(
                            s_l[i], s_next[i], s_product[i]))})
        out.append((rows[i], {"transport_k": k, **flag_details(flag)}))
    return out


def _gram_rows(W_l: torch.Tensor, W_next: torch.Tensor, *, diagonal_of: tuple[torch.Tensor, torch.Tensor]
               ) -> list[dict]:
    """Per batch member: kappa, sqrt(2) kappa, ||D||, relative imbalance from one set of Gram factors of
    ``(W_l, W_next)``, and ``||diag D||`` of the pair ``diagonal_of`` (basis-dependent, MATH.md §2)."""
    from hf_flag.geometry.pairs import gram_diagnostics, imbalance_diagonal_norm

    g = gram_diagnostics(W_l, W_next)
    columns = {
        "commutator_ratio": g.commutator_ratio, "commutator_ratio_normalized": SQRT2 * g.commutator_ratio,
        "imbalance_norm": g.imbalance_norm, "relative_imbalance": g.relative_imbalance,
        "imbalance_diagonal_norm": imbalance_diagonal_norm(*diagonal_of),
    }
    return [{m: float(col[i]) for m, col in columns.items()} for i in range(W_l.shape[0])]


def pair_values(W_l: torch.Tensor, W_next: torch.Tensor, *, cheap: bool, storage_eps: float,
                seed: int) -> list[tuple[dict, dict]]:
    """(values, details) of a batch of pair rows, ``W_l`` (B, n, k) already bias-augmented, ``W_next`` (B, m, n).

    MATH.md §2 (imbalance), §3 (commutator ratio and its Haar-rotation baseline), §4 (transport, flags)."""
    if cheap:
        return [(r, {}) for r in _gram_rows(W_l, W_next, diagonal_of=(W_l, W_next))]
    from hf_flag.geometry.pairs import commutator_baseline

    generator = torch.Generator(device=W_l.device).manual_seed(seed)
    samples = COMMUTATOR_BASELINE_SAMPLES if W_l.shape[-2] <= COMMUTATOR_BASELINE_LARGE_N else \
        COMMUTATOR_BASELINE_SAMPLES_LARGE
    baseline = commutator_baseline(W_l, W_next, n_samples=samples, generator=generator)
    return pair_geometry_values(W_l, W_next, storage_eps=storage_eps, commutator_baseline=baseline)
