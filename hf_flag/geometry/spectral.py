"""Leading singular triplets, the window the storage precision determines, and the compute precision
(MATH.md §1, §3, §4).

Why a window.  Weights stored with relative precision ``eps_s`` (bf16 2^-7, fp16 2^-10, 4-bit quantisation 2^-4)
are known only up to the rounding ``dW``.  Modelling it as independent errors of standard deviation
``eps_s |w_ij| / (2 sqrt 3)`` (round to nearest), the expected spectral norm is at most about
``eps_s (max row norm + max column norm) / (2 sqrt 3) <= eps_s sigma_1 / sqrt 3`` (Latala 2005; Bandeira & van
Handel 2016), so ``||dW||_2 <~ WEDIN_FACTOR * eps_s * sigma_1`` with ``WEDIN_FACTOR = 1 / sqrt 3``.  Measured
(``tests/geometry/test_spectral.py``): bf16 and fp16 roundings of 576-4096-sized matrices, homogeneous or with
large columns, have ``||dW||_2 = 0.20-0.22 eps_s sigma_1`` (0.6-0.7 of the row/column estimate), so the factor
is ~2.7x conservative.  By Wedin's theorem the top-``i`` singular subspace then turns by at most
``sin theta_i <~ ||dW|| / gap_i``, ``gap_i = sigma_i - sigma_{i+1}`` (MATH.md §4).  A subspace is *determined*
when that bound is at most ``max_tau`` (0.1 rad, :data:`~hf_flag.geometry.flags.MAX_TAU`): bf16 needs
``gap_i >= 0.045 sigma_1``, 4-bit ``>= 0.36 sigma_1``, float32 ``>= 6.9e-7 sigma_1``.  The window of a weight is
the last cut ``i <= k_max`` that is determined (:func:`wedin_window`); beyond it the singular vectors cannot be
told apart from storage noise, so they are not computed.  ``k_max`` (:data:`K_MAX`, 64) bounds the cost: for
float32 weights almost every cut is determined and the window is the cap.  (The flag cuts of
:mod:`hf_flag.geometry.flags` keep their own, stricter constant 10 and a relative-gap rule: inside a window they
are today's cuts.)

Partial SVD.  :func:`partial_svd` computes the leading ``k`` triplets by a randomized block Krylov method
(Musco & Musco 2015; Halko, Martinsson & Tropp 2011 §4): a Gaussian start block, Krylov blocks ``(A A^T)^j A Omega``
with full reorthogonalisation, Rayleigh-Ritz on the Krylov basis.  It stops when every returned triplet's residual
``sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2)`` is at most ``rtol * s_1``; the largest such residual,
relative to ``s_1``, is returned as the certificate.  With residual ``r`` a computed top-``i`` subspace is within
``sin theta <= r / gap_i`` of the exact one (Davis-Kahan / Wedin), the same form as the storage bound above, so a
certificate below ``eps_s`` makes the computation's error smaller than the storage's.

Compute precision (:func:`compute_dtype`): float32 when the weights are stored in float32 or coarser, float64 when
they are stored in float64 (or when asked).  Gram-factor traces (kappa and the imbalance norms, MATH.md §2-§3)
subtract terms of size ``||A||^2 ||B||^2``: their absolute error on kappa is ``~ sqrt(eps_c)`` at worst, so
:func:`gram_dtype` keeps them in float32 only where ``TRACE_CANCEL_FACTOR * eps_c <= eps_s^2`` (bf16,
quantised storage) and in float64 otherwise (fp16 and float32 storage).

Everything is batched over leading dimensions and runs on the input's device; no I/O.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from hf_flag.geometry.angles import check_dtype, check_matrix, thin_svd_in_dtype
from hf_flag.geometry.flags import MAX_TAU

__all__ = [
    "K_MAX", "WEDIN_FACTOR", "WINDOW_RULE", "TRACE_CANCEL_FACTOR", "PartialSVD", "compute_dtype", "gram_dtype", "partial_svd",
    "residual_norms", "wedin_bounds", "determined_cuts", "wedin_window", "transport_window",
    "default_residual_rtol",
]

#: largest window (leading singular vectors per weight) the default report computes
K_MAX = 64
#: ``||dW||_2 <~ WEDIN_FACTOR * eps_storage * sigma_1`` for round-to-nearest storage (module docstring)
WEDIN_FACTOR = 3.0 ** -0.5
#: Gram-factor traces run in float32 only when ``TRACE_CANCEL_FACTOR * eps_float32 <= eps_storage^2``
TRACE_CANCEL_FACTOR = 64.0
#: extra Krylov columns beyond the ``k`` triplets asked for (at least :data:`MIN_OVERSAMPLE`)
MIN_OVERSAMPLE = 8
#: Krylov basis size limit, in blocks; past it (or past half the small dimension) a dense thin SVD is cheaper
MAX_BLOCKS = 12

FLOAT32_EPS = torch.finfo(torch.float32).eps
#: the default report's window rule, as reported in ``Report.params``
WINDOW_RULE = ("last cut i <= k_max = 64 with (1/sqrt 3) eps_storage sigma_1 / (sigma_i - sigma_{i+1}) <= 0.1 "
               "(Wedin, MATH.md §4); partial SVD by randomized block Krylov, residual certified per weight")


class PartialSVD(NamedTuple):
    """Leading singular triplets ``A ~ U diag(s) Vh`` and their residuals.

    ``U (..., rows, k)``, descending ``s (..., k)``, ``Vh (..., k, cols)``; ``residuals (..., k)``: each triplet's
    ``sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2)`` relative to ``s_1`` (0 for a zero matrix);
    ``exhausted``: the triplets are the whole spectrum (``k = min(rows, cols)``), so ``sigma_{k+1} = 0``.
    """

    U: torch.Tensor
    s: torch.Tensor
    Vh: torch.Tensor
    residuals: torch.Tensor
    exhausted: bool

    def certificate(self, window: torch.Tensor) -> torch.Tensor:
        """The largest relative residual among the triplets a ``window`` uses (the first ``max(window, 1)``),
        shape ``window.shape``."""
        k = self.s.shape[-1]
        used = torch.arange(1, k + 1, device=self.s.device) <= window.to(self.s.device).clamp_min(1).unsqueeze(-1)
        return torch.where(used, self.residuals, torch.zeros_like(self.residuals)).amax(-1)

    def gap_known(self, window: torch.Tensor) -> torch.Tensor:
        """Whether the gap ``s_w - s_{w+1}`` that closes each ``window`` is known to 10%: the residual of triplet
        ``w + 1`` (which bounds the error of ``s_{w+1}``, relative to ``s_1``) is at most a tenth of it."""
        w = window.to(self.s.device).clamp(max=self.s.shape[-1] - 1).unsqueeze(-1)
        gap = (self.s.gather(-1, (w - 1).clamp_min(0)) - self.s.gather(-1, w)).squeeze(-1) / \
            self.s[..., 0].clamp_min(torch.finfo(self.s.dtype).tiny)
        return (window == 0) | (self.residuals.gather(-1, w).squeeze(-1) <= 0.1 * gap)


def compute_dtype(storage_eps: float, requested: Optional[torch.dtype] = None) -> torch.dtype:
    """The precision policy: ``requested`` when given, else float32 for weights stored with precision
    ``storage_eps >= eps(float32)`` (float32, bf16, fp16, quantised), float64 otherwise (float64 or exact)."""
    if requested is not None:
        check_dtype(requested, where="compute_dtype")
        return requested
    return torch.float32 if storage_eps >= FLOAT32_EPS else torch.float64


def gram_dtype(storage_eps: float, compute: torch.dtype) -> torch.dtype:
    """Precision of the Gram-factor traces (kappa, imbalance; MATH.md §3): ``compute`` when
    ``TRACE_CANCEL_FACTOR * eps(compute) <= storage_eps^2`` (the trace form's worst-case cancellation error on
    kappa, ``sqrt(c eps)``, is then below the storage tolerance), float64 otherwise."""
    eps = torch.finfo(compute).eps
    return compute if TRACE_CANCEL_FACTOR * eps <= storage_eps ** 2 else torch.float64


def default_residual_rtol(storage_eps: float, dtype: torch.dtype, shape: tuple[int, int]) -> float:
    """Stopping residual of :func:`partial_svd`, relative to ``s_1``: a hundredth of the storage perturbation
    ``storage_eps`` (so the computation turns subspaces less than the storage does), but not below the
    rounding floor ``4 sqrt(max(shape)) eps(dtype)`` of a residual computed in ``dtype``."""
    floor = 4.0 * max(shape) ** 0.5 * torch.finfo(dtype).eps
    return max(storage_eps / 100.0, floor)


def residual_norms(A: torch.Tensor, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """Per triplet ``sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2)`` relative to ``s_1`` (0 where
    ``s_1 = 0``), shape (..., k), in ``A``'s dtype."""
    right = A @ Vh.mT - U * s.unsqueeze(-2)
    left = A.mT @ U - Vh.mT * s.unsqueeze(-2)
    absolute = (right.square().sum(-2) + left.square().sum(-2)).sqrt()
    top = s[..., :1]
    return torch.where(top > 0, absolute / torch.where(top > 0, top, torch.ones_like(top)),
                       torch.zeros_like(absolute))


def _dense(A: torch.Tensor, k: int) -> PartialSVD:
    """The leading ``k`` triplets without Krylov: for at most half the spectrum, eigenvectors of the small Gram
    ``X X^T`` (``r x r``, ``r`` the smaller dim; leading triplets to relative accuracy ``eps s_1^2 / s_i^2``, the
    residuals certify it), otherwise a thin SVD (truncated)."""
    small = min(A.shape[-2:])
    if 2 * k > small:
        U, s, Vh = thin_svd_in_dtype(A)
        U, s, Vh = U[..., :k], s[..., :k], Vh[..., :k, :]
        return PartialSVD(U, s, Vh, residual_norms(A, U, s, Vh), k == small)
    wide = A.shape[-2] <= A.shape[-1]
    X = A if wide else A.mT
    evals, evecs = torch.linalg.eigh(X @ X.mT)
    U, s = evecs[..., -k:].flip(-1), evals[..., -k:].flip(-1).clamp_min(0).sqrt()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    Vh = (U.mT @ X) * inv.unsqueeze(-1)
    if not wide:
        U, Vh = Vh.mT, U.mT
    return PartialSVD(U, s, Vh, residual_norms(A, U, s, Vh), False)


def _rayleigh_ritz(basis: torch.Tensor, B: torch.Tensor, gram: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``k`` Ritz triplets of ``X (..., r, c)`` on the orthonormal ``basis (..., r, L)``, from
    ``B = basis^T X`` and its Gram ``B B^T`` (eigenvectors; the leading triplets' relative accuracy
    ``eps s_1^2 / s_i^2``).  ``X^T U = V S`` holds by construction, so only ``X V - U S`` carries residual."""
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(-1)[..., :k], evecs.flip(-1)[..., :k]
    s = evals.clamp_min(0).sqrt()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return basis @ evecs, s, (evecs.mT @ B) * inv.unsqueeze(-1)


def _right_residuals(X: torch.Tensor, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """``||X v_i - s_i u_i|| / s_1`` (the Rayleigh-Ritz residual; the left one vanishes by construction)."""
    absolute = (X @ Vh.mT - U * s.unsqueeze(-2)).square().sum(-2).sqrt()
    top = s[..., :1]
    return torch.where(top > 0, absolute / torch.where(top > 0, top, torch.ones_like(top)),
                       torch.zeros_like(absolute))


def partial_svd(A: torch.Tensor, k: int, *, dtype: torch.dtype, rtol: Optional[float] = None,
                storage_eps: Optional[float] = None, k_max: int = K_MAX, max_tau: float = MAX_TAU,
                seed: int = 0) -> PartialSVD:
    """The ``k`` leading singular triplets of ``A (..., rows, cols)`` in ``dtype`` on ``A``'s device, with their
    residuals (module docstring: randomized block Krylov with Rayleigh-Ritz).

    Stops when the triplets that matter have relative residual at most ``rtol`` (default
    :func:`default_residual_rtol`): all ``k``, or, given ``storage_eps``, the first ``w`` where ``w`` is the
    current :func:`wedin_window` of the Ritz values (the triplets beyond it are not read) and triplet ``w + 1``
    is accurate to a tenth of the gap that closes the window (:meth:`PartialSVD.gap_known`).  The Krylov basis grows
    by one block of ``k + max(MIN_OVERSAMPLE, k // 4)`` columns at a time, up to :data:`MAX_BLOCKS` blocks (then
    the residuals say how far it got).  When the basis would reach half the smaller dimension, the small Gram's
    eigenvectors (or, for more than half the spectrum, a truncated thin SVD) are taken instead: cheaper there.  Deterministic for a given ``seed``.  Batched: one basis per
    batch member, same ``k``.
    """
    check_matrix("A", A, where="partial_svd")
    check_dtype(dtype, where="partial_svd")
    small = min(A.shape[-2:])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= small:
        raise ValueError(f"partial_svd: k={k!r} must be an int in [1, {small}] for A of shape {tuple(A.shape)}")
    A = A.to(dtype)
    tol = rtol if rtol is not None else default_residual_rtol(storage_eps or 0.0, dtype, tuple(A.shape[-2:]))
    block = k + max(MIN_OVERSAMPLE, k // 4)
    if 4 * block > small:
        return _dense(A, k)
    wide = A.shape[-2] <= A.shape[-1]
    X = A if wide else A.mT  # (..., r, c) with r <= c: the Krylov basis lives in R^r
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(*X.shape[:-2], X.shape[-1], block, generator=g, dtype=dtype).to(X.device)
    basis = current = torch.linalg.qr(X @ omega).Q
    B = rows = current.mT @ X  # B = basis^T X, grown one block of rows at a time
    gram = B @ B.mT
    while True:
        Y = X @ rows.mT  # (X X^T) current: the next Krylov block
        for _ in range(2):  # full reorthogonalisation; twice is enough (Giraud et al. 2005)
            Y = Y - basis @ (basis.mT @ Y)
        current = torch.linalg.qr(Y).Q
        rows = current.mT @ X
        cross = rows @ B.mT
        gram = torch.cat([torch.cat([gram, cross.mT], dim=-1), torch.cat([cross, rows @ rows.mT], dim=-1)], dim=-2)
        basis, B = torch.cat([basis, current], dim=-1), torch.cat([B, rows], dim=-2)
        U, s, Vh = _rayleigh_ritz(basis, B, gram, k)
        residuals = _right_residuals(X, U, s, Vh)
        if storage_eps is None:
            done = residuals.amax(-1) <= tol
        else:
            window = wedin_window(s, storage_eps=storage_eps, exhausted=False, k_max=k_max, max_tau=max_tau)
            found = PartialSVD(U, s, Vh, residuals, False)
            done = (found.certificate(window) <= tol) & found.gap_known(window)
        if bool(done.all()) or basis.shape[-1] >= MAX_BLOCKS * block:
            break
        if 2 * (basis.shape[-1] + block) > small:
            return _dense(A, k)
    residuals = residual_norms(X, U, s, Vh)  # the certificate: both sides, recomputed once
    if not wide:
        U, Vh = Vh.mT, U.mT
    return PartialSVD(U, s, Vh, residuals, False)


def wedin_bounds(s: torch.Tensor, *, storage_eps: float, exhausted: bool) -> torch.Tensor:
    """``WEDIN_FACTOR * storage_eps * sigma_1 / (sigma_i - sigma_{i+1})`` for the cuts ``i`` a spectrum decides
    (MATH.md §4), shape (..., len(s) - 1), or (..., len(s)) when ``exhausted`` (then ``sigma_{len+1} = 0``).
    ``inf`` where the gap is zero."""
    below = torch.cat([s[..., 1:], torch.zeros_like(s[..., :1])], dim=-1) if exhausted else s[..., 1:]
    top = s[..., : below.shape[-1]]
    gap = top - below
    bound = WEDIN_FACTOR * storage_eps * s[..., :1]
    return torch.where(gap > 0, bound / torch.where(gap > 0, gap, torch.ones_like(gap)),
                       torch.full_like(gap, float("inf")))


def determined_cuts(s: torch.Tensor, *, storage_eps: float, exhausted: bool, k_max: int = K_MAX,
                    max_tau: float = MAX_TAU) -> torch.Tensor:
    """Whether each cut ``i = 1 .. min(k_max, decided)`` of a leading spectrum ``s`` is determined at the storage
    precision: Wedin bound (:func:`wedin_bounds`) at most ``max_tau`` and ``sigma_i > 0`` (bool, (..., cuts))."""
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"determined_cuts: k_max={k_max!r} must be a positive int")
    bounds = wedin_bounds(s.to(torch.float64), storage_eps=storage_eps, exhausted=exhausted)[..., :k_max]
    return (bounds <= max_tau) & (s[..., : bounds.shape[-1]] > 0)


def wedin_window(s: torch.Tensor, *, storage_eps: float, exhausted: bool, k_max: int = K_MAX,
                 max_tau: float = MAX_TAU) -> torch.Tensor:
    """The window: the last cut ``i <= k_max`` whose Wedin bound (:func:`wedin_bounds`) is at most ``max_tau``,
    0 when there is none (the storage precision determines no singular subspace), int64 of shape ``s.shape[:-1]``.

    ``s``: the leading singular values, descending (``sigma_1 .. sigma_j``); only cuts ``i < j`` are decided
    unless ``exhausted`` (the whole spectrum: then ``sigma_{j+1} = 0`` decides the rank cut too).  A zero
    spectrum has window 0.
    """
    ok = determined_cuts(s, storage_eps=storage_eps, exhausted=exhausted, k_max=k_max, max_tau=max_tau)
    positions = torch.arange(1, ok.shape[-1] + 1, device=s.device)
    return torch.where(ok, positions, torch.zeros_like(positions)).amax(-1) if ok.shape[-1] else \
        torch.zeros(s.shape[:-1], dtype=torch.int64, device=s.device)


def transport_window(determined_l: torch.Tensor, determined_next: torch.Tensor, n: int) -> tuple[int, bool]:
    """``(k, basis_determined)`` of a pair's transport scores on windows (MATH.md §4): ``k`` the largest cut
    ``<= ceil(n / 2)`` determined on both sides (1-D masks of :func:`determined_cuts`), 0 if none, so the
    subspace score ``(1/k) ||T_k||^2`` compares two determined top-k subspaces; ``basis_determined``: every
    cut ``1..k`` is determined on both sides, so each pair of singular vectors ``u_i``, ``v_i`` the basis score
    reads is (otherwise the basis score is not determined by the stored weights)."""
    both = determined_l[: determined_next.numel()] & determined_next[: determined_l.numel()]
    both = both[: (n + 1) // 2].cpu()
    k = int(torch.nonzero(both).max()) + 1 if bool(both.any()) else 0
    return k, bool(both[:k].all()) if k else False
