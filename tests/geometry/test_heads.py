"""Head subspace overlap matrices (MATH.md §6) against a loop of subspace_overlap and a direct PK formula."""
from __future__ import annotations

import pytest
import torch

from hf_flag.geometry.angles import subspace_overlap
from hf_flag.geometry.baselines import overlap_baseline
from hf_flag.geometry.heads import head_overlap_baseline, head_overlap_matrix

F64 = torch.float64


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _direct_overlap(A: torch.Tensor, B: torch.Tensor) -> float:
    """PK = tr(P_A P_B) with P = A A^+ (pseudo-inverse projector), normalised by min(rank)."""
    P_A, P_B = A @ torch.linalg.pinv(A), B @ torch.linalg.pinv(B)
    ranks = min(torch.linalg.matrix_rank(A).item(), torch.linalg.matrix_rank(B).item())
    return torch.trace(P_A @ P_B).item() / ranks if ranks else 0.0


def test_matches_loop_and_direct_projection_kernel() -> None:
    X, Y = _rand(5, 24, 4, seed=0), _rand(3, 24, 6, seed=1)
    ov = head_overlap_matrix(X, Y)
    assert ov.shape == (5, 3) and ov.dtype == F64
    for h in range(5):
        for g in range(3):
            assert abs(ov[h, g].item() - subspace_overlap(X[h], Y[g]).item()) < 1e-12
            assert abs(ov[h, g].item() - _direct_overlap(X[h], Y[g])) < 1e-10


def test_rank_deficient_and_zero_heads() -> None:
    X = _rand(4, 16, 4, seed=2)
    X[1, :, 3] = X[1, :, 0] + X[1, :, 1]  # rank 3
    X[2] = 0.0  # dead head
    Y = torch.cat([X[:2, :, :3], _rand(2, 16, 3, seed=3)])  # Y[0] inside X[0]; Y[1] = X[1]'s span
    ov = head_overlap_matrix(X, Y)
    assert abs(ov[0, 0].item() - 1.0) < 1e-12  # 3-plane inside a 4-plane: normalised by min rank = 3
    assert abs(ov[1, 1].item() - 1.0) < 1e-12  # same 3-plane: normalised by the true rank 3, not 4
    assert torch.equal(ov[2], torch.zeros(4, dtype=F64))
    for h in range(4):
        for g in range(4):
            assert abs(ov[h, g].item() - _direct_overlap(X[h], Y[g])) < 1e-10
    assert bool(torch.isfinite(ov).all())


def test_self_overlap_is_symmetric_with_unit_diagonal() -> None:
    W_O = _rand(6, 8, 32, seed=4)  # (H, d_h, d): write subspaces are the row spaces
    writes = W_O.transpose(-2, -1)
    ov = head_overlap_matrix(writes, writes)
    assert torch.allclose(ov, ov.T, atol=1e-13)
    assert torch.allclose(torch.diagonal(ov), torch.ones(6, dtype=F64), atol=1e-12)


def test_gauge_and_orthogonal_invariance() -> None:
    X, Y = _rand(3, 20, 5, seed=5), _rand(4, 20, 5, seed=6)
    ov = head_overlap_matrix(X, Y)
    G = _rand(3, 5, 5, seed=7) + 4 * torch.eye(5, dtype=F64)  # per-head gauge W_Q -> W_Q G
    assert torch.allclose(head_overlap_matrix(X @ G, Y), ov, atol=1e-12)
    Q = torch.linalg.qr(_rand(20, 20, seed=8))[0]  # orthogonal change of the residual basis
    assert torch.allclose(head_overlap_matrix(Q @ X, Q @ Y), ov, atol=1e-12)


def test_random_heads_sit_at_the_baseline() -> None:
    """Unequal ranks, so the Haar value max(r, r')/d = 0.125 is told apart from min(r, r')/d = 0.0625."""
    d, r, r2 = 64, 4, 8
    X, Y = _rand(40, d, r, seed=9), _rand(40, d, r2, seed=10)
    ov = head_overlap_matrix(X, Y)
    assert head_overlap_baseline(r, r2, d) == overlap_baseline(r2, r, d) == pytest.approx(max(r, r2) / d)
    # 1600 pairs, pairwise uncorrelated (E[ov | X_h] is constant by rotation invariance); sd of one overlap is
    # sqrt(Var PK)/r ~ 0.028, so the mean's standard error is ~7e-4 and 0.01 is ~14 of them.
    assert abs(ov.mean().item() - max(r, r2) / d) < 0.01


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(2, 8, 3\).*\(2, 9, 3\)"):
        head_overlap_matrix(_rand(2, 8, 3, seed=11), _rand(2, 9, 3, seed=12))
    with pytest.raises(ValueError, match="heads"):
        head_overlap_matrix(_rand(8, 3, seed=11), _rand(8, 3, seed=12))
    bad = _rand(2, 8, 3, seed=13)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="Y of shape"):
        head_overlap_matrix(_rand(2, 8, 3, seed=14), bad)
    with pytest.raises(ValueError):
        head_overlap_baseline(4, 4, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    X, Y = _rand(4, 32, 8, seed=15), _rand(4, 32, 8, seed=16)
    gpu = head_overlap_matrix(X.cuda(), Y.cuda())
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), head_overlap_matrix(X, Y), atol=1e-10)


def test_bases_reused_across_comparisons_equal_head_overlap_matrix() -> None:
    """head_bases once + overlap_from_bases for several pairings == head_overlap_matrix recomputing bases."""
    from hf_flag.geometry.heads import head_bases, overlap_from_bases

    X, Y = _rand(4, 20, 3, seed=7), _rand(2, 20, 5, seed=8)
    X[1, :, 2] = X[1, :, 0]  # rank-deficient head: normalised by its true rank 2
    bx, by = head_bases(X), head_bases(Y)
    assert bx.rank.tolist() == [3, 2, 3, 3]
    for a, b, A, B in ((bx, bx, X, X), (bx, by, X, Y), (by, bx, Y, X)):
        assert torch.equal(overlap_from_bases(a, b), head_overlap_matrix(A, B))
    assert overlap_from_bases(bx, by)[1, 0].item() == pytest.approx(_direct_overlap(X[1], Y[0]), rel=1e-10)
    with pytest.raises(ValueError, match="different model dimensions"):
        overlap_from_bases(bx, head_bases(_rand(2, 21, 5, seed=9)))
    with pytest.raises(ValueError, match=r"\(20, 3\)"):
        head_bases(X[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_bases_overlaps_against_scipy_subspace_angles(dtype) -> None:
    """head_bases (thin QR, SVD of R only for rank-deficient heads) against scipy.linalg.subspace_angles, an
    independent SVD-based reference: sum cos^2 / min(rank) for full-rank, rank-deficient, zero and wide heads, in
    float64 (1e-12) and in the default report's float32 (its rounding, 1e-5)."""
    import numpy as np
    import scipy.linalg

    from hf_flag.geometry.heads import head_bases, overlap_from_bases

    X = _rand(4, 40, 6, seed=20)
    X[1, :, 5] = X[1, :, 0] - 2 * X[1, :, 2]  # rank 5
    X[2] = 0.0  # dead head
    Y = torch.cat([X[:2, :, :4] @ _rand(4, 4, seed=21), _rand(2, 40, 4, seed=22)])  # Y[0], Y[1] inside X[0], X[1]
    bx, by = head_bases(X, dtype=dtype), head_bases(Y, dtype=dtype)
    assert bx.Q.dtype == dtype and bx.rank.tolist() == [6, 5, 0, 6] and by.rank.tolist() == [4, 4, 4, 4]
    ov = overlap_from_bases(bx, by).double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for h in range(4):
        for g in range(4):
            rank = min(int(bx.rank[h]), int(by.rank[g]))
            ref = 0.0 if rank == 0 else float(np.sum(np.cos(scipy.linalg.subspace_angles(
                X[h].numpy(), Y[g].numpy())) ** 2)) / rank
            assert abs(ov[h, g].item() - ref) < tol, (h, g)
    assert abs(ov[0, 0].item() - 1.0) < tol and abs(ov[1, 1].item() - 1.0) < tol
    wide = _rand(2, 5, 8, seed=23)  # more columns than dimensions: the whole R^5
    assert head_bases(wide, dtype=dtype).rank.tolist() == [5, 5]
