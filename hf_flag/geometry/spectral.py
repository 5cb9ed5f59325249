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
the last cut ``i <= k_max`` that is determined (:func:`wedin_window`; the report then keeps only the cuts the
computation resolves too, below); beyond it the singular vectors cannot be told apart from storage noise, so
they are not computed.  ``k_max`` (:data:`K_MAX`, 64) bounds the cost: for
float32 weights almost every cut is determined and the window is the cap.  (The flag cuts of
:mod:`hf_flag.geometry.flags` keep their own, stricter constant 10 and a relative-gap rule: inside a window they
are today's cuts.)

Partial SVD.  :func:`partial_svd` computes the leading ``k`` singular values and the leading triplets' vectors
on the small side's Gram ``G = X X^T`` (``X`` = ``A`` or ``A^T``, whichever is ``r x c`` with ``r <= c``): for
``r <= DENSE_GRAM_MAX`` its eigendecomposition, above it a randomized block Krylov method (Musco & Musco 2015;
Halko, Martinsson & Tropp 2011 §4): a Gaussian start block, Krylov blocks ``G^j Omega`` with full
reorthogonalisation, Rayleigh-Ritz on the Krylov basis.  ``G`` is taken precomputed when the caller has it (the
report shares each weight's small Gram with kappa's Gram factors), else applied as ``X (X^T .)``.  The other
side's vectors ``v_i = X^T u_i / s_i`` and each triplet's residual
``sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2)``, relative to ``s_1``, are computed against ``A`` itself
(the certificate) and only for the triplets a window reads: the window needs the leading values to place its
cuts, but its vectors only up to the window (``w <= 2`` for 4-bit storage, a few to ~20 for bf16) plus the one
closing it.  The Krylov iteration stops when the window's triplets have residual at most ``rtol`` and the closing
one is accurate to a tenth of the closing gap.  With residuals ``r_j`` a computed top-``i`` subspace is within
``||sin Theta||_F <= sqrt(r_1^2 + .. + r_i^2) / (gap_i - r_{i+1})`` of the exact one of the stored matrix
(Wedin; :func:`computation_bounds`), the same form as the storage bound above.  Working on ``G`` squares
the condition (leading triplets to relative accuracy ``eps s_1^2 / s_i^2``): harmless inside the windows of coarse
storage, whose cuts have ``gap_i >= 0.045 sigma_1`` (bf16), and in every case the certificate, computed against
``A``, says how close the triplets are.

Which cuts are read (:func:`read_cuts`).  The storage bound says how far the stored weights' subspaces are from
the trained ones, the computation's bound how far the computed ones are from the stored weights': a cut is read
only where *both* are at most ``max_tau``.  For bf16 and quantised storage the stopping residual ``eps_s / 100``
keeps the computation's bound at ``sqrt(i) / 57`` of the storage's or less at every determined cut; float32
storage determines gaps down to ``6.9e-7 s_1``, below what float32 residuals (``~1e-6 s_1``; fp16 at large
shapes, where the residual floor ``4 sqrt(max shape) eps_32`` exceeds ``eps_s / 100``, comes close) resolve
(MiniLM layer 4 head 9's ``W_O``: gap ``4.4e-6 s_1`` at transport cut 16, bound 0.34 rad, subspace score off by
1.4e-4), so :func:`certified_partial_svd` recomputes such a weight in float64; a cut float64 does not resolve
either stays unread (the transport cut falls to the largest cut read on both sides, or ``None``).  The window is
the last cut read; transport scores read the largest cut read on both sides and flags are cut inside the windows.
Each windowed value's distance from the exact singular vectors' value follows from the bounds at its cuts
(:func:`transport_tolerances`, :func:`soft_tolerance`; reported per row).

Compute precision (:func:`compute_dtype`): float32 when the weights are stored in float32 or coarser, float64 when
they are stored in float64 (or when asked).  Gram-factor traces (kappa and the imbalance norms, MATH.md §2-§3)
subtract terms of size ``||A||^2 ||B||^2``: their absolute error on kappa is ``~ sqrt(eps_c)`` at worst, so
:func:`gram_dtype` keeps them in float32 only where ``TRACE_CANCEL_FACTOR * eps_c <= eps_s^2`` (bf16,
quantised storage) and in float64 otherwise (fp16 and float32 storage).

Everything is batched over leading dimensions and runs on the input's device; no I/O.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from hf_flag.geometry.angles import check_dtype, check_matrix, thin_svd_in_dtype
from hf_flag.geometry.flags import MAX_TAU

__all__ = [
    "K_MAX", "WEDIN_FACTOR", "WINDOW_RULE", "WINDOW_TOLERANCE_RULE", "TRACE_CANCEL_FACTOR", "DENSE_GRAM_MAX",
    "PartialSVD", "compute_dtype",
    "gram_dtype", "partial_svd", "residual_norms", "window_certificate", "window_gap_known", "wedin_bounds",
    "determined_cuts", "wedin_window", "transport_window", "default_residual_rtol", "computation_bounds",
    "read_cuts", "certified_partial_svd", "last_cut", "transport_tolerances", "soft_tolerance",
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
#: largest smaller dimension ``r`` whose Gram ``r x r`` is diagonalised whole (``eigh``) rather than by Krylov
DENSE_GRAM_MAX = 1024

FLOAT32_EPS = torch.finfo(torch.float32).eps
#: the default report's window rule, as reported in ``Report.params``
WINDOW_RULE = ("cut i <= k_max = 64 read where both the storage bound (1/sqrt 3) eps_storage sigma_1 / "
               "(sigma_i - sigma_{i+1}) and the computation's bound ||residuals_1..i||_F / (gap_i - "
               "residual_{i+1}) are <= 0.1 rad (Wedin, MATH.md §4), the partial SVD recomputed in float64 where "
               "only the computation's fails; window = last cut read; partial SVD on the small Gram "
               "(eigh or randomized block Krylov), residual certified per weight")

#: what the default report's per-row ``tolerance`` (details) bounds, as reported in ``Report.params``
WINDOW_TOLERANCE_RULE = ("per row (details tolerance): |value - value of exact singular vectors of the stored "
                         "weights| <= bound from the computation's Wedin bounds at the cuts read (MATH.md §4)")


class PartialSVD(NamedTuple):
    """Leading singular values ``s (..., k)``, descending, and the first ``m <= k`` triplets with their vectors
    ``A ~ U diag(s[..., :m]) Vh``: ``U (..., rows, m)``, ``Vh (..., m, cols)``, ``residuals (..., m)`` each
    triplet's ``sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2)`` relative to ``s_1`` (0 for a zero
    matrix).  ``m = k`` unless :func:`partial_svd` was given ``storage_eps``: then the triplets a storage-precision
    window reads (the window's and the one closing it, :meth:`certificate`, :meth:`gap_known`).  ``exhausted``: the
    values are the whole spectrum (``k = min(rows, cols)``), so ``sigma_{k+1} = 0``.
    """

    U: torch.Tensor
    s: torch.Tensor
    Vh: torch.Tensor
    residuals: torch.Tensor
    exhausted: bool

    def certificate(self, window: torch.Tensor) -> torch.Tensor:
        """The largest relative residual among the triplets a ``window`` uses (the first ``max(window, 1)``),
        shape ``window.shape``."""
        self._check_vectors(window)
        return window_certificate(self.residuals, window)

    def gap_known(self, window: torch.Tensor) -> torch.Tensor:
        """Whether the gap ``s_w - s_{w+1}`` that closes each ``window`` is known to 10%: the residual of triplet
        ``w + 1`` (which bounds the error of ``s_{w+1}``, relative to ``s_1``) is at most a tenth of it."""
        self._check_vectors(window)
        return window_gap_known(self.s, self.residuals, window)

    def computation_bounds(self) -> torch.Tensor:
        """:func:`computation_bounds` of these values and residuals: per cut, how far the computed top-``i``
        subspaces can be from the exact ones of the matrix as stored."""
        return computation_bounds(self.s, self.residuals, exhausted=self.exhausted)

    def read_cuts(self, *, storage_eps: float, k_max: int = K_MAX, max_tau: float = MAX_TAU,
                  bounds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:func:`read_cuts` of this partial SVD (``bounds``: its :meth:`computation_bounds` when computed)."""
        return read_cuts(self.s, self.residuals, storage_eps=storage_eps, exhausted=self.exhausted, k_max=k_max,
                         max_tau=max_tau, bounds=bounds)

    def _check_vectors(self, window: torch.Tensor) -> None:
        m = self.residuals.shape[-1]
        needed = int(window.max()) + 1 if window.numel() else 0
        if not self.exhausted and needed > m:
            raise ValueError(f"PartialSVD: a window of {needed - 1} needs {needed} triplets with vectors; this one "
                             f"has {m} (computed for a coarser storage precision: pass partial_svd the finest "
                             f"storage_eps the weight's windows are read with)")


def window_certificate(residuals: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """:meth:`PartialSVD.certificate` of triplet ``residuals (..., m)``."""
    used = torch.arange(1, residuals.shape[-1] + 1, device=residuals.device) <= \
        window.to(residuals.device).clamp_min(1).unsqueeze(-1)
    return torch.where(used, residuals, torch.zeros_like(residuals)).amax(-1)


def window_gap_known(s: torch.Tensor, residuals: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """:meth:`PartialSVD.gap_known` of values ``s (..., k)`` whose first ``m`` triplets have ``residuals``."""
    w = window.to(s.device).clamp(max=min(s.shape[-1], residuals.shape[-1]) - 1).unsqueeze(-1)
    gap = (s.gather(-1, (w - 1).clamp_min(0)) - s.gather(-1, w)).squeeze(-1) / \
        s[..., 0].clamp_min(torch.finfo(s.dtype).tiny)
    return (window == 0) | (residuals.gather(-1, w).squeeze(-1) <= 0.1 * gap)


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
    ``s_1 = 0``), shape (..., m), in ``A``'s dtype; ``s (..., k)`` with ``k >= m`` (``s_1`` from it)."""
    m = U.shape[-1]
    return _relative(_residual_pair(A @ Vh.mT, A.mT @ U, U, s[..., :m], Vh), s[..., :1])


def _residual_pair(AV: torch.Tensor, AtU: torch.Tensor, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor
                   ) -> torch.Tensor:
    """``sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2)`` from the products ``A V`` and ``A^T U``."""
    right = AV - U * s.unsqueeze(-2)
    left = AtU - Vh.mT * s.unsqueeze(-2)
    return (right.square().sum(-2) + left.square().sum(-2)).sqrt()


def _relative(absolute: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``absolute / top`` (``top (..., 1)``, ``s_1``), 0 where ``top = 0``."""
    return torch.where(top > 0, absolute / torch.where(top > 0, top, torch.ones_like(top)),
                       torch.zeros_like(absolute))


def _inverse(s: torch.Tensor) -> torch.Tensor:
    """``1 / s`` where ``s > 0``, else 0."""
    return torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))


def _times_thin(M: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``M @ Y`` for a ``Y`` of few columns, formed as ``(Y^T M^T)^T``: CPU BLAS streams the large operand as the
    right factor several times faster (measured 2-13x at 11008 x 4096 with 5-65 columns, one thread)."""
    return (Y.mT @ M.mT).mT


def _window_triplets(X: torch.Tensor, U: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The other side's vectors ``Vh = diag(1/s) U^T X`` of the small side's ``U (..., r, m)`` and the triplets'
    residuals against ``X`` itself (both sides, the certificate; the left one vanishes unless ``s_i = 0``)."""
    m = U.shape[-1]
    XtU = _times_thin(X.mT, U)
    Vh = XtU.mT * _inverse(s[..., :m]).unsqueeze(-1)
    return Vh, _relative(_residual_pair(_times_thin(X, Vh.mT), XtU, U, s[..., :m], Vh), s[..., :1])


def _block_krylov(X: torch.Tensor, gram: Optional[torch.Tensor], k: int, block: int, done: Callable,
                  seed: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Leading ``k`` Ritz pairs ``(U (..., r, k), s (..., k))`` of ``G = X X^T`` (``X (..., r, c)``, ``r <= c``)
    by randomized block Krylov with full reorthogonalisation and Rayleigh-Ritz (module docstring), iterating on
    ``gram`` (``G``, ``r x r``) when given, else on ``X (X^T .)``; ``None`` once the basis would pass half of
    ``r`` (the dense route is then cheaper).  ``P = G basis`` is kept: its last block is the next Krylov block,
    and it gives each Ritz pair's residual ``||G u - s^2 u|| / s = ||X v - s u||`` (``v = X^T u / s``; the left
    residual vanishes) without touching ``X``.  Stops when ``done(s, residuals)`` (relative to ``s_1``) holds for
    every batch member, or at :data:`MAX_BLOCKS` blocks."""
    r = X.shape[-2]
    apply = (lambda Y: gram @ Y) if gram is not None else (lambda Y: _times_thin(X, _times_thin(X.mT, Y)))  # noqa: E731
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = gram if gram is not None else X  # a Gaussian block through G (or X): it spans X's leading range
    omega = torch.randn(*X.shape[:-2], start.shape[-1], block, generator=g, dtype=X.dtype).to(X.device)
    basis = torch.linalg.qr(start @ omega).Q
    P = apply(basis)
    H = basis.mT @ P  # Rayleigh quotient basis^T G basis, grown one block at a time
    while True:
        evals, evecs = torch.linalg.eigh(H)
        theta, Z = evals.flip(-1)[..., :k], evecs.flip(-1)[..., :k]
        s = theta.clamp_min(0).sqrt()
        U = basis @ Z
        absolute = (P @ Z - U * theta.unsqueeze(-2)).square().sum(-2).sqrt() * _inverse(s)
        if done(s, _relative(absolute, s[..., :1])) or basis.shape[-1] >= MAX_BLOCKS * block:
            return U, s
        if 2 * (basis.shape[-1] + block) > r:
            return None
        Y = P[..., -block:]  # G times the newest block: the next Krylov block
        for _ in range(2):  # full reorthogonalisation; twice is enough (Giraud et al. 2005)
            Y = Y - basis @ (basis.mT @ Y)
        current = torch.linalg.qr(Y).Q
        P_current = apply(current)
        cross = current.mT @ P  # current^T G basis
        H = torch.cat([torch.cat([H, cross.mT], dim=-1), torch.cat([cross, current.mT @ P_current], dim=-1)],
                      dim=-2)
        basis, P = torch.cat([basis, current], dim=-1), torch.cat([P, P_current], dim=-1)


def partial_svd(A: torch.Tensor, k: int, *, dtype: torch.dtype, rtol: Optional[float] = None,
                storage_eps: Optional[float] = None, k_max: int = K_MAX, max_tau: float = MAX_TAU,
                seed: int = 0, gram: Optional[torch.Tensor] = None,
                gram_eigh: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> PartialSVD:
    """The ``k`` leading singular values of ``A (..., rows, cols)`` in ``dtype`` on ``A``'s device, and the
    leading triplets with their vectors and residuals (module docstring: randomized block Krylov with
    Rayleigh-Ritz).

    Without ``storage_eps``: all ``k`` triplets, stopping when each has relative residual at most ``rtol``
    (default :func:`default_residual_rtol`).  Given ``storage_eps``: the values decide each batch member's
    :func:`wedin_window` ``w``; vectors and residual certificates are computed for the first ``max(w) + 1``
    triplets only (the window's and the one closing it), and the iteration stops once those of the window have
    residual at most ``rtol`` and triplet ``w + 1`` is accurate to a tenth of the gap closing the window
    (:meth:`PartialSVD.gap_known`).

    Routes, by the smaller dimension ``r``: the whole spectrum (``k = r``), a thin SVD; ``r <= DENSE_GRAM_MAX``,
    a Krylov block (``k + max(MIN_OVERSAMPLE, k // 4)`` columns) above ``r / 4``, or a Krylov basis that would pass
    ``r / 2``, eigenvectors of the small Gram
    ``G = X X^T`` (``X`` = ``A`` or ``A^T``, whichever is ``r x c``; leading triplets to relative accuracy
    ``eps s_1^2 / s_i^2``, the certificate says how close); otherwise block Krylov on ``G``, in blocks of
    ``k + max(MIN_OVERSAMPLE, k // 4)`` columns up to :data:`MAX_BLOCKS` blocks (the residuals say how far it got).
    ``gram``: ``G`` precomputed (``A A^T`` when ``rows <= cols``, else ``A^T A``; any dtype, e.g. shared with
    the Gram factors of kappa): then no product with ``A`` is formed before the window's vectors, and the Krylov
    blocks cost ``r^2`` instead of ``2 r c`` per column.  ``gram_eigh``: ``torch.linalg.eigh(G)`` precomputed
    (the report shares it with range_overlap's kept eigenvectors, MATH.md §3), used where the route is the small
    Gram's eigenvectors.  Deterministic for a given ``seed``.  Batched: one basis per batch member, same ``k``.
    """
    check_matrix("A", A, where="partial_svd")
    check_dtype(dtype, where="partial_svd")
    small = min(A.shape[-2:])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= small:
        raise ValueError(f"partial_svd: k={k!r} must be an int in [1, {small}] for A of shape {tuple(A.shape)}")
    A = A.to(dtype)
    wide = A.shape[-2] <= A.shape[-1]
    X = A if wide else A.mT  # (..., r, c) with r <= c: Grams and Krylov bases live in R^r
    if gram is not None:
        check_matrix("gram", gram, where="partial_svd")
        if gram.shape != X.shape[:-1] + X.shape[-2:-1]:
            raise ValueError(f"partial_svd: gram has shape {tuple(gram.shape)}; pass the small Gram "
                             f"{'A A^T' if wide else 'A^T A'} of shape {tuple(X.shape[:-1] + X.shape[-2:-1])}")
        gram = gram.to(dtype)
    if k == small:  # the whole spectrum (its rank cut too): a thin SVD, which resolves the smallest values
        U, s, Vh = thin_svd_in_dtype(A)
        return PartialSVD(U, s, Vh, residual_norms(A, U, s, Vh), True)
    tol = rtol if rtol is not None else default_residual_rtol(storage_eps or 0.0, dtype, tuple(A.shape[-2:]))

    def windows(s: torch.Tensor) -> torch.Tensor:
        return wedin_window(s, storage_eps=storage_eps, exhausted=False, k_max=k_max, max_tau=max_tau)

    def done(s: torch.Tensor, residuals: torch.Tensor) -> bool:
        if storage_eps is None:
            return bool((residuals.amax(-1) <= tol).all())
        w = windows(s)
        return bool(((window_certificate(residuals, w) <= tol) & window_gap_known(s, residuals, w)).all())

    block = k + max(MIN_OVERSAMPLE, k // 4)
    ritz = _block_krylov(X, gram, k, block, done, seed) if small > DENSE_GRAM_MAX and 4 * block <= small else None
    if ritz is None:  # the small Gram's eigenvectors
        evals, evecs = (gram_eigh if gram_eigh is not None else
                        torch.linalg.eigh(gram if gram is not None else X @ X.mT))
        evals, evecs = evals.to(dtype), evecs.to(dtype)
        ritz = evecs[..., -k:].flip(-1), evals[..., -k:].flip(-1).clamp_min(0).sqrt()
    U, s = ritz
    m = k if storage_eps is None else min(k, int(windows(s).max()) + 1 if s.numel() else 1)
    U = U[..., :m]
    Vh, residuals = _window_triplets(X, U, s)
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
    return last_cut(determined_cuts(s, storage_eps=storage_eps, exhausted=exhausted, k_max=k_max, max_tau=max_tau))


def last_cut(cuts: torch.Tensor) -> torch.Tensor:
    """The last cut ``i`` (1-based) where the bool mask ``cuts (..., c)`` holds, 0 where none does (int64,
    ``cuts.shape[:-1]``): the window of :func:`determined_cuts` (:func:`wedin_window`) or :func:`read_cuts`."""
    positions = torch.arange(1, cuts.shape[-1] + 1, device=cuts.device)
    return torch.where(cuts, positions, torch.zeros_like(positions)).amax(-1) if cuts.shape[-1] else \
        torch.zeros(cuts.shape[:-1], dtype=torch.int64, device=cuts.device)


def transport_window(determined_l: torch.Tensor, determined_next: torch.Tensor, n: int) -> tuple[int, bool]:
    """``(k, basis_determined)`` of a pair's transport scores on windows (MATH.md §4): ``k`` the largest cut
    ``<= ceil(n / 2)`` read on both sides (1-D masks of :func:`read_cuts`, or :func:`determined_cuts` for the
    storage alone), 0 if none, so the
    subspace score ``(1/k) ||T_k||^2`` compares two determined top-k subspaces; ``basis_determined``: every
    cut ``1..k`` is determined on both sides, so each pair of singular vectors ``u_i``, ``v_i`` the basis score
    reads is (otherwise the basis score is not determined by the stored weights)."""
    both = determined_l[: determined_next.numel()] & determined_next[: determined_l.numel()]
    both = both[: (n + 1) // 2].cpu()
    k = int(torch.nonzero(both).max()) + 1 if bool(both.any()) else 0
    return k, bool(both[:k].all()) if k else False


def computation_bounds(s: torch.Tensor, residuals: torch.Tensor, *, exhausted: bool) -> torch.Tensor:
    """Wedin's bound on the computation's error at each cut (MATH.md §4): ``||sin Theta_i||_F`` between the
    computed and the exact top-``i`` singular subspaces (both sides) of the matrix the triplets were computed from,
    ``sqrt(r_1^2 + .. + r_i^2) / (gap_i - r_{i+1})``, all relative to ``s_1``: ``r_j`` the triplets' residuals
    (:func:`residual_norms`; their sum of squares is ``||A V - U S||_F^2 + ||A^T U - V S||_F^2``), ``gap_i =
    s_i - s_{i+1}`` the computed gap and ``r_{i+1}`` the most the next exact value can lie above the computed one.
    Same cuts as :func:`wedin_bounds` (``s (..., k)``; cut ``k`` too when ``exhausted``, closed by
    ``sigma_{k+1} = 0``); ``inf`` where a residual the bound needs was not computed (``residuals (..., m)``,
    ``m <= k``) or the gap does not exceed ``r_{i+1}``.  float64.
    The storage bound says how far the stored weights' subspaces are from the trained ones; this one how far the
    computed subspaces are from the stored weights': a cut is read only where both are small (:func:`read_cuts`)."""
    s64, r64 = s.to(torch.float64), residuals.to(torch.float64)
    cuts = s.shape[-1] if exhausted else s.shape[-1] - 1
    rel = _relative(s64, s64[..., :1])
    below = torch.cat([rel[..., 1:], torch.zeros_like(rel[..., :1])], dim=-1) if exhausted else rel[..., 1:]
    gap = rel[..., :cuts] - below[..., :cuts]
    m = r64.shape[-1]
    known = torch.cat([r64[..., : cuts + 1], r64.new_full(r64.shape[:-1] + (max(0, cuts + 1 - m),), float("inf"))],
                      dim=-1)
    if exhausted:  # sigma_{k+1} = 0 exactly: nothing can lie above it
        known[..., cuts] = 0.0
    inf = torch.full_like(gap, float("inf"))
    frobenius = known[..., :cuts].square().cumsum(-1).sqrt()
    delta = gap - known[..., 1: cuts + 1]
    return torch.where(delta > 0, frobenius / torch.where(delta > 0, delta, torch.ones_like(delta)), inf)


def read_cuts(s: torch.Tensor, residuals: torch.Tensor, *, storage_eps: float, exhausted: bool,
              k_max: int = K_MAX, max_tau: float = MAX_TAU, bounds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The cuts the default report reads (bool, (..., min(k_max, cuts))): determined at the storage precision
    (:func:`determined_cuts`) and computed to within the same angle tolerance (:func:`computation_bounds` at most
    ``max_tau``; ``bounds``: those, when already computed).  A cut the storage determines but the computation does
    not is not read; where that happens in float32, :func:`certified_partial_svd` recomputes in float64 first
    (MATH.md §4)."""
    storage = determined_cuts(s, storage_eps=storage_eps, exhausted=exhausted, k_max=k_max, max_tau=max_tau)
    bounds = computation_bounds(s, residuals, exhausted=exhausted) if bounds is None else bounds
    return storage & (bounds[..., : storage.shape[-1]].to(storage.device) <= max_tau)


def certified_partial_svd(A: torch.Tensor, k: int, *, dtype: torch.dtype, storage_eps: float,
                          gram: Optional[torch.Tensor] = None,
                          gram_eigh: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> PartialSVD:
    """:func:`partial_svd` with ``storage_eps`` (the window's triplets), recomputed in float64 when some cut the
    storage precision determines is not computed to ``MAX_TAU`` (:func:`read_cuts`): a float32 computation's
    residuals (~1e-6 s_1 at best) exceed small gaps that float32 storage still determines (down to
    ``6.9e-7 s_1``; e.g. MiniLM layer 4 head 9's ``W_O``: gap ``4.4e-6 s_1`` at its transport cut, float32
    bound 0.34 rad).  The whole batch is recomputed; ``gram`` / ``gram_eigh`` are reused there only when they
    are float64.  Cuts that float64 does not resolve either are left unread by :func:`read_cuts`."""
    p = partial_svd(A, k, dtype=dtype, storage_eps=storage_eps, gram=gram, gram_eigh=gram_eigh)
    if dtype == torch.float64:
        return p
    storage = determined_cuts(p.s, storage_eps=storage_eps, exhausted=p.exhausted)
    if not bool((storage & (p.computation_bounds()[..., : storage.shape[-1]] > MAX_TAU)).any()):
        return p
    f64 = torch.float64
    return partial_svd(A, k, dtype=f64, storage_eps=storage_eps,
                       gram=gram if gram is not None and gram.dtype == f64 else None,
                       gram_eigh=gram_eigh if gram_eigh is not None and gram_eigh[0].dtype == f64 else None)


def transport_tolerances(bounds_l: torch.Tensor, bounds_next: torch.Tensor, k: int) -> tuple[float, float]:
    """How far the transport scores at cut ``k`` (MATH.md §4) can be from those of exact singular vectors of the
    stored weights, given the computation's bounds (:func:`computation_bounds`, 1-D, cut ``i`` at index
    ``i - 1``) of ``W_l`` (left vectors) and ``W_next`` (right vectors): ``(subspace, basis)``.

    Subspace score ``(1/k) tr(P_V P_U)``: ``|tr(dP P)| <= ||dP||_F sqrt(k)`` and ``||dP||_F = sqrt 2
    ||sin Theta||_F``, so ``sqrt(2/k) (theta_l(k) + theta_next(k))``.  Basis score ``(1/k) sum_j (u_j.v_j)^2``:
    ``u_j u_j^T = P_j - P_{j-1}``, so ``(sqrt 2 / k) sum_{j<=k} (theta_l(j) + theta_l(j-1) + theta_next(j) +
    theta_next(j-1))`` with ``theta(0) = 0``; ``inf`` where a bound is."""
    if k < 1:
        raise ValueError(f"transport_tolerances: k={k} must be at least 1")
    theta = (bounds_l[:k].to(torch.float64).cpu() + bounds_next[:k].to(torch.float64).cpu())
    subspace = (2.0 / k) ** 0.5 * float(theta[k - 1])
    basis = 2.0 ** 0.5 / k * float(theta.sum() + theta[: k - 1].sum())
    return subspace, basis


def soft_tolerance(bounds_l: torch.Tensor, bounds_next: torch.Tensor, cut: int) -> float:
    """How far ``sum cos^2`` of the principal angles between ``span(u_1..u_cut)`` and ``span(v_1..v_cut)``
    (``tr(P_V P_U)``, the flags' soft count at a common cut, MATH.md §4) can be from the exact vectors' value:
    ``sqrt(2 cut) (theta_l(cut) + theta_next(cut))`` (as :func:`transport_tolerances`, not divided by ``cut``)."""
    return (2.0 * cut) ** 0.5 * (float(bounds_l[cut - 1]) + float(bounds_next[cut - 1]))
