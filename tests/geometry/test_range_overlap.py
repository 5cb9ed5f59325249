"""range_overlap (the companion of kappa on low-rank pairs) and commutator_reading_holds (MATH.md §3).

References: principal angles built into the constructions (cos^2 known in closed form), dense projector products in
numpy, Monte Carlo over Haar-random subspaces for the baseline.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from hf_flag.geometry.angles import thin_svd
from hf_flag.geometry.pairs import commutator_baseline, commutator_ratio, commutator_reading_holds, pair_values_from_svd


def _values(W_l: torch.Tensor, W_next: torch.Tensor):
    return pair_values_from_svd(W_l, W_next, thin_svd(W_l), thin_svd(W_next))


def _pair_with_angles(n: int, r: int, thetas: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_l (n x r) with range spanned by f_1..f_r and W_next (r x n) whose row space is rotated from f_i towards
    f_{r+i} by thetas[i] (f a random orthonormal frame), with random (non-degenerate) spectra and singular bases
    inside the ranges that are unrelated to each other."""
    assert 2 * r <= n and len(thetas) == r
    rng = np.random.default_rng(seed)
    frame = ortho_group.rvs(n, random_state=seed)
    left = frame[:, :r]
    right = np.stack([math.cos(t) * frame[:, i] + math.sin(t) * frame[:, r + i] for i, t in enumerate(thetas)], 1)
    W_l = left @ rng.standard_normal((r, r))  # Gaussian inner factors: spread (Marchenko-Pastur) spectra and
    W_next = rng.standard_normal((r, r)) @ right.T  # singular bases inside the ranges unrelated to each other
    return torch.from_numpy(W_l), torch.from_numpy(W_next)


def test_orthogonal_ranges_give_zero_overlap_although_kappa_is_zero():
    W_l, W_next = _pair_with_angles(40, 8, [math.pi / 2] * 8, seed=1)
    v = _values(W_l, W_next)
    assert float(commutator_ratio(W_l, W_next)) < 1e-12  # range B in ker A: A B = B A = 0
    assert float(v.range_overlap) == pytest.approx(0.0, abs=1e-12)
    assert float(v.range_overlap_baseline) == pytest.approx(8 / 40)


@pytest.mark.parametrize("shared", [0, 3, 8])
def test_partial_and_full_sharing_counts_the_shared_directions(shared):
    r, n = 8, 40
    W_l, W_next = _pair_with_angles(n, r, [0.0] * shared + [math.pi / 2] * (r - shared), seed=shared)
    assert float(_values(W_l, W_next).range_overlap) == pytest.approx(shared / r, abs=1e-12)


def test_overlap_equals_mean_cos2_and_dense_projector_product():
    thetas = [0.1, 0.4, 0.7, 1.0, 1.3]
    W_l, W_next = _pair_with_angles(30, 5, thetas, seed=3)
    expected = sum(math.cos(t) ** 2 for t in thetas) / 5
    P_l = W_l.numpy() @ np.linalg.pinv(W_l.numpy())
    P_n = np.linalg.pinv(W_next.numpy()) @ W_next.numpy()
    assert np.linalg.norm(P_l @ P_n) ** 2 / 5 == pytest.approx(expected, rel=1e-10)
    assert float(_values(W_l, W_next).range_overlap) == pytest.approx(expected, rel=1e-10)


def test_monotone_in_alignment_where_kappa_over_baseline_is_not():
    """One rotation angle t for all directions, from shared (t = 0) to orthogonal ranges (t = pi/2): the overlap
    is cos^2 t, strictly decreasing; kappa / baseline is 0 at pi/2 ("more aligned than chance") and above 1 for the
    shared range with unrelated bases (t = 0), so it does not order these configurations."""
    ts = np.linspace(0, math.pi / 2, 7)
    overlaps, ratios = [], []
    for t in ts:
        W_l, W_next = _pair_with_angles(256, 64, [float(t)] * 64, seed=5)  # an MLP's n = 4 r
        overlaps.append(float(_values(W_l, W_next).range_overlap))
        ratios.append(float(commutator_ratio(W_l, W_next) / commutator_baseline(W_l, W_next)))
    assert np.allclose(overlaps, np.cos(ts) ** 2, atol=1e-12)
    assert all(a > b for a, b in zip(overlaps, overlaps[1:]))
    assert ratios[0] > 1.0 and ratios[-1] < 1e-10  # the failure of kappa's reading the issue reports
    assert not commutator_reading_holds(64, 64, 256)


def test_batched_members_with_different_ranks():
    W1, N1 = _pair_with_angles(20, 4, [0.0, 0.0, math.pi / 2, math.pi / 2], seed=7)
    W2, N2 = _pair_with_angles(20, 4, [0.0] * 4, seed=8)
    W2 = W2.clone()
    W2[:, 3] = 0  # rank 3 on the W_l side; its range stays inside row(W_next)
    W_l, W_next = torch.stack([W1, W2]), torch.stack([N1, N2])
    v = _values(W_l, W_next)
    assert v.range_overlap.tolist() == pytest.approx([0.5, 1.0], abs=1e-12)
    assert v.range_overlap_baseline.tolist() == pytest.approx([4 / 20, 4 / 20])


def test_baseline_matches_monte_carlo_over_haar_subspaces():
    n, k, m = 24, 6, 4  # ranks 6 and 4 in R^24: baseline max/n = 0.25
    rng = np.random.default_rng(11)
    draws = []
    for i in range(2000):
        Q = ortho_group.rvs(n, random_state=rng)
        W_l = torch.from_numpy(Q[:, :k] @ rng.standard_normal((k, k)))
        W_next = torch.from_numpy(rng.standard_normal((m, m)) @ Q[:, k:k + m].T @ ortho_group.rvs(n, random_state=rng))
        draws.append(float(_values(W_l, W_next).range_overlap))
        if i == 0:
            baseline = float(_values(W_l, W_next).range_overlap_baseline)
    mean, se = float(np.mean(draws)), float(np.std(draws)) / math.sqrt(len(draws))
    assert baseline == pytest.approx(max(k, m) / n)
    assert abs(mean - baseline) < 4 * se


def test_full_rank_pair_reading_holds_and_kappa_orders_rotations():
    """A full-rank A (n x n): kappa is 0 for the shared eigenbasis and grows as B's eigenbasis is rotated away
    (here within 0..pi/4 of one plane pair), so kappa / baseline reads as basis alignment."""
    n = 12
    frame = ortho_group.rvs(n, random_state=2)
    W_next = torch.from_numpy(np.diag(np.linspace(1, 3, n)) @ frame.T)
    values = []
    for t in np.linspace(0, math.pi / 4, 6):
        R = np.eye(n)
        R[:2, :2] = [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]
        W_l = torch.from_numpy(frame @ R @ np.diag(np.linspace(2, 5, n)))
        values.append(float(commutator_ratio(W_l, W_next)))
    assert values[0] < 1e-12 and all(a < b for a, b in zip(values, values[1:]))
    assert commutator_reading_holds(n, n, n) and commutator_reading_holds(n, 3, n) and commutator_reading_holds(2, n, n)


@pytest.mark.parametrize("a,b,n,expected", [(4, 4, 16, False), (12, 12, 16, False), (16, 4, 16, True),
                                            (4, 16, 16, True), (0, 16, 16, True), (15, 15, 16, False)])
def test_reading_holds_table(a, b, n, expected):
    assert commutator_reading_holds(a, b, n) is expected


def test_partial_kernel_case_kappa_zero_with_partial_overlap():
    """rank_a + rank_b > n but both below n: still a kappa = 0 pair whose ranges only partly coincide."""
    n = 6
    A_dirs = np.eye(n)[:, :4]  # range A = e1..e4
    B_dirs = np.eye(n)[:, [0, 1, 4, 5]]  # range B = e1, e2, e5, e6 (e5, e6 in ker A)
    W_next = torch.from_numpy(np.diag([1.0, 2.0, 3.0, 4.0]) @ A_dirs.T)
    W_l = torch.from_numpy(B_dirs @ np.diag([1.5, 2.5, 3.5, 4.5]))
    assert float(commutator_ratio(W_l, W_next)) < 1e-14
    assert float(_values(W_l, W_next).range_overlap) == pytest.approx(0.5, abs=1e-12)
    assert not commutator_reading_holds(4, 4, n)


def test_reading_holds_rejects_bad_ranks():
    with pytest.raises(ValueError, match="rank_a"):
        commutator_reading_holds(5, 2, 4)
    with pytest.raises(ValueError, match="n="):
        commutator_reading_holds(0, 0, 0)
    with pytest.raises(ValueError, match="n="):
        commutator_reading_holds(1, 1, None)


def test_analysis_pair_rows_carry_range_overlap():
    from hf_flag.analysis.pairs import pair_geometry_values

    W_l, W_next = _pair_with_angles(40, 8, [0.0] * 3 + [math.pi / 2] * 5, seed=4)
    (values, _), = pair_geometry_values(W_l[None], W_next[None], storage_eps=2.2e-16)
    assert values["range_overlap"] == pytest.approx(3 / 8, abs=1e-12)
    assert values["range_overlap_baseline"] == pytest.approx(8 / 40)


def test_commutator_reading_of_pairs_counts_ranks_at_the_rank_cut():
    from hf_flag.geometry.pairs import commutator_reading_of_pairs

    g = torch.Generator().manual_seed(7)
    n = 6
    full = torch.randn(n, n, generator=g, dtype=torch.float64)
    low = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
    wide_low = torch.randn(n, 4, generator=g, dtype=torch.float64)  # shorter side 4 < n: never rank n
    # batch: (W_l, W_next) = (full, low) holds through W_l; (low, low) does not; (wide_low, full) holds through W_next
    W_l = torch.stack([full, low, torch.cat([wide_low, wide_low[:, :2]], 1)])
    W_next = torch.stack([low, low, full])
    assert commutator_reading_of_pairs(W_l, W_next) == [True, False, True]
    # the same from complete spectra, and the predicate on the ranks they give
    s_l, s_next = torch.linalg.svdvals(W_l), torch.linalg.svdvals(W_next)
    assert commutator_reading_of_pairs(W_l, W_next, s_l=s_l, s_next=s_next) == [True, False, True]
    assert [commutator_reading_holds(int(torch.linalg.matrix_rank(b)), int(torch.linalg.matrix_rank(a)), n)
            for a, b in zip(W_next, W_l)] == [True, False, True]  # the third W_l: 6 columns but rank 4
    # an MLP-shaped pair (n = d_ff above both ranks) never reads, without any rank computed
    up, down = torch.randn(16, 4, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    assert commutator_reading_of_pairs(up, down) == [False]


@pytest.mark.parametrize("n, k, m", [(24, 5, 7), (6, 10, 9)])  # hidden dim large (C, G_P, G_Q) and small (A, B)
def test_range_overlap_from_grams_equals_the_projector_form(n, k, m):
    from hf_flag.geometry.angles import default_rtol
    from hf_flag.geometry.pairs import range_overlap_from_grams

    g = torch.Generator().manual_seed(11)

    def low_rank(rows, cols, r):
        return torch.randn(rows, r, generator=g, dtype=torch.float64) @ torch.randn(r, cols, generator=g,
                                                                                   dtype=torch.float64)

    W_l = torch.stack([low_rank(n, k, 3), torch.randn(n, k, generator=g, dtype=torch.float64)])
    W_next = torch.stack([low_rank(m, n, 4), low_rank(m, n, 2)])
    got, base = range_overlap_from_grams(W_l, W_next, rtol=(default_rtol(W_l), default_rtol(W_next)))
    assert [float(b) for b in base] == [4 / n, max(min(n, k), 2) / n]  # ranks (3, 4) and (min(n, k), 2)
    for i in range(2):  # dense reference: orthonormal bases of the two ranges at the same rank cut
        Q_l = torch.linalg.svd(W_l[i], full_matrices=False)[0][:, :int(torch.linalg.matrix_rank(W_l[i]))]
        Q_n = torch.linalg.svd(W_next[i].mT, full_matrices=False)[0][:, :int(torch.linalg.matrix_rank(W_next[i]))]
        pk = float((Q_l.mT @ Q_n).square().sum())
        assert float(got[i]) == pytest.approx(pk / min(Q_l.shape[1], Q_n.shape[1]), abs=1e-9)
        assert float(base[i]) == pytest.approx(max(Q_l.shape[1], Q_n.shape[1]) / n, abs=1e-15)
