"""Haar baselines of the pair values that had none (MATH.md §2-§4, §7): imbalance norms, sqrt(2) kappa, the soft
intersection count and the GL kernel dimension, against Monte Carlo over Haar rotations of the hidden basis of one
side, ``(Q W_l, W_next)`` (kappa's null model), through the report's own values (full, default and cheap rows).

Tolerances: 5 Monte Carlo standard errors of the sampled mean (a false alarm has probability < 1e-6).
"""
from __future__ import annotations

import math

import pytest
import torch

from hf_flag import analyze
from hf_flag.analysis.pairs import gram_values, pair_geometry_values, pair_window_values, window_svd
from hf_flag.geometry.baselines import (gl_kernel_dim_baseline, gl_kernel_dim_exception_bound, imbalance_haar_rms,
                                        intersection_soft_baseline, relative_imbalance_haar_rms)
from hf_flag.geometry.flags import gl_invariant_kernel_dim, gl_kernel_dim_generic
from hf_flag.geometry.pairs import augment, commutator_ratio, imbalance_norm, relative_imbalance

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


def haar(count: int, n: int, seed: int) -> torch.Tensor:
    """``count`` Haar-random n x n rotations (QR of Gaussians with the sign fix)."""
    G = torch.randn(count, n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def gauss(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def within(samples: torch.Tensor, expected: float, what: str) -> None:
    se = samples.std().item() / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - expected) <= 5 * se + 1e-12 * max(1.0, abs(expected)), \
        (what, samples.mean().item(), expected, se)


def traces(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (torch.trace(A), (A @ A).trace(), torch.trace(B), (B @ B).trace())


@pytest.mark.parametrize("n,k,m", [(10, 6, 5), (4, 9, 7)])  # n large (Gram factors), n small (n x n Grams)
def test_imbalance_and_normalized_kappa_baselines_by_monte_carlo(n: int, k: int, m: int) -> None:
    """E ||A - Q B Q^T||^2 = ||A||^2 + ||B||^2 - 2 tr A tr B / n, relative imbalance and (sqrt 2 kappa)^2 against
    samples of the rotated pair; the full and cheap rows report the roots of those mean squares."""
    W_l = gauss(n, k, seed=1) * torch.linspace(0.3, 2.0, n, dtype=F64)[:, None]  # anisotropic: tr A tr B / n matters
    b_l, W_next = gauss(n, seed=2), gauss(m, n, seed=3) * torch.linspace(1.5, 0.2, n, dtype=F64)
    aug = augment(W_l, b_l)
    Q = haar(4000, n, seed=4)
    rotated, W_nexts = Q @ aug, W_next.expand(4000, m, n)
    full = pair_geometry_values(aug[None], W_next[None], storage_eps=EPS64)[0][0]
    cheap = gram_values(aug[None], W_next[None], storage_eps=EPS64)[0][0]
    samples = {"imbalance_norm": imbalance_norm(rotated, W_nexts), "relative_imbalance":
               relative_imbalance(rotated, W_nexts), "commutator_ratio_normalized":
               math.sqrt(2) * commutator_ratio(rotated, W_nexts)}
    for metric, values in samples.items():
        base = full[f"{metric}_baseline"]
        assert cheap[f"{metric}_baseline"] == pytest.approx(base, rel=1e-12), metric
        within(values.square(), base ** 2, metric)  # an RMS: the mean of the squares
    assert full["commutator_ratio_normalized_baseline"] == pytest.approx(
        math.sqrt(2) * full["commutator_ratio_baseline"], rel=1e-15)
    A, B = W_next.T @ W_next, aug @ aug.T  # the closed form of the traces
    d2 = A.square().sum() + B.square().sum() - 2 * A.trace() * B.trace() / n
    assert full["imbalance_norm_baseline"] == pytest.approx(d2.sqrt().item(), rel=1e-12)
    assert full["relative_imbalance_baseline"] == pytest.approx(
        (d2.sqrt() / (torch.linalg.matrix_norm(A) + torch.linalg.matrix_norm(B))).item(), rel=1e-12)


def test_imbalance_haar_rms_closed_form_cases() -> None:
    n = 5
    B = gauss(n, n, seed=7)
    B = B @ B.T
    A = 3.0 * torch.eye(n, dtype=F64)  # rotation invariant: every rotation gives ||3 I - B||
    assert imbalance_haar_rms(*traces(A, B), n).item() == pytest.approx(torch.linalg.matrix_norm(A - B).item(),
                                                                        rel=1e-12)
    one = torch.tensor(1.0, dtype=F64)
    assert imbalance_haar_rms(4 * one, 16 * one, one, one, 1).item() == pytest.approx(3.0, rel=1e-15)  # |4 - 1|
    # rank-1 projectors: ||P_u - P_v||^2 = 2 - 2 cos^2, E cos^2 = 1/n (MATH.md §1 distance)
    assert imbalance_haar_rms(one, one, one, one, 8).item() ** 2 == pytest.approx(2 - 2 / 8, rel=1e-14)
    assert relative_imbalance_haar_rms(one, one, one, one, 8).item() == pytest.approx(math.sqrt(2 - 2 / 8) / 2,
                                                                                      rel=1e-14)
    assert relative_imbalance_haar_rms(0 * one, 0 * one, 0 * one, 0 * one, 3).item() == 0.0
    batch = imbalance_haar_rms(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 16.0]), one, one, 1)
    assert batch.tolist() == pytest.approx([0.0, 3.0], abs=1e-15)
    with pytest.raises(ValueError, match="n=0"):
        imbalance_haar_rms(one, one, one, one, 0)


def flag_pair(n: int, k: int, m: int, spectrum_l, spectrum_next, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair with prescribed singular values (clear gaps: flag cuts where they are)."""
    r_l, r_n = len(spectrum_l), len(spectrum_next)
    U = torch.linalg.qr(gauss(n, r_l, seed=seed)).Q
    V = torch.linalg.qr(gauss(k, r_l, seed=seed + 1)).Q
    X = torch.linalg.qr(gauss(m, r_n, seed=seed + 2)).Q
    Y = torch.linalg.qr(gauss(n, r_n, seed=seed + 3)).Q
    return (U * torch.tensor(spectrum_l, dtype=F64)) @ V.T, (X * torch.tensor(spectrum_next, dtype=F64)) @ Y.T


def test_intersection_soft_baseline_by_monte_carlo() -> None:
    """The soft count at the common cut c of Haar-rotated flags averages c^2 / n (the projection kernel's E[PK]);
    the rotation keeps both spectra, so every sample is cut at the same c."""
    n = 12
    W_l, W_next = flag_pair(n, 14, 13, [16.0, 8.0, 4.0, 2.0, 1.0, 0.5] * 2, [9.0, 3.0, 1.0] * 4, seed=11)
    Q = haar(600, n, seed=12)
    out = pair_geometry_values(Q @ W_l, W_next.expand(600, -1, -1), storage_eps=EPS64)
    cuts = {d["intersection_cut"] for _, d in out}
    assert len(cuts) == 1 and (c := cuts.pop()) is not None and 0 < c < n
    base = intersection_soft_baseline(c, c, n)
    assert base == pytest.approx(c * c / n, rel=1e-15) and all(v["intersection_soft_baseline"] == base for v, _ in out)
    within(torch.tensor([v["intersection_soft"] for v, _ in out], dtype=F64), base, "intersection_soft")
    # aligned flags (W_next = W_l^T reads the directions W_l writes, in order): the soft count is c, above c^2 / n
    values, details = pair_geometry_values(W_l[None], W_l.T[None], storage_eps=EPS64)[0]
    c = details["intersection_cut"]
    assert values["intersection_soft"] == pytest.approx(c, rel=1e-9)
    assert values["intersection_soft_baseline"] == c * c / n


def test_intersection_soft_baseline_in_the_default_report_by_monte_carlo() -> None:
    """The default report's windowed flags (MATH.md §4 window) at a common cut c inside windows that stop short of
    the rank: the soft count of Haar-rotated pairs ``(Q W_l, W_next)`` averages the reported c^2 / n.

    Float32 storage precision: a cluster of 75 (74) singular values 1e-10 apart closes neither window, so the
    windows are the 5 (6) leading singular vectors of weights of rank n = 80, and the common cut c = 5 is inside
    both; the rotation keeps both spectra, so every sample has the same windows and cut."""
    n, count, eps32 = 80, 600, torch.finfo(torch.float32).eps
    W_l, W_next = flag_pair(n, 90, 85, [16.0, 8.0, 4.0, 2.0, 1.5] + [1.0 + j * 1e-10 for j in range(75)],
                            [9.0, 6.0, 3.0, 2.5, 2.0, 1.4] + [1.0 + j * 1e-10 for j in range(74)], seed=21)
    rotated, W_nexts = haar(count, n, seed=22) @ W_l, W_next.expand(count, -1, -1)
    out = pair_window_values(rotated, W_nexts, storage_eps=eps32, dtype=F64, svd_l=window_svd(rotated, eps32),
                             svd_next=window_svd(W_nexts, eps32))
    windows = {(d["intersection_cut"], v["window_in"], v["window_out"], v["intersection_soft_baseline"])
               for v, d in out}
    assert len(windows) == 1 and (cut := windows.pop())[:3] == (5, 5.0, 6.0), windows
    assert cut[3] == pytest.approx(25 / 80, rel=1e-15)
    within(torch.tensor([v["intersection_soft"] for v, _ in out], dtype=F64), 25 / 80, "windowed intersection_soft")
    assert all(v["gl_kernel_dim"] is None and v["gl_kernel_dim_baseline"] is None for v, _ in out)  # whole spectra


def test_gl_kernel_dim_baseline_is_the_value_of_every_rotation() -> None:
    """dim(range Q W_l ∩ ker W_next) = max(0, rank W_l - rank W_next) for almost every rotation; a pair whose range
    lies in the kernel (constructed) reads above it, one whose range avoids it reads 0."""
    n = 10
    W_l, W_next = flag_pair(n, 8, 9, [5.0, 4.0, 3.0, 2.0, 1.5, 1.0], [3.0, 2.0, 1.0, 0.7], seed=31)  # ranks 6, 4
    assert gl_kernel_dim_generic(torch.linalg.svdvals(W_l), torch.linalg.svdvals(W_next), n) == 2
    Q = haar(40, n, seed=32)
    out = pair_geometry_values(Q @ W_l, W_next.expand(40, -1, -1), storage_eps=EPS64)
    assert {(v["gl_kernel_dim"], v["gl_kernel_dim_baseline"]) for v, _ in out} == {(2.0, 2.0)}
    assert all(gl_invariant_kernel_dim(q @ W_l, W_next) == 2 for q in Q[:5])  # independent count (three SVDs)
    # range W_l (dim 6) inside ker W_next (dim 6): kernel dimension 6, against the generic 2
    basis = torch.linalg.qr(gauss(n, n, seed=33)).Q
    W_in = basis[:, :6] @ gauss(6, 8, seed=34)
    W_out = gauss(9, 4, seed=35) @ basis[:, 6:].T
    values = pair_geometry_values(W_in[None], W_out[None], storage_eps=EPS64)[0][0]
    assert (values["gl_kernel_dim"], values["gl_kernel_dim_baseline"]) == (6.0, 2.0)
    assert gl_kernel_dim_baseline(3, 7, 10) == 0 and gl_kernel_dim_baseline(7, 3, 10) == 4
    with pytest.raises(ValueError, match="rank_l"):
        gl_kernel_dim_baseline(11, 3, 10)


def spread_pair(n: int, k: int, m: int, spectrum_l, spectrum_next, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``flag_pair`` with log-spaced spectra given as ``(rank, log10 of the smallest)``."""
    return flag_pair(n, k, m, torch.logspace(0, spectrum_l[1], spectrum_l[0], dtype=F64).tolist(),
                     torch.logspace(0, spectrum_next[1], spectrum_next[0], dtype=F64).tolist(), seed=seed)


@pytest.mark.parametrize("n,k,m,spec_l,spec_next,expected", [
    (10, 12, 12, (10, -3.0), (10, -3.0), 0.0),  # full rank: every rotation, sigma_10 sigma_10 = 1e-6 above the cut
    (40, 12, 30, (8, -1.0), (4, -0.5), 4.0),  # ranks below n, well conditioned: all but < 1e-3 of rotations
    (10, 12, 12, (10, -4.5), (10, -4.5), None),  # spread past the cut: rotations give 0, 1, 2 (mean ~1)
    (10, 12, 12, (10, -6.0), (10, -6.0), None),  # rotations give 3 or 4
    (40, 12, 30, (8, -5.0), (4, -5.0), None),  # ranks below n: 1e-5 * 1e-5 is past the 1e-8 cut
])
def test_gl_kernel_dim_baseline_only_where_rotations_give_it(n, k, m, spec_l, spec_next, expected) -> None:
    """The full row's GL kernel baseline against 200 Haar rotations of the pair: where given it is the value of
    every sampled rotation; withheld (None) where the product's cut 1e-8 sigma_1 sigma_1 reaches the products of
    kept singular values (review 2 item 5: it read 0 while rotations averaged 1.0 and 3.36)."""
    W_l, W_next = spread_pair(n, k, m, spec_l, spec_next, seed=41)
    count = 200
    out = pair_geometry_values(haar(count, n, seed=42) @ W_l, W_next.expand(count, -1, -1), storage_eps=EPS64)
    assert {v["gl_kernel_dim_baseline"] for v, _ in out} == {expected}
    values = torch.tensor([v["gl_kernel_dim"] for v, _ in out], dtype=F64)
    base = gl_kernel_dim_baseline(spec_l[0], spec_next[0], n)
    assert bool((values >= base).all())  # Horn: the product's counted rank is at most min(rank_l, rank_next)
    if expected is None:
        assert values.mean().item() > base  # the unconditional formula would be wrong here
    else:
        assert values.tolist() == [expected] * count


def test_gl_kernel_dim_exception_bound_cases() -> None:
    """The bound's exact cases (a zero rank, one side of rank n) and its monotone growth with the cut ratio."""
    assert gl_kernel_dim_exception_bound(0, 5, 10, 0.5) == 0.0 and gl_kernel_dim_exception_bound(4, 10, 10, 0.99) == 0.0
    assert gl_kernel_dim_exception_bound(10, 3, 10, 1.0) == 1.0
    small, large = (gl_kernel_dim_exception_bound(4, 8, 40, c) for c in (1e-8, 1e-4))
    assert 0 < small < 1e-3 < large <= 1.0
    with pytest.raises(ValueError, match="cut_ratio"):
        gl_kernel_dim_exception_bound(4, 8, 40, float("nan"))


@pytest.mark.parametrize("n,r_l,r_next,lo_l,lo_next", [(40, 4, 4, -2.5, -3.5), (6, 2, 2, -3.0, -3.3)])
def test_gl_kernel_dim_exception_bound_against_monte_carlo(n, r_l, r_next, lo_l, lo_next) -> None:
    """Where the bound is informative (< 1) the share of 2000 Haar rotations whose full-row value differs from the
    baseline is below it (measured ~1/25 of it); the share is not 0, so the baseline would be false there were the
    bound ignored (cut ratio c0 = 1e-8 / (sigma_r_l sigma_r_next) = 1e-2)."""
    W_l, W_next = spread_pair(n, 12, 30, (r_l, lo_l), (r_next, lo_next), seed=7)
    count = 2000
    out = pair_geometry_values(haar(count, n, seed=8) @ W_l, W_next.expand(count, -1, -1), storage_eps=EPS64)
    base = gl_kernel_dim_baseline(r_l, r_next, n)
    share = sum(v["gl_kernel_dim"] != base for v, _ in out) / count
    bound = gl_kernel_dim_exception_bound(r_l, r_next, n, 1e-8 / 10 ** (lo_l + lo_next))
    assert 0 < share and bound < 1
    assert share + 5 * math.sqrt(share * (1 - share) / count) <= bound, (share, bound)
    assert {v["gl_kernel_dim_baseline"] for v, _ in out} == {None}


@pytest.mark.parametrize("full", [False, True])
def test_gl_kernel_dim_baseline_in_the_linear_chain_report(full) -> None:
    """Where the report emits the GL kernel dimension outside transformers (``linear_chain`` rows, default and
    full): withheld for spectra spread past the cut (the row reads 1 there), and for a well-conditioned pair the
    value every one of 20 Haar rotations ``(Q W_l, W_next)`` gives through the report."""
    def row(W_l: torch.Tensor, W_next: torch.Tensor) -> dict:
        net = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=False), torch.nn.ReLU(),
                                  torch.nn.Linear(10, 12, bias=False)).double()
        with torch.no_grad():
            net[0].weight.copy_(W_l)
            net[2].weight.copy_(W_next)
        (only,) = analyze(net, full=full).rows
        return only.values
    spread = row(*spread_pair(10, 12, 12, (10, -4.5), (10, -4.5), seed=41))
    assert (spread["gl_kernel_dim"], spread["gl_kernel_dim_baseline"]) == (1.0, None)
    W_l, W_next = spread_pair(10, 12, 12, (10, -3.0), (10, -3.0), seed=41)
    assert {(v := row(q @ W_l, W_next))["gl_kernel_dim"] - v["gl_kernel_dim_baseline"] for q in haar(20, 10, seed=43)} \
        == {0.0}
    assert row(W_l, W_next)["gl_kernel_dim_baseline"] == 0.0


def test_gl_kernel_dim_of_bf16_weights_is_counted_at_the_storage_cut():
    """A range inside a kernel (n = 10: range W_l = 6 directions, row W_next = the other 4, so W_next W_l = 0 and
    the GL kernel dimension is 6 = rank W_l - rank(W_next W_l), MATH.md §4) stays 6 after rounding both weights to
    bf16: the product's rounding residue (~1e-3 of sigma_1 sigma_1) is below the storage cut, not rank (review: a
    1e-8 cut read 0 there)."""
    from hf_flag.analysis.pairs import pair_geometry_values

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    W_l = Q[:, :6] @ torch.randn(6, 8, generator=g, dtype=torch.float64)
    W_next = torch.randn(7, 4, generator=g, dtype=torch.float64) @ Q[:, 6:].T
    assert float(torch.linalg.matrix_norm(W_next @ W_l)) < 1e-12  # exactly a range inside the kernel
    exact, = pair_geometry_values(W_l[None], W_next[None], storage_eps=torch.finfo(torch.float64).eps)
    rounded, = pair_geometry_values(W_l.bfloat16().double()[None], W_next.bfloat16().double()[None],
                                    storage_eps=torch.finfo(torch.bfloat16).eps)
    assert exact[0]["gl_kernel_dim"] == 6.0 and rounded[0]["gl_kernel_dim"] == 6.0
