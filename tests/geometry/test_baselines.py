"""Haar baselines (MATH.md §1, §4, §6): closed forms checked by Monte Carlo with fixed seeds.

Tolerances come from the Monte Carlo standard error (5 standard errors: a false alarm has probability < 1e-6).
"""
from __future__ import annotations

import math

import pytest
import torch

from hf_flag.geometry.angles import projection_kernel, subspace_overlap
from hf_flag.geometry.baselines import (
    commutator_haar_rms,
    composition_baseline,
    intersection_baseline,
    overlap_baseline,
    overlap_zscore,
    projection_kernel_moments,
    transport_baselines,
)

N_SAMPLES = 20000


def _haar_frames(count: int, n: int, k: int, seed: int) -> torch.Tensor:
    """``count`` Haar-random orthonormal ``n x k`` frames (QR of Gaussians with the sign fix)."""
    G = torch.randn(count, n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def _within(samples: torch.Tensor, expected: float, *, what: str) -> None:
    se = samples.std().item() / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - expected) <= 5 * se + 1e-12, what


@pytest.mark.parametrize("p,q,n", [(3, 5, 10), (2, 2, 4), (7, 4, 9), (1, 6, 8)])
def test_projection_kernel_moments_by_monte_carlo(p: int, q: int, n: int) -> None:
    A = torch.eye(n, dtype=torch.float64)[:, :p]  # fixed plane; Haar is rotation invariant
    B = _haar_frames(N_SAMPLES, n, q, seed=p * 100 + q * 10 + n)
    pk = projection_kernel(A, B, orthonormal=True)
    mean, var = projection_kernel_moments(p, q, n)
    assert mean == pytest.approx(p * q / n, abs=1e-15)
    _within(pk, mean, what="E[PK]")
    # Var is the mean of (PK - mean)^2; its standard error from the sample of those squares.
    _within((pk - mean) ** 2, var, what="Var[PK]")


def test_projection_kernel_variance_closed_form_special_cases() -> None:
    # n = 2, p = q = 1: PK = cos^2 of a uniform angle, Var = 3/8 - 1/4 = 1/8.
    assert projection_kernel_moments(1, 1, 2) == pytest.approx((0.5, 0.125), abs=1e-15)
    # q = 1: PK ~ Beta(p/2, (n - p)/2), Var = ab / ((a + b)^2 (a + b + 1)).
    p, n = 3, 11
    a, b = p / 2, (n - p) / 2
    assert projection_kernel_moments(p, 1, n)[1] == pytest.approx(a * b / ((a + b) ** 2 * (a + b + 1)), rel=1e-14)
    # Deterministic cases: a full or empty subspace.
    assert projection_kernel_moments(4, 3, 4) == (3.0, 0.0)
    assert projection_kernel_moments(0, 3, 4) == (0.0, 0.0)
    assert projection_kernel_moments(1, 1, 1) == (1.0, 0.0)


def test_overlap_baseline_and_zscore_by_monte_carlo() -> None:
    p, q, n = 2, 5, 12
    A = _haar_frames(N_SAMPLES, n, p, seed=1)
    B = _haar_frames(N_SAMPLES, n, q, seed=2)
    ov = subspace_overlap(A, B, orthonormal=True)
    assert overlap_baseline(p, q, n) == pytest.approx(5 / 12)
    _within(ov, overlap_baseline(p, q, n), what="E[ov]")
    z = overlap_zscore(ov, p, q, n)
    assert isinstance(z, torch.Tensor) and z.shape == ov.shape
    _within(z, 0.0, what="E[z]")
    _within(z ** 2, 1.0, what="E[z^2]")
    scalar = overlap_zscore(float(ov[0]), p, q, n)
    assert isinstance(scalar, float) and scalar == pytest.approx(z[0].item(), rel=1e-12)
    assert overlap_baseline(0, 3, 5) == 0.0
    assert overlap_zscore(1.0, 4, 2, 4) == 0.0  # deterministic: p = n


def test_transport_baselines_by_monte_carlo() -> None:
    k, n = 3, 10
    U = _haar_frames(N_SAMPLES, n, k, seed=3)
    V = _haar_frames(N_SAMPLES, n, k, seed=4)
    T = V.transpose(-2, -1) @ U
    subspace, basis = transport_baselines(k, n)
    assert (subspace, basis) == (0.3, 0.1)
    _within(T.pow(2).sum((-2, -1)) / k, subspace, what="subspace score")
    _within(torch.diagonal(T, dim1=-2, dim2=-1).pow(2).mean(-1), basis, what="basis score")


def test_composition_baseline_by_monte_carlo() -> None:
    d = 16
    gen = torch.Generator().manual_seed(5)
    L = torch.randn(4000, d, d, generator=gen, dtype=torch.float64)
    R = torch.randn(4000, d, d, generator=gen, dtype=torch.float64)
    score2 = (L @ R).pow(2).sum((-2, -1)) / (L.pow(2).sum((-2, -1)) * R.pow(2).sum((-2, -1)))
    assert composition_baseline(d) == pytest.approx(0.25)
    _within(score2, composition_baseline(d) ** 2, what="E[score^2]")


def _traces(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return A.trace(), (A @ A).trace(), B.trace(), (B @ B).trace()


@pytest.mark.parametrize("n,rank_a,rank_b", [(7, 3, 5), (12, 12, 2), (4, 1, 4)])
def test_commutator_haar_rms_by_monte_carlo(n: int, rank_a: int, rank_b: int) -> None:
    """Closed form sqrt(E kappa^2) against E[kappa^2] over Haar rotations O B O^T (MATH.md §3)."""
    g = torch.Generator().manual_seed(n + rank_a)
    P = torch.randn(n, rank_a, generator=g, dtype=torch.float64)
    Q = torch.randn(n, rank_b, generator=g, dtype=torch.float64) * torch.linspace(3.0, 0.1, rank_b,
                                                                                    dtype=torch.float64)
    A, B = P @ P.T, Q @ Q.T
    O = _haar_frames(N_SAMPLES, n, n, seed=n)
    Bs = O @ B @ O.mT
    kappa2 = torch.linalg.matrix_norm(A @ Bs - Bs @ A).square() / (A.norm() * B.norm()).square()
    expected = commutator_haar_rms(*_traces(A, B), n).item() ** 2
    _within(kappa2, expected, what="E kappa^2")
    assert expected > 0


def test_commutator_haar_rms_special_cases() -> None:
    one = torch.tensor(1.0, dtype=torch.float64)
    # two rank-1 projectors in R^2 at a uniform angle t: ||[P, Q]||^2 = 2 sin^2 t cos^2 t, mean 1/4
    assert commutator_haar_rms(one, one, one, one, 2).item() == pytest.approx(0.5, rel=1e-14)
    # A = I commutes with everything; n = 1 too; a zero side gives 0, not NaN
    B = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    assert commutator_haar_rms(*_traces(torch.eye(3, dtype=torch.float64), B), 3).item() == pytest.approx(
        0.0, abs=1e-15)
    assert commutator_haar_rms(one, one, one, one, 1).item() == 0.0
    assert commutator_haar_rms(0 * one, 0 * one, one, one, 5).item() == 0.0
    with pytest.raises(ValueError, match="n=0"):
        commutator_haar_rms(one, one, one, one, 0)


def test_commutator_haar_rms_bounds_the_mean_and_meets_it_for_large_n() -> None:
    """Jensen: RMS >= E kappa; kappa concentrates, so at n = 120 the two agree within 1%."""
    n = 120
    g = torch.Generator().manual_seed(5)
    P = torch.randn(n, 30, generator=g, dtype=torch.float64)
    Q = torch.randn(n, 40, generator=g, dtype=torch.float64)
    A, B = P @ P.T, Q @ Q.T
    O = _haar_frames(400, n, n, seed=6)
    Bs = O @ B @ O.mT
    kappa = torch.linalg.matrix_norm(A @ Bs - Bs @ A) / (A.norm() * B.norm())
    rms = commutator_haar_rms(*_traces(A, B), n).item()
    se = kappa.std().item() / math.sqrt(kappa.numel())
    assert kappa.mean().item() - 5 * se <= rms <= 1.01 * kappa.mean().item()


def test_intersection_baseline_matches_generic_subspaces() -> None:
    n = 7
    for i, j in [(3, 2), (4, 4), (6, 5), (7, 3)]:
        A = torch.randn(n, i, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        B = torch.randn(n, j, generator=torch.Generator().manual_seed(10 + j), dtype=torch.float64)
        rank = torch.linalg.matrix_rank(torch.cat([A, B], dim=1)).item()
        assert intersection_baseline(i, j, n) == i + j - rank == max(0, i + j - n)


@pytest.mark.parametrize("call", [
    lambda: overlap_baseline(5, 2, 4),
    lambda: projection_kernel_moments(-1, 2, 4),
    lambda: overlap_zscore(0.5, 2, 2, 0),
    lambda: overlap_zscore(1.5, 2, 2, 8),
    lambda: overlap_zscore(float("nan"), 2, 2, 8),
    lambda: transport_baselines(0, 4),
    lambda: intersection_baseline(2.0, 1, 4),
    lambda: composition_baseline(0),
])
def test_bad_dimensions_raise(call) -> None:
    with pytest.raises(ValueError):
        call()
