"""Principal angles between subspaces, the projection kernel, overlaps and Grassmann distances (MATH.md §1).

Every function takes matrices whose *columns* span the subspaces (``A: (..., n, p)``, ``B: (..., n, q)``), works in
float64 on the inputs' device and broadcasts over leading batch dimensions.

Conventions:

* Rank cut (MATH.md §1): a singular value ``s`` of ``A`` counts iff ``s > s_max * rtol`` with the default
  ``rtol = max(n, p) * eps_compute + eps_storage`` (:func:`default_rtol`): ``eps_storage`` the machine epsilon
  of ``A``'s dtype (float64 for integer input), ``eps_compute`` that of the precision the cut was designed for,
  at least float32.  So half-precision input (bf16, fp16) is cut one storage ulp below ``s_max``, not at
  ``max(n, p) * eps_storage`` (4.5 for a 576 x 64 bf16 matrix: no rank at all).  Computation is in float64
  whatever the input dtype, so a bf16 input gives the float64 result on the same rounded values.
* The zero subspace (zero matrix, or zero columns) has rank 0: it has no principal angles (empty tensor), its
  projection kernel is 0 and its normalised overlap is *defined* as 0 (no NaN).  The distances follow the
  formulas with the empty angle set: chordal and geodesic distance 0, projection distance ``sqrt(|p - q|)``.
* ``orthonormal=True`` skips the orthonormalisation and trusts that the columns are orthonormal.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "check_matrix",
    "all_finite",
    "check_dtype",
    "default_rtol",
    "storage_eps",
    "angles_between_bases",
    "normalised_overlap",
    "orthonormal_basis",
    "padded_orthonormal_basis",
    "thin_svd",
    "thin_svd_in_dtype",
    "principal_angles",
    "projection_kernel",
    "subspace_overlap",
    "projection_distance",
    "chordal_distance",
    "geodesic_distance",
]


def check_matrix(name: str, A: torch.Tensor, *, where: str) -> None:
    """Raise ``ValueError`` unless ``A`` is a real, finite tensor with at least two dimensions."""
    if not isinstance(A, torch.Tensor):
        raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim < 2:
        raise ValueError(f"{where}: {name} has shape {tuple(A.shape)}; pass a matrix (..., n, columns)")
    if A.is_complex():
        raise ValueError(f"{where}: {name} is complex ({A.dtype}); pass a real tensor")
    if A.is_floating_point() and not all_finite(A):
        raise ValueError(f"{where}: {name} of shape {tuple(A.shape)} contains NaN or Inf; clean the weights first")


def all_finite(A: torch.Tensor) -> bool:
    """Whether every entry of the floating tensor ``A`` is finite.  A finite sum proves it (NaN and Inf propagate
    through addition; Inf + -Inf is NaN), at the cost of one read; only a sum that is not finite (a NaN or Inf
    entry, or an overflow of finite entries) is settled by the entrywise check."""
    return bool(torch.isfinite(A.sum())) or bool(torch.isfinite(A).all())


def check_dtype(dtype: object, *, where: str) -> None:
    """Raise ``ValueError`` unless ``dtype`` is a real floating torch dtype of at least float32 precision (the
    precision to compute in; half-precision *inputs* are fine, half-precision arithmetic is not, MATH.md §1)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{where}: dtype={dtype!r} must be a real floating torch dtype, e.g. torch.float64")
    if torch.finfo(dtype).eps > torch.finfo(torch.float32).eps:
        raise ValueError(f"{where}: dtype={dtype} is too coarse to compute in (eps {torch.finfo(dtype).eps:.1e}); "
                         f"pass torch.float32 or torch.float64 (half-precision inputs are accepted as they are)")


def _check_pair(A: torch.Tensor, B: torch.Tensor, *, where: str) -> None:
    check_matrix("A", A, where=where)
    check_matrix("B", B, where=where)
    if A.shape[-2] != B.shape[-2]:
        raise ValueError(
            f"{where}: A has shape {tuple(A.shape)} and B has shape {tuple(B.shape)}; both need the same number "
            f"of rows n (the ambient space R^n)")
    try:
        torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{where}: batch dimensions of A {tuple(A.shape)} and B {tuple(B.shape)} do not broadcast") from None


def storage_eps(A: torch.Tensor) -> float:
    """Machine epsilon of ``A``'s storage dtype (float64 for non-float input): bf16 7.8e-3, fp16 9.8e-4."""
    return torch.finfo(A.dtype if A.is_floating_point() else torch.float64).eps


def default_rtol(A: torch.Tensor, eps_storage: Optional[float] = None) -> float:
    """MATH.md §1 rank cut relative to ``s_max``: ``max(shape) * eps_compute + eps_storage``.

    ``eps_storage`` = the given storage precision (weights loaded into a finer compute dtype: pass the epsilon of
    the dtype they were stored in), else :func:`storage_eps` of ``A``; ``eps_compute`` = the epsilon of the storage
    dtype promoted to at least float32 (the backward error of an SVD at that precision, the LAPACK/numpy convention
    ``max(shape) eps``).
    For float32 and float64 input this is the classical cut plus one ulp; for bf16/fp16 input it is one storage
    ulp of ``s_max`` plus the float32 term, instead of ``max(shape) * eps_storage`` (>= 1 for bf16 above 128 rows,
    which cut every direction)."""
    eps = storage_eps(A) if eps_storage is None else eps_storage
    return max(A.shape[-2], A.shape[-1]) * min(eps, torch.finfo(torch.float32).eps) + eps


#: the rank cut of :func:`default_rtol`, as reported in ``Report.params``
RANK_CUT_RULE = ("s > s_max * (max(shape) * eps_compute + eps_storage), eps_compute of the storage dtype promoted to "
                 "at least float32, MATH.md §1")
#: :func:`thin_svd` takes a QR first when one side of the matrix is at least this many times the other.
QR_FIRST_RATIO = 1.5


def thin_svd_in_dtype(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`thin_svd` without input validation or the float64 cast (computes in ``A``'s floating dtype)."""
    rows, cols = A.shape[-2], A.shape[-1]
    if cols >= QR_FIRST_RATIO * max(rows, 1):
        V, s, Uh = thin_svd_in_dtype(A.mT)
        return Uh.mT, s, V.mT
    if rows >= QR_FIRST_RATIO * max(cols, 1):
        Q, R = torch.linalg.qr(A)
        U, s, Vh = torch.linalg.svd(R)
        return Q @ U, s, Vh
    return torch.linalg.svd(A, full_matrices=False)


def thin_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``A = U diag(s) Vh`` in float64: ``U (..., n, r)``, descending ``s (..., r)``, ``Vh (..., r, p)``,
    ``r = min(n, p)`` (the singular vectors of MATH.md §1 and §4).

    When one side is at least ``QR_FIRST_RATIO`` (1.5) times the other, a thin QR comes first and the SVD is taken
    of the square ``R`` factor (``A = Q R``, ``R = U_R S Vh`` so ``U = Q U_R``), so the bidiagonalisation runs on
    ``r x r``.  Backward stable like ``torch.linalg.svd``; signs of singular vectors are arbitrary as there.
    Measured on CPU (BENCHMARKS.md): the same time as ``torch.linalg.svd`` for single matrices (LAPACK's gesdd
    already takes the QR first above an 11/6 aspect ratio) and slower for large batches of small matrices (the
    explicit Q), so :func:`padded_orthonormal_basis` keeps ``torch.linalg.svd``.  Batched over leading dims.
    """
    check_matrix("A", A, where="thin_svd")
    return thin_svd_in_dtype(A.to(torch.float64))


def padded_orthonormal_basis(A: torch.Tensor, *, rtol: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched orthonormal basis of col(A) padded with zero columns, and the ranks (MATH.md §1, step 1).

    Returns ``(Q, rank)``: ``Q`` is float64 ``(..., n, min(n, p))`` whose first ``rank`` columns are the left
    singular vectors with ``s > s_max * rtol`` and whose remaining columns are zero; ``rank`` is int64 ``(...)``.
    Zero columns contribute nothing to ``Q^T Q_B``, so the projection kernel of rank-deficient batch members
    needs no special case.
    """
    check_matrix("A", A, where="padded_orthonormal_basis")
    cut = default_rtol(A) if rtol is None else float(rtol)
    if not cut >= 0.0:
        raise ValueError(f"padded_orthonormal_basis: rtol={rtol} must be a non-negative number")
    U, s, _ = torch.linalg.svd(A.to(torch.float64), full_matrices=False)  # batched: faster than thin_svd's QR
    if s.shape[-1] == 0:
        return U, torch.zeros(A.shape[:-2], dtype=torch.int64, device=A.device)
    keep = s > s[..., :1] * cut
    return U * keep.unsqueeze(-2), keep.sum(-1)


def orthonormal_basis(A: torch.Tensor, *, rtol: Optional[float] = None) -> torch.Tensor:
    """Float64 orthonormal basis of col(A) with the rank cut ``s > s_max * rtol`` (MATH.md §1, step 1).

    ``A: (..., n, p)`` -> ``(..., n, r)``.  A zero matrix gives ``(..., n, 0)``.  In a batch every member must have
    the same rank ``r`` (else ``ValueError``; use :func:`padded_orthonormal_basis`).
    """
    Q, rank = padded_orthonormal_basis(A, rtol=rtol)
    r = _common_rank(rank, "A", A.shape, where="orthonormal_basis")
    return Q[..., :r]


def _common_rank(rank: torch.Tensor, name: str, shape: torch.Size, *, where: str) -> int:
    if rank.numel() == 0:
        return 0
    lo, hi = int(rank.min()), int(rank.max())
    if lo != hi:
        raise ValueError(
            f"{where}: batch members of {name} {tuple(shape)} have ranks {lo}..{hi}; angles need one rank per "
            f"batch, so loop over the members or use projection_kernel/subspace_overlap")
    return lo


def _bases(A: torch.Tensor, B: torch.Tensor, orthonormal: bool, *, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated float64 bases of col(A), col(B), trimmed to their (common per batch) ranks."""
    _check_pair(A, B, where=where)
    if orthonormal:
        return A.to(torch.float64), B.to(torch.float64)
    QA, rA = padded_orthonormal_basis(A)
    QB, rB = padded_orthonormal_basis(B)
    return QA[..., :_common_rank(rA, "A", A.shape, where=where)], QB[..., :_common_rank(rB, "B", B.shape, where=where)]


def angles_between_bases(QA: torch.Tensor, QB: torch.Tensor) -> torch.Tensor:
    """Ascending principal angles between orthonormal bases ``QA (..., n, p)``, ``QB (..., n, q)`` (MATH.md §1).

    Knyazev-Argentati pairing: with ``p >= q`` (swapped if not), ``cos`` = descending singular values of
    ``QA^T QB``, ``sin`` = ascending singular values of ``QB - QA QA^T QB``; angle ``i`` is ``arcsin(sin_i)`` where
    ``cos_i^2 >= 1/2`` and ``arccos(cos_i)`` otherwise.  Accurate for tiny angles (no ``sqrt(eps)`` floor).
    """
    if QA.shape[-1] < QB.shape[-1]:
        QA, QB = QB, QA
    cross = QA.transpose(-2, -1) @ QB
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)
    sin = torch.linalg.svdvals(QB - QA @ cross).flip(-1).clamp(0.0, 1.0)
    return torch.where(cos * cos >= 0.5, torch.arcsin(sin), torch.arccos(cos))


def principal_angles(A: torch.Tensor, B: torch.Tensor, *, orthonormal: bool = False) -> torch.Tensor:
    """Ascending principal angles (radians, float64) between col(A) and col(B) (MATH.md §1).

    ``A: (..., n, p)``, ``B: (..., n, q)`` -> ``(..., min(rank A, rank B))``; empty when either is the zero space.
    Batched input must have one rank per operand across the batch (``ValueError`` otherwise).
    """
    QA, QB = _bases(A, B, orthonormal, where="principal_angles")
    return angles_between_bases(QA, QB)


def _kernel_and_ranks(A: torch.Tensor, B: torch.Tensor, orthonormal: bool, *, where: str):
    """``(PK, rank A, rank B)`` through zero-padded bases, so batch members may differ in rank."""
    _check_pair(A, B, where=where)
    if orthonormal:
        QA, QB = A.to(torch.float64), B.to(torch.float64)
        rA = torch.full(A.shape[:-2], A.shape[-1], dtype=torch.int64, device=A.device)
        rB = torch.full(B.shape[:-2], B.shape[-1], dtype=torch.int64, device=B.device)
    else:
        (QA, rA), (QB, rB) = padded_orthonormal_basis(A), padded_orthonormal_basis(B)
    return (QA.transpose(-2, -1) @ QB).pow(2).sum((-2, -1)), rA, rB


def projection_kernel(A: torch.Tensor, B: torch.Tensor, *, orthonormal: bool = False) -> torch.Tensor:
    """Projection kernel ``PK = ||Q_A^T Q_B||_F^2 = sum_i cos^2 theta_i`` (MATH.md §1); float64, shape ``(...)``.

    Works on batches whose members differ in rank (zero-padded bases); 0 for the zero subspace.
    """
    return _kernel_and_ranks(A, B, orthonormal, where="projection_kernel")[0]


def normalised_overlap(pk: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``PK / min(p, q)`` clamped to [0, 1], defined as 0 where ``min(p, q) == 0`` (MATH.md §1)."""
    denom = torch.minimum(p, q).to(pk.dtype)
    return torch.where(denom > 0, pk / denom.clamp(min=1.0), torch.zeros_like(pk)).clamp(0.0, 1.0)


def subspace_overlap(A: torch.Tensor, B: torch.Tensor, *, orthonormal: bool = False) -> torch.Tensor:
    """Normalised overlap ``PK / min(p, q)`` in [0, 1], ``p, q`` the ranks (MATH.md §1); 0 if either rank is 0.

    Compare with :func:`hf_flag.geometry.baselines.overlap_baseline` (Haar value ``max(p, q) / n``).
    """
    return normalised_overlap(*_kernel_and_ranks(A, B, orthonormal, where="subspace_overlap"))


def _angles_and_dims(A: torch.Tensor, B: torch.Tensor, orthonormal: bool, *, where: str):
    QA, QB = _bases(A, B, orthonormal, where=where)
    return angles_between_bases(QA, QB), QA.shape[-1], QB.shape[-1]


def projection_distance(A: torch.Tensor, B: torch.Tensor, *, orthonormal: bool = False) -> torch.Tensor:
    """``||P_A - P_B||_F = sqrt(|p - q| + 2 sum sin^2 theta_i)`` (= ``sqrt(p + q - 2 PK)``, MATH.md §1).

    Computed from the sines, so it stays accurate when the angles are tiny.
    """
    theta, p, q = _angles_and_dims(A, B, orthonormal, where="projection_distance")
    return (abs(p - q) + 2.0 * torch.sin(theta).pow(2).sum(-1)).sqrt()


def chordal_distance(A: torch.Tensor, B: torch.Tensor, *, orthonormal: bool = False) -> torch.Tensor:
    """Chordal distance ``sqrt(sum_i sin^2 theta_i)`` over the ``min(p, q)`` principal angles (MATH.md §1)."""
    theta, _, _ = _angles_and_dims(A, B, orthonormal, where="chordal_distance")
    return torch.sin(theta).pow(2).sum(-1).sqrt()


def geodesic_distance(A: torch.Tensor, B: torch.Tensor, *, orthonormal: bool = False) -> torch.Tensor:
    """Geodesic (arc-length) distance ``sqrt(sum_i theta_i^2)`` over the principal angles (MATH.md §1)."""
    theta, _, _ = _angles_and_dims(A, B, orthonormal, where="geodesic_distance")
    return theta.pow(2).sum(-1).sqrt()
