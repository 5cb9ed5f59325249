"""A window cut is read only where the computation's Wedin bound is within the angle tolerance too
(hf_flag.geometry.spectral: computation_bounds, read_cuts, certified_partial_svd, transport_tolerances;
MATH.md §4; review s5 item 15)."""
import math

import pytest
import torch

from hf_flag.geometry.flags import MAX_TAU
from hf_flag.geometry.spectral import (certified_partial_svd, computation_bounds, determined_cuts, partial_svd,
                                       read_cuts, soft_tolerance, transport_tolerances)

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps


def test_computation_bounds_closed_form():
    """sqrt(r_1^2 + .. + r_i^2) / (gap_i - r_{i+1}), all relative to s_1, by hand."""
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)  # relative 1, 0.75, 0.5, 0.25: every gap 0.25
    r = torch.tensor([1e-3, 2e-3, 3e-3], dtype=F64)
    b = computation_bounds(s, r, exhausted=False)
    assert b.shape == (3,)
    assert float(b[0]) == pytest.approx(1e-3 / (0.25 - 2e-3), rel=1e-12)
    assert float(b[1]) == pytest.approx(math.sqrt(1e-6 + 4e-6) / (0.25 - 3e-3), rel=1e-12)
    assert math.isinf(float(b[2]))  # r_4 was not computed: the gap is not known
    whole = computation_bounds(s, torch.tensor([1e-3, 2e-3, 3e-3, 4e-3], dtype=F64), exhausted=True)
    assert whole.shape == (4,)  # the last cut is closed by sigma_5 = 0 exactly
    assert float(whole[3]) == pytest.approx(math.sqrt(1e-6 + 4e-6 + 9e-6 + 16e-6) / 0.25, rel=1e-12)
    assert math.isinf(float(computation_bounds(s, torch.tensor([0.0, 0.3, 0.0], dtype=F64), exhausted=False)[0]))
    # read_cuts: determined (storage) and computed (this bound) within MAX_TAU
    assert read_cuts(s, r, storage_eps=EPS32, exhausted=False).tolist() == [True, True, False]
    assert determined_cuts(s, storage_eps=EPS32, exhausted=False).tolist() == [True, True, True]


def tiny_gap_matrix(gap: float) -> torch.Tensor:
    """A float32 100 x 200 matrix whose singular values are 1, 0.9, 0.8, 0.8 - gap, then 0.6 .. 0.01."""
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(200, 100, generator=g, dtype=F64)).Q
    s = torch.linspace(0.6, 0.01, 100, dtype=F64)
    s[:4] = torch.tensor([1.0, 0.9, 0.8, 0.8 - gap])
    return ((U * s) @ V.T).to(F32)


def sin_frobenius(Q: torch.Tensor, ref: torch.Tensor) -> float:
    """||sin Theta||_F between the spans of orthonormal Q and ref (n x i each)."""
    return float(torch.linalg.norm(Q - ref @ (ref.T @ Q)))


def test_a_tiny_gap_at_a_read_cut_is_recomputed_in_float64():
    """Cut 3 has gap 2e-6 s_1: float32 storage determines it (Wedin 0.577 eps32 / 2e-6 = 0.034 rad), but the float32
    partial SVD's residuals (~3e-7 s_1) only bound its subspace to ~0.35 rad: that cut is not read in float32, and
    certified_partial_svd recomputes in float64, where it is read.  Each bound holds against the subspaces of a dense
    float64 LAPACK SVD of the same stored matrix (a second algorithm)."""
    A = tiny_gap_matrix(2e-6)[None]
    ref = torch.linalg.svd(A[0].double(), full_matrices=False).U
    p32 = partial_svd(A, 65, dtype=F32, storage_eps=EPS32)
    storage = determined_cuts(p32.s, storage_eps=EPS32, exhausted=False)[0]
    bounds32 = p32.computation_bounds()[0]
    assert bool(storage[2]) and float(bounds32[2]) > MAX_TAU
    assert not bool(p32.read_cuts(storage_eps=EPS32)[0, 2]) and bool(p32.read_cuts(storage_eps=EPS32)[0, :2].all())
    p = certified_partial_svd(A, 65, dtype=F32, storage_eps=EPS32)
    assert p.s.dtype == F64 and p.U.dtype == F64
    bounds = p.computation_bounds()[0]
    assert float(bounds[2]) < 1e-6 and bool(p.read_cuts(storage_eps=EPS32)[0, :4].all())
    for q, b in ((p32, bounds32), (p, bounds)):
        for i in (1, 2, 3, 4):  # the bound holds at every cut (Wedin), tiny gap included
            true = sin_frobenius(q.U[0, :, :i].double(), ref[:, :i])
            assert true <= float(b[i - 1]) * (1 + 1e-6) + 1e-12, (q.s.dtype, i, true, float(b[i - 1]))
    assert sin_frobenius(p.U[0, :, :3], ref[:, :3]) < 1e-6
    # well-separated cuts need no float64: the float32 result is returned as is
    calm = certified_partial_svd(tiny_gap_matrix(0.1)[None], 65, dtype=F32, storage_eps=EPS32)
    assert calm.s.dtype == F32 and bool(calm.read_cuts(storage_eps=EPS32)[0, :4].all())


def test_transport_tolerances_bound_the_score_change_of_a_known_rotation():
    """Turn U's top-k subspace by a known rotation (||sin Theta||_F = theta): the subspace and basis scores (MATH.md
    §4) move by at most the stated tolerances, and for k = 1 at 45 degrees the subspace bound is within sqrt 2 of
    the change (so a missing factor would fail)."""
    g = torch.Generator().manual_seed(1)
    n, k = 24, 5
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q
    U = Q[:, :k]
    for angle in (1e-4, 1e-2):
        G = torch.eye(n, dtype=F64)  # plane rotations u_j -> cos u_j + sin q_{k+j}
        for j in range(k):
            c, s = math.cos(angle), math.sin(angle)
            G[j, j], G[k + j, k + j], G[j, k + j], G[k + j, j] = c, c, -s, s
        U2 = (Q @ G)[:, :k]
        theta = sin_frobenius(U2, U)
        assert theta == pytest.approx(math.sqrt(k) * math.sin(angle), rel=1e-9)
        bounds_l = torch.full((k,), theta, dtype=F64)  # a bound valid at every cut j <= k
        sub_tol, basis_tol = transport_tolerances(bounds_l, torch.zeros(k, dtype=F64), k)
        T, T2 = V.T @ U, V.T @ U2
        assert abs(float(T2.square().sum() - T.square().sum())) / k <= sub_tol
        assert abs(float(torch.diagonal(T2).square().sum() - torch.diagonal(T).square().sum())) / k <= basis_tol
        assert soft_tolerance(bounds_l, torch.zeros(k, dtype=F64), k) == pytest.approx(k * sub_tol)
    u, v = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64) / math.sqrt(2)
    t = 1e-5
    u2 = torch.tensor([math.cos(t), math.sin(t)], dtype=F64)
    change = abs(float((v @ u2) ** 2 - (v @ u) ** 2))
    tol, _ = transport_tolerances(torch.tensor([math.sin(t)], dtype=F64), torch.zeros(1, dtype=F64), 1)
    assert change <= tol <= math.sqrt(2) * change * (1 + 1e-4)
