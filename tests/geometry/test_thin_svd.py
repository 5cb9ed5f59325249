"""thin_svd (QR first for tall/wide matrices) against torch.linalg.svd and numpy (MATH.md §1, §4)."""
import numpy as np
import pytest
import torch

from hf_flag.geometry.angles import QR_FIRST_RATIO, principal_angles, thin_svd

F64 = torch.float64

# (rows, cols): QR first on the tall side, QR first on the wide side, plain SVD below the 1.5 ratio, edge ratio
SHAPES = [(300, 40), (40, 300), (50, 40), (40, 50), (60, 40), (7, 1), (1, 7)]


def _graded(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random matrix with distinct singular values spanning 8 decades (rank min(rows, cols))."""
    g = torch.Generator().manual_seed(seed)
    r = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=F64)).Q
    s = torch.logspace(0, -8, r, dtype=F64) * (1 + 0.1 * torch.rand(r, generator=g, dtype=F64))
    return (U * s.sort(descending=True).values) @ V.T


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_thin_svd_matches_torch_and_numpy(rows, cols):
    A = _graded(rows, cols, seed=rows * 1000 + cols)
    U, s, Vh = thin_svd(A)
    r = min(rows, cols)
    assert U.shape == (rows, r) and s.shape == (r,) and Vh.shape == (r, cols)
    assert U.dtype == s.dtype == Vh.dtype == F64
    ref = torch.linalg.svdvals(A)
    np_ref = np.linalg.svd(A.numpy(), compute_uv=False)
    # graded spectrum: absolute accuracy ~ eps * s_1, so compare each value relative to s_1 and the top ones relative
    assert torch.max((s - ref).abs()) <= 1e-13 * ref[0]
    assert np.max(np.abs(s.numpy() - np_ref)) <= 1e-13 * np_ref[0]
    top = ref > 1e-4 * ref[0]
    assert torch.max(((s - ref).abs() / ref)[top]) <= 1e-12
    # reconstruction and orthonormality
    assert torch.linalg.matrix_norm(U * s @ Vh - A) <= 1e-13 * torch.linalg.matrix_norm(A)
    assert torch.allclose(U.T @ U, torch.eye(r, dtype=F64), atol=1e-13)
    assert torch.allclose(Vh @ Vh.T, torch.eye(r, dtype=F64), atol=1e-13)
    # leading singular subspaces agree with torch.linalg.svd's up to the Wedin bound max(shape) eps s_1 / gap (MATH §4)
    U_ref, _, Vh_ref = torch.linalg.svd(A, full_matrices=False)
    below = torch.cat([ref[1:], ref.new_zeros(1)])
    for i in sorted({1, max(1, r // 2), r}):
        bound = max(rows, cols) * torch.finfo(F64).eps * float(ref[0] / (ref[i - 1] - below[i - 1]))
        assert principal_angles(U[:, :i], U_ref[:, :i], orthonormal=True).max() <= bound
        assert principal_angles(Vh[:i].T, Vh_ref[:i].T, orthonormal=True).max() <= bound


def test_thin_svd_batched_and_low_precision_input():
    g = torch.Generator().manual_seed(7)
    A = torch.randn(3, 200, 30, generator=g)  # float32 in, float64 out
    U, s, Vh = thin_svd(A)
    assert U.shape == (3, 200, 30) and s.shape == (3, 30) and Vh.shape == (3, 30, 30) and s.dtype == F64
    ref = torch.linalg.svdvals(A.double())
    assert torch.max((s - ref).abs() / ref) <= 1e-12
    assert torch.linalg.matrix_norm(U * s.unsqueeze(-2) @ Vh - A.double()).max() <= 1e-12 * ref[:, 0].max()


def test_thin_svd_rank_deficient_and_empty():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(120, 4, generator=g, dtype=F64) @ torch.randn(4, 20, generator=g, dtype=F64)  # rank 4
    U, s, Vh = thin_svd(A)
    assert int((s > s[0] * 1e-12).sum()) == 4
    assert torch.linalg.matrix_norm(U * s @ Vh - A) <= 1e-13 * torch.linalg.matrix_norm(A)
    assert principal_angles(U[:, :4], A).max() < 1e-10  # range of A from the first 4 left vectors
    U0, s0, Vh0 = thin_svd(torch.zeros(9, 0, dtype=F64))
    assert U0.shape == (9, 0) and s0.shape == (0,) and Vh0.shape == (0, 0)
    Z = thin_svd(torch.zeros(30, 5, dtype=F64))[1]
    assert torch.equal(Z, torch.zeros(5, dtype=F64))


def test_thin_svd_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        thin_svd(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="pass a matrix"):
        thin_svd(torch.ones(5))


@pytest.mark.parametrize("rows,cols,qr_first", [(60, 40, True), (40, 60, True), (59, 40, False), (40, 59, False)])
def test_thin_svd_takes_the_qr_first_exactly_from_the_ratio(rows, cols, qr_first, monkeypatch):
    """QR first iff one side is at least QR_FIRST_RATIO (1.5) times the other, as the docstring says."""
    A = _graded(rows, cols, seed=11)  # before the spy: _graded itself takes QRs
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda A, *a, **k: calls.append(tuple(A.shape)) or qr(A, *a, **k))
    U, s, Vh = thin_svd(A)
    assert calls == ([(max(rows, cols), min(rows, cols))] if qr_first else [])
    assert QR_FIRST_RATIO == 1.5 and torch.linalg.matrix_norm(U * s @ Vh - A) <= 1e-13 * torch.linalg.matrix_norm(A)
