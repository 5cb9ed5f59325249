"""Singular flags, rank matrix and Bruhat permutation, GL-invariant kernel dimension (MATH.md §4)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from hf_flag.geometry.angles import principal_angles
from hf_flag.geometry.flags import (
    flag_cuts,
    flag_position_from_svd,
    flag_relative_position,
    gl_invariant_kernel_dim,
    identity_agreement,
    permutation_from_rank_matrix,
    rank_matrix_from_permutation,
)

F64 = torch.float64


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(_rand(n, n, seed=seed))[0]


def _spectrum(n: int) -> torch.Tensor:
    return 2.0 ** torch.arange(n, 0, -1, dtype=F64)  # distinct, ratio 2: a complete flag on each side


def _layers_in_position(w: list[int], *, extra_in: int = 0, extra_out: int = 0):
    """``W_l = I diag(s)`` (n x k) and ``W_next`` (m x n) with ``v_b = e_{pi(b)}``, ``pi = w^{-1}``.

    Then ``F_i ∩ G_j = span{e_a : a <= i, w(a) <= j}``, i.e. relative position ``w`` (MATH.md §4).
    """
    n = len(w)
    s = _spectrum(n)
    pi = torch.argsort(torch.tensor(w) - 1)  # pi[b] = a with w(a) = b + 1
    V = torch.eye(n, dtype=F64)[:, pi]
    W_l = torch.cat([torch.diag(s), torch.zeros(n, extra_in, dtype=F64)], dim=1)
    W_next = torch.cat([torch.diag(s) @ V.T, torch.zeros(extra_out, n, dtype=F64)], dim=0)
    return W_l, W_next


def _brute_rank_matrix(W_l: torch.Tensor, W_next: torch.Tensor, tau: float) -> torch.Tensor:
    """Reference: principal angles of every pair of top singular subspaces, counted below tau."""
    U = torch.linalg.svd(W_l, full_matrices=False)[0]
    V = torch.linalg.svd(W_next, full_matrices=False)[2].T
    n = W_l.shape[0]
    return torch.tensor([[int((principal_angles(U[:, :i], V[:, :j]) < tau).sum()) for j in range(1, n + 1)]
                         for i in range(1, n + 1)])


@pytest.mark.parametrize("w", [
    [1, 2, 3, 4, 5, 6],
    [2, 1, 4, 3, 6, 5],
    [3, 6, 1, 5, 2, 4],
    [7, 5, 4, 6, 1, 2, 3],
    [8, 1, 7, 2, 6, 3, 5, 4],
    [1, 8, 2, 7, 3, 6, 4, 5],
])
def test_permutation_recovery(w: list[int]) -> None:
    n = len(w)
    W_l, W_next = _layers_in_position(w, extra_in=2, extra_out=3)
    pos = flag_relative_position(W_l, W_next)
    assert pos.cuts_left == pos.cuts_right == list(range(1, n + 1))
    assert pos.is_permutation and pos.permutation_word == w
    assert torch.equal(pos.rank_matrix, rank_matrix_from_permutation(w))
    assert torch.equal(pos.rank_matrix, _brute_rank_matrix(W_l, W_next, pos.tau))
    # Soft count = projection kernel of each window: here exactly the rank matrix.
    assert torch.allclose(pos.soft_matrix, pos.rank_matrix.to(F64), atol=1e-12)


def test_aligned_flags_give_identity_and_generic_flags_the_longest_permutation() -> None:
    n = 7
    s = torch.diag(_spectrum(n))
    Q, Q2 = _orthogonal(n, seed=1), _orthogonal(n, seed=2)
    aligned = flag_relative_position(Q @ s @ _orthogonal(n, seed=3), _orthogonal(n, seed=4) @ s @ Q.T)
    assert aligned.permutation_word == list(range(1, n + 1))
    assert torch.equal(aligned.rank_matrix, torch.minimum(*torch.meshgrid(torch.arange(1, n + 1),
                                                                        torch.arange(1, n + 1), indexing="ij")))
    assert aligned.intersection_cut == n - 1 and aligned.intersection_dim == n - 1
    generic = flag_relative_position(Q @ s, s @ Q2.T)
    assert generic.permutation_word == [n + 1 - a for a in range(1, n + 1)]
    i, j = torch.meshgrid(torch.arange(1, n + 1), torch.arange(1, n + 1), indexing="ij")
    assert torch.equal(generic.rank_matrix, (i + j - n).clamp(min=0))
    assert generic.intersection_dim == generic.intersection_baseline == max(0, 2 * (n - 1) - n)
    # Soft matrix = sum cos^2 of the principal angles of each window (independent algorithm).
    U, V = Q, Q2
    for a, b in [(2, 3), (5, 4), (6, 6)]:
        ref = torch.cos(principal_angles(U[:, :a], V[:, :b])).pow(2).sum().item()
        assert abs(generic.soft_matrix[a - 1, b - 1].item() - ref) < 1e-12


def test_rank_matrix_permutation_round_trip() -> None:
    for n in (1, 3, 4):
        for w in itertools.permutations(range(1, n + 1)):
            r = rank_matrix_from_permutation(list(w))
            assert permutation_from_rank_matrix(r).tolist() == list(w)
            brute = torch.tensor([[sum(1 for a in range(ii + 1) if w[a] <= jj + 1) for jj in range(n)]
                                  for ii in range(n)])
            assert torch.equal(r, brute)
    w0 = torch.arange(6, 0, -1)
    assert torch.equal(permutation_from_rank_matrix(rank_matrix_from_permutation(w0)), w0)
    with pytest.raises(ValueError):
        rank_matrix_from_permutation([1, 1, 3])
    with pytest.raises(ValueError):
        permutation_from_rank_matrix(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="square"):
        permutation_from_rank_matrix(torch.ones(2, 3, dtype=torch.int64))


def test_invariance_under_orthogonal_hidden_basis_change_and_global_scaling() -> None:
    n, k, m = 6, 8, 7
    s = torch.diag(_spectrum(n))
    W_l = _orthogonal(n, seed=5) @ torch.cat([s, torch.zeros(n, k - n, dtype=F64)], 1) @ _orthogonal(k, seed=6)
    U_mix = _orthogonal(n, seed=5).clone()
    U_mix[:, 3:] = _orthogonal(n, seed=7)[:, 3:]  # partially aligned: an interesting position
    U_mix = torch.linalg.qr(U_mix)[0]
    W_next = _orthogonal(m, seed=8)[:, :n] @ s @ U_mix.T
    base = flag_relative_position(W_l, W_next)
    assert base.is_permutation
    perm = torch.eye(n, dtype=F64)[torch.tensor([3, 0, 5, 1, 4, 2])]
    signs = torch.diag(torch.tensor([1., -1, -1, 1, 1, -1], dtype=F64))
    for Q in (_orthogonal(n, seed=9), perm, signs):
        moved = flag_relative_position(Q @ W_l, W_next @ Q.T)
        assert (moved.cuts_left, moved.cuts_right) == (base.cuts_left, base.cuts_right)
        assert torch.equal(moved.rank_matrix, base.rank_matrix)
        assert moved.permutation_word == base.permutation_word
        assert torch.allclose(moved.soft_matrix, base.soft_matrix, atol=1e-12)
        angles = principal_angles(Q @ W_l, (W_next @ Q.T).T)
        assert torch.allclose(angles, principal_angles(W_l, W_next.T), atol=1e-12)
    scaled = flag_relative_position(3.5 * W_l, 0.01 * W_next)
    assert torch.equal(scaled.rank_matrix, base.rank_matrix)
    assert torch.allclose(scaled.soft_matrix, base.soft_matrix, atol=1e-12)


def test_not_invariant_under_per_neuron_positive_rescaling() -> None:
    n = 6
    Q = _orthogonal(n, seed=10)
    s = torch.diag(_spectrum(n))
    W_l, W_next = Q @ s, s @ Q.T  # aligned: identity position
    base = flag_relative_position(W_l, W_next)
    assert base.permutation_word == list(range(1, n + 1))
    D = torch.diag(torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0, 0.25], dtype=F64))  # ReLU symmetry (MATH.md §4)
    moved = flag_relative_position(D @ W_l, W_next @ torch.linalg.inv(D))
    assert base.intersection_dim == base.intersection_cut == n - 1
    assert moved.intersection_cut is not None and moved.intersection_dim < moved.intersection_cut
    U = torch.linalg.svd(D @ W_l)[0]
    V = torch.linalg.svd(W_next @ torch.linalg.inv(D))[2].T
    assert principal_angles(U[:, :1], V[:, :1]).item() > 0.2  # top directions no longer shared
    # The function computed by the pair is unchanged: the rescaling is a genuine symmetry.
    assert torch.allclose((W_next @ torch.linalg.inv(D)) @ (D @ W_l), W_next @ W_l, atol=1e-10)


def test_partial_flags_cut_only_at_significant_gaps() -> None:
    n = 8
    s = torch.tensor([10.0, 9.9, 9.8, 3.0, 2.95, 1.0, 0.0, 0.0], dtype=F64)  # gaps after 3 and 5; rank 6
    Q, Q2 = _orthogonal(n, seed=11), _orthogonal(n, seed=12)
    W_l, W_next = Q @ torch.diag(s), torch.diag(s) @ Q2.T
    pos = flag_relative_position(W_l, W_next)
    assert pos.cuts_left == pos.cuts_right == [3, 5, 6, 8]
    assert pos.is_permutation and pos.permutation_word is None
    blocks = torch.tensor([3, 2, 1, 2])
    assert torch.equal(pos.permutation.sum(1), blocks) and torch.equal(pos.permutation.sum(0), blocks)
    # Generic partial flags: r = max(0, i + j - n) at the cuts.
    expected = torch.tensor([[max(0, i + j - n) if max(i, j) < n else min(i, j) for j in pos.cuts_right]
                             for i in pos.cuts_left])
    assert torch.equal(pos.rank_matrix, expected)
    assert pos.intersection_cut == 6 and pos.intersection_dim == 4 == pos.intersection_baseline
    # Default tau from the smallest kept gap: sigma_6 - 0 = 1.0 (the others are 6.8 and 1.95).
    assert pos.tau == pytest.approx(10 * torch.finfo(torch.float32).eps * 10.0 / min(9.8 - 3.0, 2.95 - 1.0, 1.0))
    cuts, bounds = flag_cuts(s, 6, gap_ratio=1.25)
    assert cuts == [3, 5, 6] and len(bounds) == 3
    assert flag_cuts(s, 6, max_cuts=1)[0] == [3]  # keeps the most reliable (largest gap)
    assert flag_cuts(s, 6, storage_eps=7.8e-3, max_tau=0.2)[0] == [3]  # bf16: only the big gap survives Wedin
    d = pos.to_dict()
    assert d["rank_matrix"] == pos.rank_matrix.tolist() and d["cuts_left"] == [3, 5, 6, 8] and d["n"] == n


def _tiny_angle_pair(t: float, seed: int):
    """W_l = Q diag(s), W_next with v_1 rotated by ``t`` rad from u_1 (towards u_5), under a random rotation Q."""
    n = 5
    s = torch.diag(_spectrum(n))
    V = torch.eye(n, dtype=F64)
    V[:, 0] = torch.tensor([math.cos(t), 0, 0, 0, math.sin(t)], dtype=F64)
    V[:, 4] = torch.tensor([-math.sin(t), 0, 0, 0, math.cos(t)], dtype=F64)
    Q = _orthogonal(n, seed=seed) if seed >= 0 else torch.eye(n, dtype=F64)
    return Q @ s, s @ V.T @ Q.T


def test_tiny_shared_angle_is_resolved_by_sines() -> None:
    # F_1 and G_1 differ by 1e-9 rad: cos = 1 exactly in float64, so arccos could not tell tau=1e-8 from 1e-10.
    W_l, W_next = _tiny_angle_pair(1e-9, seed=-1)
    assert flag_relative_position(W_l, W_next, tau=1e-8).rank_matrix[0, 0].item() == 1
    assert flag_relative_position(W_l, W_next, tau=1e-10).rank_matrix[0, 0].item() == 0
    # Under random rotations sum cos^2 may round just below cos^2(tau) = 1.0: the count must still be 1.
    for seed in range(12):
        W_l, W_next = _tiny_angle_pair(1e-10, seed=seed)
        pos = flag_relative_position(W_l, W_next, tau=1e-9)
        assert pos.rank_matrix[0, 0].item() == 1 and pos.permutation_word == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("angle", [3e-6, 1.2e-6, 0.9e-6, 1e-6 * (1 + 1e-10), 1e-6 * (1 - 1e-10), 1e-9, 0.3])
def test_cosine_counts_equal_sine_counts_around_tau(angle: float, monkeypatch) -> None:
    """Windows decided by their cosines (no cosine within rounding of cos tau) count as the sines do; angles
    within rounding of tau take the sine path.  Reference: the same call with every window forced to sines."""
    import hf_flag.geometry.flags as flags

    W_l, W_next = _tiny_angle_pair(angle, seed=3)
    fast = flag_relative_position(W_l, W_next, tau=1e-6)
    monkeypatch.setattr(flags, "COS_BAND_ULPS", 1e300)  # every window ambiguous: sines only
    sines = flag_relative_position(W_l, W_next, tau=1e-6)
    assert torch.equal(fast.rank_matrix, sines.rank_matrix)
    if abs(angle - 1e-6) > 1e-9:  # decidable in float64 (the sine path resolves ~1e-16 rad)
        assert fast.rank_matrix[0, 0].item() == (1 if angle < 1e-6 else 0)


def test_degenerate_inputs() -> None:
    n = 5
    zero = flag_relative_position(torch.zeros(n, 3), _rand(4, n, seed=13))
    assert zero.cuts_left == [n] and zero.intersection_cut is None and zero.intersection_dim is None
    assert torch.equal(zero.rank_matrix[0], torch.tensor(zero.cuts_right))
    assert math.isfinite(zero.tau) and zero.is_permutation
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4, 6\)"):
        flag_relative_position(_rand(5, 3, seed=14), _rand(4, 6, seed=15))
    bad = _rand(5, 3, seed=16)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W_l"):
        flag_relative_position(bad, _rand(4, 5, seed=17))
    with pytest.raises(ValueError, match="tau"):
        flag_relative_position(_rand(5, 3, seed=16), _rand(4, 5, seed=17), tau=2.0)
    with pytest.raises(ValueError, match="W_next"):
        gl_invariant_kernel_dim(_rand(5, 3, seed=16), torch.full((4, 5), float("inf")))


def test_gl_invariant_kernel_dim_on_constructed_cases() -> None:
    n, k, m = 8, 5, 6
    # range W_l = span(e_1..e_5); ker W_next ⊇ span(e_1, e_2)  ->  intersection dim 2.
    W_l = torch.zeros(n, k, dtype=F64)
    W_l[:k, :k] = _rand(k, k, seed=18) + 5 * torch.eye(k, dtype=F64)
    W_next = _rand(m, n, seed=19)
    W_next[:, :2] = 0
    assert gl_invariant_kernel_dim(W_l, W_next) == 2
    # Invariant under any g in GL(n): (g W_l, W_next g^-1).
    g = _rand(n, n, seed=20) + 3 * torch.eye(n, dtype=F64)
    assert gl_invariant_kernel_dim(g @ W_l, W_next @ torch.linalg.inv(g)) == 2
    # range W_l inside ker W_next entirely -> rank W_l; product exactly zero -> still no spurious rank.
    assert gl_invariant_kernel_dim(W_l, torch.cat([torch.zeros(m, k), _rand(m, n - k, seed=21).float()], 1)) == k
    # Generic pair: range ∩ kernel = max(0, rank W_l - rank W_next) = 0 here; and rank-deficient W_next.
    assert gl_invariant_kernel_dim(_rand(n, k, seed=22), _rand(m, n, seed=23)) == 0
    low = _rand(m, 2, seed=24) @ _rand(2, n, seed=25)  # rank 2: kernel of dim 6 meets a 5-dim range in 3
    assert gl_invariant_kernel_dim(_rand(n, k, seed=26), low) == 3
    assert gl_invariant_kernel_dim(torch.zeros(n, k), W_next) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    W_l, W_next = _layers_in_position([3, 6, 1, 5, 2, 4], extra_in=2, extra_out=1)
    Q = _orthogonal(6, seed=30)
    cpu = flag_relative_position(Q @ W_l, W_next @ Q.T)
    gpu = flag_relative_position((Q @ W_l).cuda(), (W_next @ Q.T).cuda())
    assert gpu.permutation_word == cpu.permutation_word == [3, 6, 1, 5, 2, 4]
    assert torch.allclose(gpu.soft_matrix, cpu.soft_matrix, atol=1e-10)
    low = _rand(5, 2, seed=31) @ _rand(2, 8, seed=32)
    assert gl_invariant_kernel_dim(_rand(8, 4, seed=33).cuda(), low.cuda()) == 2


def test_identity_agreement_is_one_for_aligned_flags_and_counts_matching_cells() -> None:
    n = 6
    aligned = flag_relative_position(*_layers_in_position(list(range(1, n + 1))))
    assert identity_agreement(aligned) == pytest.approx((1.0, 1.0), abs=1e-12)
    # the longest permutation: r_ij = max(0, i + j - n) equals min(i, j) exactly when max(i, j) = n, which never
    # happens below n, so no non-trivial cell agrees; the soft matrix is the identity's too (cos^2 are 0 or 1)
    w0 = list(range(n, 0, -1))
    reversed_ = flag_relative_position(*_layers_in_position(w0))
    cells = [(i, j) for i in range(1, n) for j in range(1, n)]
    expected_soft = sum(max(0, i + j - n) / min(i, j) for i, j in cells) / len(cells)
    hard, soft = identity_agreement(reversed_)
    assert hard == 0.0 and soft == pytest.approx(expected_soft, abs=1e-10)


def test_float32_factors_count_the_directions_two_subspaces_must_share() -> None:
    """Two 16-dim subspaces of R^24 share at least 8 directions (dimension count): the default report's float32
    window factors, orthonormal only to float32 rounding, must count them as the float64 factors do (review: the
    float32 windows gave 3, 3, 4 on a tiny Llama's MLP pairs where full=True gave 8)."""
    g = torch.Generator().manual_seed(0)
    W_l, W_next = torch.randn(24, 16, generator=g), torch.randn(16, 24, generator=g)
    counts = []
    for dtype in (torch.float64, torch.float32):
        U, s_l, _ = torch.linalg.svd(W_l.to(dtype), full_matrices=False)
        _, s_n, Vh = torch.linalg.svd(W_next.to(dtype), full_matrices=False)
        flag = flag_position_from_svd(U, s_l.double(), Vh, s_n.double(), n=24, rank_rtol=(1e-6, 1e-6))
        counts.append((flag.intersection_cut, flag.intersection_dim))
    # independent reference: the principal angles of the two ranges, float64
    angles = principal_angles(W_l.double(), W_next.double().T)
    assert int((angles < 1e-6).sum()) == 8
    assert counts == [(16, 8), (16, 8)]
