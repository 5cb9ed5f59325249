"""Singular flags of adjacent layers, their relative position (rank matrix, Bruhat permutation) and the
GL(n)-invariant kernel dimension (MATH.md §4).

``W_l`` is ``n x k`` and ``W_next`` (= W_{l+1}) is ``m x n``; both act on the hidden space R^n.  The left singular
vectors ``u_1, u_2, ...`` of ``W_l`` give the flag ``F_i = span(u_1..u_i)``, the right singular vectors
``v_1, v_2, ...`` of ``W_next`` give ``G_j = span(v_1..v_j)``.

Cut rule (partial flags).  A top-``i`` singular subspace is only defined when ``sigma_i`` is separated from
``sigma_{i+1}`` (MATH.md §4), so a side's flag is cut after ``i`` (``1 <= i <= rank``, ``sigma_{rank+1} := 0``)
only where both hold:

* relative gap: ``sigma_i >= gap_ratio * sigma_{i+1}`` (always true at the rank);
* Wedin bound: ``wedin_i = 10 * storage_eps * sigma_1 / (sigma_i - sigma_{i+1}) <= max_tau`` (the rotation a
  storage-rounding perturbation can cause is small).

If more than ``max_cuts`` positions qualify, the ``max_cuts`` with the smallest Wedin bound are kept.  The whole
space R^n is always the last element of both flags, so the rank matrix's last row/column is trivial
(``r_{i,n} = i``, ``r_{n,j} = j``) and the block matrix ``P`` has the block sizes as row/column sums.  The rank of
a side is the MATH.md §1 cut ``sigma > sigma_1 * default_rtol(W)`` (``max(shape) eps_compute + eps_storage``).

Default tolerance: ``tau = max(1e-6, max_c wedin_c)`` over the kept cuts ``c < n`` of *both* sides, i.e. the
smallest gap (relative to its own side's ``sigma_1``) sets one tolerance for the whole rank matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from hf_flag.geometry.angles import thin_svd_in_dtype, check_matrix, default_rtol, storage_eps as dtype_eps
from hf_flag.geometry.baselines import (gl_kernel_dim_baseline, gl_kernel_dim_exception_bound,
                                       intersection_baseline as _generic_intersection)
from hf_flag.geometry.pairs import PRODUCT_RANK_RTOL, hidden_coordinates

__all__ = [
    "FlagRelativePosition",
    "flag_cuts",
    "flag_relative_position",
    "flag_position_from_svd",
    "block_differences",
    "rank_matrix_from_permutation",
    "permutation_from_rank_matrix",
    "gl_invariant_kernel_dim",
    "gl_kernel_dim_from_spectra",
    "gl_kernel_dim_from_product_rank",
    "gl_kernel_dim_generic",
    "identity_agreement",
]

FLOAT32_EPS = torch.finfo(torch.float32).eps
GAP_RATIO = 1.25  # default relative gap sigma_i / sigma_{i+1} for a cut
MAX_TAU = 0.1  # default largest Wedin angle bound (radians) a cut may have
#: relative tolerance of the rank counts of the GL-invariant kernel dimension (MATH.md §4)
GL_KERNEL_RTOL = PRODUCT_RANK_RTOL
# The GL kernel dimension's baseline is given only where at most this Haar probability of rotations give another
# value (baselines.gl_kernel_dim_exception_bound; MATH.md §4): not where the spectra spread past the cut.
GL_BASELINE_MAX_EXCEPTION = 1e-3
#: the per-row flag tolerance rule (:func:`flag_cuts`), as reported in ``Report.params``
FLAG_TAU_RULE = "max(1e-6, 10 eps_storage sigma_1 / gap_k), MATH.md §4"
SOFT_SKIP_MARGIN = 1e-8  # far above the rounding error of a window's sum cos^2, so the skip is never wrong
#: a window's count comes from its cosines unless one lies within ``COS_BAND_ULPS * n' * eps`` of ``cos(tau)``
#: (``n'`` the hidden coordinates' dimension: an O(n' eps) bound of the cosines' rounding error, from the
#: orthonormality of the singular vectors); only then are the sines computed (MATH.md §1: arccos has a floor)
COS_BAND_ULPS = 4


@dataclass
class FlagRelativePosition:
    """Relative position of the singular flags of ``W_l`` (left, ``F_i``) and ``W_next`` (right, ``G_j``).

    ``rank_matrix[a, b] = dim(F_{cuts_left[a]} ∩ G_{cuts_right[b]})`` (number of principal angles below ``tau``);
    ``soft_matrix`` the same entry as ``sum cos^2`` of all principal angles (the projection kernel);
    ``permutation`` the block differences ``P_ab = r_ab - r_{a-1,b} - r_{a,b-1} + r_{a-1,b-1}``;
    ``is_permutation``: ``P >= 0`` everywhere, i.e. ``P`` is a (partial) permutation matrix: a non-negative integer
    matrix whose row/column sums are the block sizes (a permutation matrix for complete flags);
    ``permutation_word``: for complete flags (all cuts ``1..n``) with ``is_permutation``, ``w(a)`` for
    ``a = 1..n`` (1-based, ``r_ij = #{a <= i : w(a) <= j}``), else ``None``;
    ``intersection_cut``: largest cut ``c < n`` common to both flags (``None`` if there is none), with
    ``intersection_dim = dim(F_c ∩ G_c)`` and its generic value ``intersection_baseline = max(0, 2c - n)``.
    Small results are CPU tensors.
    """

    cuts_left: list[int]
    cuts_right: list[int]
    rank_matrix: torch.Tensor
    soft_matrix: torch.Tensor
    permutation: torch.Tensor
    is_permutation: bool
    tau: float
    intersection_dim: Optional[int]
    intersection_baseline: Optional[int]
    intersection_cut: Optional[int]
    permutation_word: Optional[list[int]]
    n: int
    gap_ratio: float
    max_tau: float
    storage_eps: float

    def to_dict(self) -> dict:
        """JSON-ready dict (tensors become nested lists)."""
        return {name: (value.tolist() if isinstance(value, torch.Tensor) else value)
                for name, value in vars(self).items()}


def _check_float(where: str, name: str, value: float, lo: float, hi: float, *, closed_lo: bool = False) -> float:
    """``float(value)`` if it lies in ``(lo, hi)`` (``[lo, hi)`` with ``closed_lo``), else ``ValueError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        lo <= value < hi if closed_lo else lo < value < hi)
    if not ok:
        raise ValueError(f"{where}: {name}={value!r} must be a number in {'[' if closed_lo else '('}{lo}, {hi})")
    return float(value)


def _check_layer_pair(W_l: torch.Tensor, W_next: torch.Tensor, *, where: str) -> None:
    check_matrix("W_l", W_l, where=where)
    check_matrix("W_next", W_next, where=where)
    if W_l.ndim != 2 or W_next.ndim != 2 or W_next.shape[1] != W_l.shape[0]:
        raise ValueError(
            f"{where}: W_l has shape {tuple(W_l.shape)} (n x k) and W_next has shape {tuple(W_next.shape)} (m x n); "
            f"pass two matrices with W_next.shape[1] == W_l.shape[0] (nn.Linear out x in; transpose Conv1D)")


def _numerical_rank(s: torch.Tensor, rtol: float, scale: Optional[float] = None) -> int:
    """Number of singular values above ``rtol * scale`` (``scale`` defaults to ``s_max``; empty -> 0)."""
    if s.numel() == 0:
        return 0
    return int((s > rtol * (float(s[0]) if scale is None else scale)).sum())


def flag_cuts(s: torch.Tensor, rank: int, *, storage_eps: float = FLOAT32_EPS, gap_ratio: float = GAP_RATIO,
              max_tau: float = MAX_TAU, max_cuts: int = 64, next_value: float = 0.0) -> tuple[list[int], list[float]]:
    """Significant cut positions of a descending spectrum ``s`` and their Wedin bounds (module docstring rule).

    Returns ascending cuts ``i`` (``1 <= i <= rank``) and ``wedin_i = 10 storage_eps sigma_1 / (sigma_i -
    sigma_{i+1})`` for each (MATH.md §4), with ``sigma_{rank+1} = next_value`` (0: the rank cut; the next
    singular value when ``s[:rank]`` is a leading window of a longer spectrum).
    """
    if s.ndim != 1 or not 0 <= rank <= s.numel():
        raise ValueError(f"flag_cuts: s has shape {tuple(s.shape)} and rank={rank}; pass a 1-D spectrum and "
                         f"0 <= rank <= len(s)")
    if rank == 0:
        return [], []
    top = s[:rank].to(torch.float64)
    below = torch.cat([top[1:], top.new_full((1,), float(next_value))])
    wedin = 10.0 * storage_eps * top[0] / (top - below)
    ok = (top >= gap_ratio * below) & (wedin <= max_tau)
    candidates = [(float(wedin[i]), i + 1) for i in torch.nonzero(ok).flatten().tolist()]
    kept = sorted(sorted(candidates)[:max_cuts], key=lambda item: item[1])
    return [cut for _, cut in kept], [bound for bound, _ in kept]


def _residual_factor(X: torch.Tensor, Y: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """R factor of the part of ``X`` outside ``range(Y)`` (``cross = Y^T X``), projected twice for orthogonality."""
    residual = X - Y @ cross
    residual = residual - Y @ (Y.transpose(0, 1) @ residual)
    return torch.linalg.qr(residual, mode="r").R


def _count_small_sines(R_small: torch.Tensor, tail: torch.Tensor, sin_tau: float) -> int:
    """Number of principal angles below tau from the stacked residual ``[R_small; tail]`` (sines, MATH.md §1)."""
    sines = torch.linalg.svdvals(torch.cat([R_small, tail], dim=0))
    return int((sines < sin_tau).sum())


def block_differences(r: torch.Tensor) -> torch.Tensor:
    """``P_ab = r_ab - r_{a-1,b} - r_{a,b-1} + r_{a-1,b-1}`` with ``r_{0,*} = r_{*,0} = 0`` (MATH.md §4)."""
    padded = torch.nn.functional.pad(r, (1, 0, 1, 0))
    return padded[1:, 1:] - padded[:-1, 1:] - padded[1:, :-1] + padded[:-1, :-1]


def _check_flag_options(where: str, storage_eps: float, gap_ratio: float, max_tau: float,
                        max_cuts: int) -> dict:
    """Validated cut options of :func:`flag_cuts` (module docstring rule)."""
    options = dict(storage_eps=_check_float(where, "storage_eps", storage_eps, 0.0, 1.0),
                   gap_ratio=_check_float(where, "gap_ratio", gap_ratio, 1.0, math.inf, closed_lo=True),
                   max_tau=_check_float(where, "max_tau", max_tau, 0.0, math.pi / 2))
    if isinstance(max_cuts, bool) or not isinstance(max_cuts, int) or max_cuts < 1:
        raise ValueError(f"{where}: max_cuts={max_cuts!r} must be a positive int")
    return {**options, "max_cuts": max_cuts}


def flag_relative_position(W_l: torch.Tensor, W_next: torch.Tensor, *, tau: Optional[float] = None,
                           storage_eps: Optional[float] = None, gap_ratio: float = GAP_RATIO,
                           max_tau: float = MAX_TAU, max_cuts: int = 64) -> FlagRelativePosition:
    """Rank matrix, soft matrix and Bruhat block permutation of the singular flags of ``W_l`` and ``W_next``.

    MATH.md §4: ``r_ij = #{principal angles between F_i and G_j below tau}``.  A window's count is read from its
    cosines when none lies within the rounding band ``COS_BAND_ULPS * n * eps`` of ``cos(tau)`` (then every angle
    is decidably above or below tau); otherwise from the sines (the residual of the smaller subspace, never
    ``arccos``), so tiny angles near tau are resolved.  ``storage_eps`` is the
    epsilon of the dtype the weights were stored in (bf16: 7.8e-3); ``None`` (default) takes the coarser of
    float32 and the two inputs' dtypes, so half-precision input is read at its own precision.  Cuts, ``tau``
    default and parameters as in the module docstring.

    Cost: when ``n >= 1.5 (k + m)`` one QR to :func:`~hf_flag.geometry.pairs.hidden_coordinates` (hidden dim
    ``k + m``), then two thin SVDs (:func:`~hf_flag.geometry.angles.thin_svd`) and
    :func:`flag_position_from_svd`.  No ``n x n`` matrix is formed.
    """
    where = "flag_relative_position"
    _check_layer_pair(W_l, W_next, where=where)
    if storage_eps is None:
        storage_eps = max(FLOAT32_EPS, dtype_eps(W_l), dtype_eps(W_next))
    options = _check_flag_options(where, storage_eps, gap_ratio, max_tau, max_cuts)
    X, Y = hidden_coordinates(W_l, W_next)
    U, s_left, _ = thin_svd_in_dtype(X)
    _, s_right, Vh = thin_svd_in_dtype(Y)
    return _position_from_svd(U, s_left, Vh, s_right, n=W_l.shape[0], rank_rtol=(default_rtol(W_l),
                              default_rtol(W_next)), tau=tau, where=where, **options)


def flag_position_from_svd(U: torch.Tensor, s_left: torch.Tensor, Vh: torch.Tensor, s_right: torch.Tensor, *,
                           n: int, rank_rtol: tuple[float, float], tau: Optional[float] = None,
                           storage_eps: float = FLOAT32_EPS, gap_ratio: float = GAP_RATIO,
                           max_tau: float = MAX_TAU, max_cuts: int = 64,
                           transport: Optional[torch.Tensor] = None, truncated: bool = False) -> FlagRelativePosition:
    """:func:`flag_relative_position` from precomputed thin SVDs ``W_l = U diag(s_left) .``,
    ``W_next = . diag(s_right) Vh`` (MATH.md §4), for callers that reuse the factorisations; ``transport``:
    ``T = Vh U`` when the caller has formed it already (then the cosine matrix is not recomputed).

    ``U (n', r_l)`` and ``Vh (r_r, n')`` may be expressed in any orthonormal coordinates of a subspace of the
    hidden space R^n that contains both ``range W_l`` and ``row W_next`` (``n' <= n``): the rank and soft
    matrices are invariant under such a change of basis (MATH.md §4).  ``n`` is the true hidden dimension (last
    flag element, generic intersection); ``rank_rtol = (rtol_left, rtol_right)`` the MATH.md §1 rank cuts
    (:func:`~hf_flag.geometry.angles.default_rtol` of the original weights).  ``truncated``: the factors are a
    leading window (:func:`hf_flag.geometry.spectral.partial_svd`): ``s_left``, ``s_right`` hold one singular value
    more than ``U``, ``Vh`` hold vectors, which closes the last cut; the flags are then cut inside the window only.
    """
    where = "flag_position_from_svd"
    for name, X in (("U", U), ("s_left", s_left), ("Vh", Vh), ("s_right", s_right)):
        if not isinstance(X, torch.Tensor) or X.ndim != (1 if name.startswith("s") else 2):
            raise ValueError(f"{where}: {name} must be a {'1-D' if name.startswith('s') else '2-D'} tensor "
                             f"(thin SVD factors of one pair); got {getattr(X, 'shape', type(X).__name__)}")
    extra = int(truncated)
    if U.shape[0] != Vh.shape[1] or U.shape[1] + extra != s_left.numel() or \
            Vh.shape[0] + extra != s_right.numel() or not U.shape[0] <= n:
        raise ValueError(f"{where}: U {tuple(U.shape)}, s_left {tuple(s_left.shape)}, Vh {tuple(Vh.shape)}, "
                         f"s_right {tuple(s_right.shape)} and n={n} do not fit thin SVDs of W_l (n x k) and "
                         f"W_next (m x n); pass torch.linalg.svd(..., full_matrices=False) factors")
    if transport is not None and (not isinstance(transport, torch.Tensor) or
                                  tuple(transport.shape) != (Vh.shape[0], U.shape[1])):
        raise ValueError(f"{where}: transport has shape {getattr(transport, 'shape', type(transport).__name__)}; "
                         f"pass T = Vh @ U of shape {(Vh.shape[0], U.shape[1])} or None")
    options = _check_flag_options(where, storage_eps, gap_ratio, max_tau, max_cuts)
    if U.dtype != torch.float64 or Vh.dtype != torch.float64:
        # Vectors computed in a lower precision (the default report's float32 windows) are orthonormal only to its
        # rounding, so cosines of exactly shared directions miss cos(tau) = 1 - tau^2/2 and the float64 band that
        # sends them to the sine route: re-orthonormalise in float64 (a thin QR keeps every leading span, so every
        # flag element) and form the cosines from the new bases.
        U, Vh, transport = torch.linalg.qr(U.to(torch.float64)).Q, torch.linalg.qr(Vh.to(torch.float64).mT).Q.mT, None
    return _position_from_svd(U.to(torch.float64), s_left, Vh.to(torch.float64), s_right, n=n,
                              rank_rtol=rank_rtol, tau=tau, transport=transport, truncated=truncated, where=where,
                              **options)


def _cut_rank(s: torch.Tensor, rtol: float, truncated: bool) -> tuple[int, float]:
    """``(rank, sigma_{rank+1})`` for :func:`flag_cuts`: of the whole spectrum, or, ``truncated``, of its leading
    window ``s[:-1]`` closed by the next value ``s[-1]`` (0 when the rank falls inside the window)."""
    if not truncated:
        return _numerical_rank(s, rtol), 0.0
    rank = _numerical_rank(s[:-1], rtol, float(s[0]) if s.numel() else None)
    return rank, (float(s[rank]) if rank == s.numel() - 1 else 0.0)


def _position_from_svd(U: torch.Tensor, s_left: torch.Tensor, Vh: torch.Tensor, s_right: torch.Tensor, *, n: int,
                       rank_rtol: tuple[float, float], tau: Optional[float], storage_eps: float, gap_ratio: float,
                       max_tau: float, max_cuts: int, transport: Optional[torch.Tensor] = None,
                       truncated: bool = False, where: str) -> FlagRelativePosition:
    """Body of :func:`flag_position_from_svd` (validated input; ``where`` names the caller in errors).

    Cost: one ``p x q`` cross matrix ``N = U_p^T V_q`` (or the caller's ``transport``); each cut pair then needs
    the singular values of its ``i x j`` window of ``N`` (skipped when ``sum cos^2 < cos^2 tau`` proves the count
    is 0) and, only when a cosine is within rounding of ``cos(tau)``, one SVD of a ``(min(i,j) + ...) x
    min(i,j)`` window built from ``N`` and the R factors of at most two thin QRs (``n' x p``, ``n' x q``).
    """
    options = dict(storage_eps=storage_eps, gap_ratio=gap_ratio, max_tau=max_tau, max_cuts=max_cuts)
    (rank_l, next_l), (rank_r, next_r) = _cut_rank(s_left, rank_rtol[0], truncated), \
        _cut_rank(s_right, rank_rtol[1], truncated)
    cuts_l, wedin_l = flag_cuts(s_left, rank_l, next_value=next_l, **options)
    cuts_r, wedin_r = flag_cuts(s_right, rank_r, next_value=next_r, **options)
    cuts_l, cuts_r = [c for c in cuts_l if c < n], [c for c in cuts_r if c < n]
    if tau is None:
        tau = max([1e-6] + wedin_l[:len(cuts_l)] + wedin_r[:len(cuts_r)])
    tau = _check_float(where, "tau", tau, 0.0, math.pi / 2)

    p, q = (cuts_l[-1] if cuts_l else 0), (cuts_r[-1] if cuts_r else 0)
    U, V = U[:, :p], Vh[:q].transpose(0, 1)
    # (p, q): N[a, b] = cos-matrix entry u_a . v_b
    N = U.transpose(0, 1) @ V if transport is None else transport[:q, :p].transpose(0, 1).to(torch.float64)
    soft = N.pow(2).cumsum(0).cumsum(1).cpu()
    sin_tau, cos2_tau = math.sin(tau), math.cos(tau) ** 2
    factors: dict[str, torch.Tensor] = {}

    def residual(side: str) -> torch.Tensor:  # R factor of U_p outside range(V_q) ("U") or the reverse ("V")
        if side not in factors:
            factors[side] = _residual_factor(U, V, N.transpose(0, 1)) if side == "U" else _residual_factor(V, U, N)
        return factors[side]

    cos_tau = math.cos(tau)
    cos_band = COS_BAND_ULPS * U.shape[0] * torch.finfo(torch.float64).eps

    def entry(i: int, j: int) -> tuple[int, float]:
        if i == n or j == n:
            return min(i, j), float(min(i, j))
        soft_ij = float(soft[i - 1, j - 1])
        if soft_ij < cos2_tau - SOFT_SKIP_MARGIN:  # r * cos^2(tau) <= soft: no angle below tau
            return 0, soft_ij
        cosines = torch.linalg.svdvals(N[:i, :j])
        if not bool(((cosines - cos_tau).abs() <= cos_band).any()):  # every angle clearly above or below tau
            return int((cosines > cos_tau).sum()), soft_ij
        if i <= j:
            return _count_small_sines(residual("U")[:i, :i], N[:i, j:].transpose(0, 1), sin_tau), soft_ij
        return _count_small_sines(residual("V")[:j, :j], N[i:, :j], sin_tau), soft_ij

    cuts_l, cuts_r = cuts_l + [n], cuts_r + [n]
    table = [[entry(i, j) for j in cuts_r] for i in cuts_l]
    rank_matrix = torch.tensor([[r for r, _ in row] for row in table], dtype=torch.int64)
    soft_matrix = torch.tensor([[x for _, x in row] for row in table], dtype=torch.float64)
    P = block_differences(rank_matrix)
    is_perm = bool((P >= 0).all())
    complete = cuts_l == cuts_r == list(range(1, n + 1))
    common = sorted(set(cuts_l) & set(cuts_r) - {n})
    c = common[-1] if common else None
    return FlagRelativePosition(
        cuts_left=cuts_l, cuts_right=cuts_r, rank_matrix=rank_matrix, soft_matrix=soft_matrix, permutation=P,
        is_permutation=is_perm, tau=tau,
        intersection_dim=None if c is None else int(rank_matrix[cuts_l.index(c), cuts_r.index(c)]),
        intersection_baseline=None if c is None else _generic_intersection(c, c, n), intersection_cut=c,
        permutation_word=(P.argmax(1) + 1).tolist() if complete and is_perm else None,
        n=n, gap_ratio=gap_ratio, max_tau=max_tau, storage_eps=storage_eps)


def _as_word(w: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
    word = torch.as_tensor(w).flatten()
    n = word.numel()
    if n == 0 or word.is_floating_point() or word.is_complex() or not torch.equal(
            torch.sort(word.cpu()).values, torch.arange(1, n + 1)):
        raise ValueError(f"rank_matrix_from_permutation: w={w!r} must be a permutation of 1..n (1-based ints)")
    return word.to(torch.int64)


def rank_matrix_from_permutation(w: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
    """Rank matrix ``r_ij = #{a <= i : w(a) <= j}`` of the complete-flag pair in position ``w`` (MATH.md §4).

    ``w`` lists ``w(1), ..., w(n)`` (1-based); returns int64 ``(n, n)`` with ``r[i-1, j-1] = r_ij``.
    """
    word = _as_word(w)
    n = word.numel()
    P = torch.zeros(n, n, dtype=torch.int64, device=word.device)
    P[torch.arange(n, device=word.device), word - 1] = 1
    return P.cumsum(0).cumsum(1)


def permutation_from_rank_matrix(r: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rank_matrix_from_permutation`: the 1-based word ``w`` with ``P_{a, w(a)} = 1`` (MATH.md §4).

    ``ValueError`` unless ``r`` is square and its block differences form a permutation matrix.
    """
    r = torch.as_tensor(r)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.numel() == 0:
        raise ValueError(f"permutation_from_rank_matrix: r has shape {tuple(r.shape)}; pass a square n x n matrix")
    P = block_differences(r.to(torch.int64))
    ones = torch.ones(r.shape[0], dtype=torch.int64, device=P.device)
    if not (((P == 0) | (P == 1)).all() and torch.equal(P.sum(0), ones) and torch.equal(P.sum(1), ones)):
        raise ValueError("permutation_from_rank_matrix: r is not the rank matrix of a permutation "
                         "(its block differences are not a permutation matrix)")
    return P.argmax(1) + 1


def gl_invariant_kernel_dim(W_l: torch.Tensor, W_next: torch.Tensor, *, rtol: float = GL_KERNEL_RTOL) -> int:
    """``dim(range W_l ∩ ker W_next) = rank W_l - rank(W_next W_l)``, invariant under GL(n) (MATH.md §4).

    Ranks count singular values above ``rtol`` times a scale: ``sigma_1(W_l)`` for ``W_l`` and
    ``sigma_1(W_next) sigma_1(W_l)`` (an upper bound of ``||W_next W_l||``) for the product, so a product that is
    zero up to rounding has rank 0.  Computed in float64; the product is ``m x k``, never ``n x n``.
    """
    where = "gl_invariant_kernel_dim"
    _check_layer_pair(W_l, W_next, where=where)
    rtol = _check_float(where, "rtol", rtol, 0.0, 1.0)
    A, B = W_l.to(torch.float64), W_next.to(torch.float64)
    return _gl_kernel_dim(torch.linalg.svdvals(A), torch.linalg.svdvals(B), torch.linalg.svdvals(B @ A), rtol)


def gl_kernel_dim_from_spectra(s_l: torch.Tensor, s_next: torch.Tensor, s_product: torch.Tensor, *,
                               rtol: float = GL_KERNEL_RTOL) -> int:
    """:func:`gl_invariant_kernel_dim` from the descending singular values of ``W_l``, ``W_next`` and
    ``W_next W_l`` (MATH.md §4), for callers that have them already (e.g. from shared thin SVDs)."""
    where = "gl_kernel_dim_from_spectra"
    for name, x in (("s_l", s_l), ("s_next", s_next), ("s_product", s_product)):
        if not isinstance(x, torch.Tensor) or x.ndim != 1:
            raise ValueError(f"{where}: {name} must be a 1-D tensor of singular values; got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    return _gl_kernel_dim(s_l, s_next, s_product, _check_float(where, "rtol", rtol, 0.0, 1.0))


def gl_kernel_dim_from_product_rank(s_l: torch.Tensor, product_rank: int, *, rtol: float = GL_KERNEL_RTOL) -> int:
    """:func:`gl_invariant_kernel_dim` from the descending singular values of ``W_l`` and the rank of
    ``W_next W_l`` counted at the same cut (``rtol sigma_1(W_l) sigma_1(W_next)``:
    :func:`~hf_flag.geometry.pairs.pair_values_from_svd`'s ``product_rank``, MATH.md §4)."""
    if not isinstance(s_l, torch.Tensor) or s_l.ndim != 1:
        raise ValueError(f"gl_kernel_dim_from_product_rank: s_l must be a 1-D tensor of singular values; got "
                         f"{getattr(s_l, 'shape', type(s_l).__name__)}")
    return _numerical_rank(s_l, _check_float("gl_kernel_dim_from_product_rank", "rtol", rtol, 0.0, 1.0)) - \
        int(product_rank)


def gl_kernel_dim_generic(s_l: torch.Tensor, s_next: torch.Tensor, n: int, *,
                         rtol: float = GL_KERNEL_RTOL) -> Optional[int]:
    """The GL kernel dimension's Haar value (MATH.md §4, §7):
    :func:`~hf_flag.geometry.baselines.gl_kernel_dim_baseline` ``max(0, rank W_l - rank W_next)`` with both ranks
    counted as :func:`gl_invariant_kernel_dim` counts them (singular values above ``rtol sigma_1`` of each weight),
    from their descending singular values, where it is the value of every Haar rotation ``(Q W_l, W_next)`` but a
    set of probability at most ``GL_BASELINE_MAX_EXCEPTION``
    (:func:`~hf_flag.geometry.baselines.gl_kernel_dim_exception_bound`); ``None`` otherwise: not given where the
    spectra spread past the cut (the product's cut ``rtol sigma_1(W_l) sigma_1(W_next)`` then reaches products of
    kept singular values, and rotations give larger values)."""
    where = "gl_kernel_dim_generic"
    for name, x in (("s_l", s_l), ("s_next", s_next)):
        if not isinstance(x, torch.Tensor) or x.ndim != 1:
            raise ValueError(f"{where}: {name} must be a 1-D tensor of singular values; got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    rtol = _check_float(where, "rtol", rtol, 0.0, 1.0)
    rank_l, rank_next = _numerical_rank(s_l, rtol), _numerical_rank(s_next, rtol)
    cut_ratio = 0.0  # the product's cut over the product of the smallest kept singular values
    if min(rank_l, rank_next):
        cut_ratio = rtol * float(s_l[0]) * float(s_next[0]) / (float(s_l[rank_l - 1]) * float(s_next[rank_next - 1]))
    if gl_kernel_dim_exception_bound(rank_l, rank_next, n, cut_ratio) > GL_BASELINE_MAX_EXCEPTION:
        return None
    return gl_kernel_dim_baseline(rank_l, rank_next, n)


def _gl_kernel_dim(s_l: torch.Tensor, s_next: torch.Tensor, s_product: torch.Tensor, rtol: float) -> int:
    """``rank W_l - rank(W_next W_l)`` from the three spectra, scales as in :func:`gl_invariant_kernel_dim`."""
    rank_l = _numerical_rank(s_l, rtol)
    if rank_l == 0 or s_next.numel() == 0:
        return rank_l
    return rank_l - _numerical_rank(s_product, rtol, float(s_l[0]) * float(s_next[0]))


def identity_agreement(position: FlagRelativePosition) -> tuple[float, float]:
    """How close a relative position is to the identity permutation (aligned flags, MATH.md §4).

    Over the non-trivial cells (both cuts below n): the fraction with ``rank_matrix[a, b] == min(i, j)`` (the
    identity's rank matrix) and the mean of ``soft_matrix[a, b] / min(i, j)``.  Both are 1 for aligned flags.
    NaN when neither flag has a cut below n (nothing to compare).
    """
    cells = [(a, b, min(i, j)) for a, i in enumerate(position.cuts_left) for b, j in enumerate(position.cuts_right)
             if i < position.n and j < position.n]
    if not cells:
        return float("nan"), float("nan")
    hard = sum(int(position.rank_matrix[a, b]) == ideal for a, b, ideal in cells) / len(cells)
    soft = sum(float(position.soft_matrix[a, b]) / ideal for a, b, ideal in cells) / len(cells)
    return hard, soft
