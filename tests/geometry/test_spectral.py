"""Partial SVD, storage-precision windows and the precision policy (hf_flag.geometry.spectral; MATH.md §1, §3, §4).

References: dense thin SVDs (LAPACK), hand-computed Wedin bounds of constructed spectra, the bf16/fp16 roundings of
real matrices (for the storage-noise factor), and today's full-SVD pair values (analysis.pairs.pair_geometry_values).
"""
import math

import pytest
import torch

from hf_flag.analysis.pairs import pair_geometry_values, pair_window_values
from hf_flag.geometry.angles import thin_svd
from hf_flag.geometry.pairs import gram_pair_values, transport_scores_from_matrix
from hf_flag.geometry.spectral import (K_MAX, WEDIN_FACTOR, compute_dtype, determined_cuts, gram_dtype, partial_svd,
                                       residual_norms, transport_window, wedin_bounds, wedin_window)

F64, F32 = torch.float64, torch.float32
BF16_EPS = torch.finfo(torch.bfloat16).eps


def with_spectrum(rows: int, cols: int, s: torch.Tensor, seed: int, batch: tuple = ()) -> torch.Tensor:
    """``U diag(s) V^T`` with Haar-random orthonormal ``U``, ``V`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    r = s.numel()
    U = torch.linalg.qr(torch.randn(*batch, rows, r, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(*batch, cols, r, generator=g, dtype=F64)).Q
    return (U * s) @ V.mT


def spiked_bulk(rows: int, cols: int, spikes: list, seed: int) -> torch.Tensor:
    """Gaussian bulk (Marchenko-Pastur edge ~ 2 for rows ~ cols) plus rank-one spikes of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=F64) / math.sqrt(max(rows, cols))
    spikes = torch.tensor(spikes, dtype=F64)
    U = torch.linalg.qr(torch.randn(rows, len(spikes), generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(cols, len(spikes), generator=g, dtype=F64)).Q
    return W + (U * spikes) @ V.T


def top_subspace_sin(U: torch.Tensor, U_ref: torch.Tensor) -> float:
    """Largest principal-angle sine between two orthonormal column sets of the same size, from the residual of
    the projection (MATH.md §1: no arccos floor)."""
    U, U_ref = U.double(), U_ref.double()
    return float(torch.linalg.matrix_norm(U - U_ref @ (U_ref.mT @ U), 2))


@pytest.mark.parametrize("rows,cols,dtype", [(900, 300, F64), (300, 900, F64), (600, 1200, F32)])
def test_partial_svd_matches_dense_svd_on_a_graded_spectrum(rows, cols, dtype):
    # 12 separated values (gaps 0.5) over a flat tail: the leading 10 triplets are well defined
    s = torch.cat([torch.linspace(8, 2.5, 12, dtype=F64), torch.linspace(1, 0.5, min(rows, cols) - 12, dtype=F64)])
    A = with_spectrum(rows, cols, s, seed=rows + cols)
    p = partial_svd(A.to(dtype), 10, dtype=dtype)
    assert p.U.shape == (rows, 10) and p.s.shape == (10,) and p.Vh.shape == (10, cols)
    assert p.U.dtype == p.s.dtype == dtype and not p.exhausted
    eps = torch.finfo(dtype).eps
    assert torch.max((p.s.double() - s[:10]).abs()) <= 50 * eps * s[0]
    U, _, Vh = thin_svd(A)
    for k in (1, 5, 10):  # every cut of the constructed spectrum is separated by 0.5: sin <= residual / gap
        assert top_subspace_sin(p.U[:, :k], U[:, :k]) <= 2e3 * eps
        assert top_subspace_sin(p.Vh[:k].mT, Vh[:k].mT) <= 2e3 * eps
    # the certificate is the residual recomputed in float64 from the returned triplets
    again = residual_norms(A, p.U.double(), p.s.double(), p.Vh.double())
    assert torch.allclose(again, p.residuals.double(), atol=20 * eps)
    assert float(p.residuals.max()) <= 4 * math.sqrt(max(rows, cols)) * eps


def test_partial_svd_is_batched_and_deterministic():
    s = torch.cat([torch.tensor([9.0, 6.0, 4.0], dtype=F64), torch.linspace(1, 0.1, 397, dtype=F64)])
    A = with_spectrum(400, 800, s, seed=3, batch=(3,))
    p = partial_svd(A, 3, dtype=F64)
    assert p.U.shape == (3, 400, 3) and p.residuals.shape == (3, 3)
    for i in range(3):
        single = partial_svd(A[i], 3, dtype=F64)
        assert torch.allclose(p.s[i], single.s, rtol=1e-12)
        assert torch.allclose(p.s[i], s[:3], rtol=1e-12)
    again = partial_svd(A, 3, dtype=F64)
    assert torch.equal(again.s, p.s) and torch.equal(again.U, p.U)


def test_partial_svd_small_or_rank_deficient_input_uses_the_dense_svd():
    A = with_spectrum(60, 40, torch.tensor([3.0, 2.0, 1.0], dtype=F64), seed=5)  # rank 3
    p = partial_svd(A, 40, dtype=F64)
    assert p.exhausted and torch.allclose(p.s[:3], torch.tensor([3.0, 2.0, 1.0], dtype=F64), rtol=1e-12)
    assert float(p.s[3:].max()) <= 1e-13
    with pytest.raises(ValueError, match="k=0 must be an int in"):
        partial_svd(A, 0, dtype=F64)


def test_wedin_bounds_and_window_on_a_constructed_spectrum():
    eps = BF16_EPS
    s = torch.tensor([10.0, 5.0, 4.9, 2.0, 1.99, 1.98], dtype=F64)
    bounds = wedin_bounds(s, storage_eps=eps, exhausted=False)
    expected = [WEDIN_FACTOR * eps * 10.0 / g for g in (5.0, 0.1, 2.9, 0.01, 0.01)]
    assert torch.allclose(bounds, torch.tensor(expected, dtype=F64), rtol=1e-12)
    # bound <= 0.1 rad at gaps >= 10 * WEDIN_FACTOR * eps * 10 = 0.451: cuts 1 and 3
    assert determined_cuts(s, storage_eps=eps, exhausted=False).tolist() == [True, False, True, False, False]
    assert int(wedin_window(s, storage_eps=eps, exhausted=False)) == 3
    assert int(wedin_window(s, storage_eps=eps, exhausted=False, k_max=2)) == 1
    # a whole spectrum closes with sigma_7 = 0: the rank cut (gap 1.98) is determined too
    assert int(wedin_window(s, storage_eps=eps, exhausted=True)) == 6
    # 4-bit storage needs gaps >= 10 * 0.577 * 0.0625 * 10 = 3.6: only cut 1
    assert int(wedin_window(s, storage_eps=2.0 ** -4, exhausted=False)) == 1
    # float64 storage: every cut, up to the cap
    assert int(wedin_window(s, storage_eps=2.0 ** -52, exhausted=False)) == 5
    batch = torch.stack([s, torch.zeros_like(s)])
    assert wedin_window(batch, storage_eps=eps, exhausted=False).tolist() == [3, 0]


def test_transport_window_takes_the_largest_cut_determined_on_both_sides():
    left = torch.tensor([True, False, True, True, False])
    right = torch.tensor([True, True, True, False])
    assert transport_window(left, right, n=100) == (3, False)
    assert transport_window(torch.tensor([True, True]), torch.tensor([True, True, True]), n=100) == (2, True)
    assert transport_window(left, right, n=4) == (1, True)  # k <= ceil(n / 2)
    assert transport_window(torch.tensor([False]), torch.tensor([True]), n=10) == (0, False)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols,heavy", [(576, 1536, False), (1024, 2048, True)])
def test_storage_rounding_is_within_the_documented_wedin_factor(storage, rows, cols, heavy):
    g = torch.Generator().manual_seed(rows)
    W = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    if heavy:  # a few large columns and rows, as trained weights have
        W[:, :4] *= 20
        W[:7] *= 5
    dW = (W.to(storage).float() - W).double()
    eps = torch.finfo(storage).eps
    s1 = float(torch.linalg.matrix_norm(W.double(), 2))
    measured = float(torch.linalg.matrix_norm(dW, 2))
    assert measured <= WEDIN_FACTOR * eps * s1
    assert measured >= 0.1 * WEDIN_FACTOR * eps * s1  # the factor is not vacuous either


def test_precision_policy():
    assert compute_dtype(torch.finfo(F32).eps) == F32
    assert compute_dtype(BF16_EPS) == F32 and compute_dtype(2.0 ** -4) == F32
    assert compute_dtype(torch.finfo(F64).eps) == F64 and compute_dtype(0.0) == F64
    assert compute_dtype(BF16_EPS, F64) == F64
    assert gram_dtype(BF16_EPS, F32) == F32 and gram_dtype(2.0 ** -4, F32) == F32
    assert gram_dtype(torch.finfo(F32).eps, F32) == F64 and gram_dtype(torch.finfo(F32).eps, F64) == F64
