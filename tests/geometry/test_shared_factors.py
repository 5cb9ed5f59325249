"""Shared factorisations: Gram factors reused by kappa and imbalance, thin SVDs reused by transport, flags and the
GL kernel dimension, and the reduced hidden coordinates of hf_flag.analysis.pairs (MATH.md §2-§4)."""
import math

import pytest
import torch

from hf_flag.analysis.pairs import pair_geometry_values
from hf_flag.geometry.pairs import product_rank_rtol, transport_k
from hf_flag.geometry.angles import default_rtol, thin_svd
from hf_flag.geometry.baselines import commutator_haar_rms
from hf_flag.geometry.flags import (
    flag_position_from_svd,
    flag_relative_position,
    gl_invariant_kernel_dim,
    gl_kernel_dim_from_product_rank,
    gl_kernel_dim_from_spectra,
    rank_matrix_from_permutation,
)
from hf_flag.geometry.pairs import (
    commutator_baseline,
    commutator_ratio,
    gram_diagnostics,
    hidden_coordinates,
    imbalance,
    imbalance_diagonal_norm,
    pair_values_from_svd,
    PRODUCT_RANK_RTOL,
    product_rank,
    transport_scores,
    transport_scores_from_svd,
)

F64 = torch.float64


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _spiked_pair(n: int, k: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian pair plus 4 separated spikes, two of them shared by range(W_l) and row(W_next)."""
    H = torch.linalg.qr(_rand(n, 6, seed=seed)).Q
    s = 4.0 * 1.6 ** torch.arange(4, 0, -1, dtype=F64)
    W_l = 0.1 * _rand(n, k, seed=seed + 1) + (H[:, :4] * s) @ _rand(4, k, seed=seed + 2)
    W_next = 0.1 * _rand(m, n, seed=seed + 3) + _rand(m, 4, seed=seed + 4) @ (H[:, [0, 1, 4, 5]] * s).T
    return W_l, W_next


@pytest.mark.parametrize("n,k,m", [(60, 8, 6), (30, 30, 20), (5, 9, 7)])
def test_gram_diagnostics_match_dense_n_by_n(n, k, m):
    W_l, W_next = _rand(n, k, seed=n), _rand(m, n, seed=n + 1)
    g = gram_diagnostics(W_l, W_next)
    A, B = W_next.T @ W_next, W_l @ W_l.T
    kappa = torch.linalg.matrix_norm(A @ B - B @ A) / (torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B))
    D = torch.linalg.matrix_norm(imbalance(W_l, W_next))
    assert g.commutator_ratio.item() == pytest.approx(kappa.item(), rel=1e-10)
    assert g.imbalance_norm.item() == pytest.approx(D.item(), rel=1e-10)
    rel = D / (torch.linalg.matrix_norm(A) + torch.linalg.matrix_norm(B))
    assert g.relative_imbalance.item() == pytest.approx(rel.item(), rel=1e-10)


def test_gram_diagnostics_tiny_kappa_and_balance_use_the_factored_forms():
    """Nearly balanced pair: W_next = W_l^T + 1e-9 E, so kappa and ||D|| are ~1e-9 of their scales."""
    W_l = _rand(40, 12, seed=1)
    E = _rand(12, 40, seed=2)
    W_next = W_l.T + 1e-9 * E
    g = gram_diagnostics(W_l[None], W_next[None])
    ref_kappa = _first_order_kappa(W_l, E, 1e-9)
    assert 0 < ref_kappa < 1e-7
    assert g.commutator_ratio.item() == pytest.approx(ref_kappa, rel=1e-6)
    assert commutator_ratio(W_l, W_next, method="trace").item() != pytest.approx(ref_kappa, rel=1e-2)  # cancels
    # first-order reference: D = W_next^T W_next - W_l W_l^T = 1e-9 (W_l E + E^T W_l^T) + O(1e-18)
    first_order = torch.linalg.matrix_norm(1e-9 * (W_l @ E + E.T @ W_l.T)).item()
    assert g.imbalance_norm.item() == pytest.approx(first_order, rel=1e-6)


def _first_order_kappa(W_l: torch.Tensor, E: torch.Tensor, delta: float) -> float:
    """kappa of (W_l, W_l^T + delta E) to first order in delta, with no cancellation (MATH.md §3): B = W_l W_l^T,
    A = B + delta S + O(delta^2), S = W_l E + E^T W_l^T, so [A, B] = delta [S, B] + O(delta^2)."""
    B, S = W_l @ W_l.T, W_l @ E + E.T @ W_l.T
    norm = torch.linalg.matrix_norm
    return (delta * norm(S @ B - B @ S) / norm(B).square()).item()


@pytest.mark.parametrize("n,k,m", [(50, 7, 9), (6, 20, 18)])
def test_commutator_baseline_from_grams_equals_dense_traces_and_spectra(n, k, m):
    """The Haar RMS of kappa from the smaller Gram of each side = from the dense n x n traces = from the spectra
    (``pair_values_from_svd``), bias-augmented (MATH.md §3)."""
    W_l, W_next, bias = _rand(n, k, seed=3), _rand(m, n, seed=4), _rand(n, seed=5)
    aug = torch.cat([W_l, bias[:, None]], dim=1)
    A, B = W_next.T @ W_next, aug @ aug.T
    dense = commutator_haar_rms(A.trace(), (A @ A).trace(), B.trace(), (B @ B).trace(), n).item()
    assert commutator_baseline(W_l, W_next, bias_l=bias).item() == pytest.approx(dense, rel=1e-12)
    spectral = pair_values_from_svd(aug, W_next, thin_svd(aug), thin_svd(W_next)).commutator_haar_rms.item()
    assert spectral == pytest.approx(dense, rel=1e-12)


def test_transport_scores_from_svd_in_any_orthonormal_coordinates():
    n, k, m = 40, 10, 12
    W_l, W_next = _spiked_pair(n, k, m, seed=5)
    U = torch.linalg.svd(W_l, full_matrices=True).U
    V = torch.linalg.svd(W_next, full_matrices=True).Vh.T
    T = (V.T @ U)[:4, :4]  # dense reference window
    sub, basis = transport_scores_from_svd(thin_svd(W_l)[0], thin_svd(W_next)[2], 4)
    assert sub.item() == pytest.approx((T.square().sum() / 4).item(), rel=1e-10)
    assert basis.item() == pytest.approx((torch.diagonal(T).square().sum() / 4).item(), rel=1e-10)
    X, Y = hidden_coordinates(W_l, W_next)  # 22-dim coordinates of the 40-dim hidden space
    assert X.shape == (k + m, k) and Y.shape == (m, k + m)
    sub_c, basis_c = transport_scores_from_svd(thin_svd(X)[0], thin_svd(Y)[2], 4)
    assert sub_c.item() == pytest.approx(sub.item(), rel=1e-10)
    assert basis_c.item() == pytest.approx(basis.item(), rel=1e-10)
    with pytest.raises(ValueError, match="k must be"):
        transport_scores_from_svd(thin_svd(W_l)[0], thin_svd(W_next)[2], 11)


def test_flags_in_reduced_coordinates_recover_the_embedded_permutation():
    """Complete 6-flags in relative position w embedded in R^40: the reduced 12-dim coordinates give the
    rank matrix r_ij = #{a <= i : w(a) <= j} (MATH.md §4) and the same result as the full-space call."""
    w = [3, 1, 6, 2, 5, 4]
    n, r = 40, len(w)
    H = torch.linalg.qr(_rand(n, r, seed=6)).Q
    s = 2.0 ** torch.arange(r, 0, -1, dtype=F64)
    inverse = [w.index(b + 1) for b in range(r)]  # v_b = h_{w^-1(b)}
    W_l, W_next = H * s, (H[:, inverse] * s).T
    full = flag_relative_position(W_l, W_next)
    X, Y = hidden_coordinates(W_l, W_next)
    assert X.shape[-2] == 2 * r
    U, s_l, _ = thin_svd(X)
    _, s_n, Vh = thin_svd(Y)
    reduced = flag_position_from_svd(U, s_l, Vh, s_n, n=n, rank_rtol=(default_rtol(W_l), default_rtol(W_next)))
    expected = rank_matrix_from_permutation(w)
    assert full.cuts_left == reduced.cuts_left == list(range(1, r + 1)) + [n]
    assert torch.equal(reduced.rank_matrix[:r, :r], expected)
    assert torch.equal(reduced.rank_matrix, full.rank_matrix)
    assert torch.allclose(reduced.soft_matrix, full.soft_matrix, rtol=1e-10, atol=1e-12)
    assert reduced.intersection_baseline == full.intersection_baseline == 0  # max(0, 2 * 6 - 40)
    with pytest.raises(ValueError, match="do not fit"):
        flag_position_from_svd(U, s_l, Vh[:, :5], s_n, n=n, rank_rtol=(1e-12, 1e-12))
    with pytest.raises(ValueError, match="^flag_position_from_svd: tau=2.0"):  # names the function called
        flag_position_from_svd(U, s_l, Vh, s_n, n=n, rank_rtol=(1e-12, 1e-12), tau=2.0)


def test_gl_kernel_dim_from_spectra_matches_the_direct_count():
    """range(W_l) (rank 5) meets ker(W_next) in exactly 2 dimensions."""
    H = torch.linalg.qr(_rand(30, 8, seed=7)).Q
    W_l = H[:, :5] @ _rand(5, 9, seed=8)
    W_next = _rand(6, 4, seed=9) @ torch.cat([H[:, 2:5], H[:, 5:6]], dim=1).T  # kills h_0, h_1 of range(W_l)
    svals = torch.linalg.svdvals
    direct = gl_invariant_kernel_dim(W_l, W_next)
    assert direct == 2
    assert gl_kernel_dim_from_spectra(svals(W_l), svals(W_next), svals(W_next @ W_l)) == 2
    rank = pair_values_from_svd(W_l, W_next, thin_svd(W_l), thin_svd(W_next)).product_rank
    assert gl_kernel_dim_from_product_rank(svals(W_l), int(rank)) == 2  # the product's kernel: svdvals decide
    assert pair_geometry_values(W_l[None], W_next[None], storage_eps=1e-7)[0][0]["gl_kernel_dim"] == 2.0
    with pytest.raises(ValueError, match="1-D"):
        gl_kernel_dim_from_spectra(svals(W_l), W_next, svals(W_next @ W_l))


@pytest.mark.parametrize("n,k,m", [(48, 8, 6), (20, 16, 12)])  # reduced coordinates (48 >= 1.5 * 14), and not
def test_pair_geometry_values_equal_the_separate_public_calls(n, k, m):
    W_l, W_next = _spiked_pair(n, k, m, seed=n)
    (values, details), = pair_geometry_values(W_l[None], W_next[None], storage_eps=1e-7)
    t = transport_k(n, k, m)
    sub, basis = transport_scores(W_l, W_next, t)
    flag = flag_relative_position(W_l, W_next, storage_eps=1e-7)
    c = flag.intersection_cut
    g = gram_diagnostics(W_l, W_next)
    expected = {
        "commutator_ratio": commutator_ratio(W_l, W_next).item(),
        "commutator_ratio_normalized": math.sqrt(2) * commutator_ratio(W_l, W_next).item(),
        "imbalance_norm": g.imbalance_norm.item(), "relative_imbalance": g.relative_imbalance.item(),
        "imbalance_diagonal_norm": imbalance_diagonal_norm(W_l, W_next).item(),
        "subspace_score": sub.item(), "basis_score": basis.item(), "flag_tau": flag.tau,
        "intersection_dim": float(flag.intersection_dim),
        # ranks at the storage cut of both weights (MATH.md §1, §4), counted by dense SVDs
        "gl_kernel_dim": float(gl_invariant_kernel_dim(W_l, W_next, rtol=product_rank_rtol(
            (default_rtol(W_l, 1e-7), default_rtol(W_next, 1e-7))))),
        "intersection_soft": float(flag.soft_matrix[flag.cuts_left.index(c), flag.cuts_right.index(c)]),
    }
    A, B = W_next.T @ W_next, W_l @ W_l.T  # dense n x n traces for the closed-form Haar RMS (MATH.md §3)
    expected["commutator_ratio_baseline"] = commutator_haar_rms(A.trace(), (A @ A).trace(), B.trace(),
                                                                (B @ B).trace(), n).item()
    for key, ref in expected.items():
        assert values[key] == pytest.approx(ref, rel=1e-10, abs=1e-13), key
    assert details["rank_matrix"] == flag.rank_matrix.tolist() and details["cuts_left"] == flag.cuts_left
    assert 0 < values["commutator_ratio_baseline"] < 1 / math.sqrt(2)


def test_pair_values_from_svd_equal_dense_n_by_n_forms():
    """kappa, ||D||, T and the product spectrum from the two thin SVDs against the n x n definitions, batched."""
    W_l = torch.stack([_spiked_pair(30, 7, 9, seed=s)[0] for s in (1, 2)])
    W_next = torch.stack([_spiked_pair(30, 7, 9, seed=s)[1] for s in (1, 2)])
    v = pair_values_from_svd(W_l, W_next, thin_svd(W_l), thin_svd(W_next))
    A, B = W_next.mT @ W_next, W_l @ W_l.mT
    norm = torch.linalg.matrix_norm
    assert torch.allclose(v.commutator_ratio, norm(A @ B - B @ A) / (norm(A) * norm(B)), rtol=1e-12, atol=0)
    assert torch.allclose(v.imbalance_norm, norm(A - B), rtol=1e-12, atol=0)
    assert torch.allclose(v.relative_imbalance, norm(A - B) / (norm(A) + norm(B)), rtol=1e-12, atol=0)
    s_c = torch.linalg.svdvals(W_next @ W_l)
    cut = PRODUCT_RANK_RTOL * torch.linalg.matrix_norm(W_l, ord=2) * torch.linalg.matrix_norm(W_next, ord=2)
    assert v.product_rank.tolist() == (s_c > cut[:, None]).sum(-1).tolist()
    diag = torch.diagonal(A - B, dim1=-2, dim2=-1)
    assert torch.allclose(v.imbalance_diagonal_norm, torch.linalg.vector_norm(diag, dim=-1), rtol=1e-12, atol=0)
    T = torch.linalg.svd(W_next, full_matrices=False).Vh @ torch.linalg.svd(W_l, full_matrices=False).U
    assert torch.allclose(v.transport.abs(), T.abs(), atol=1e-10)  # singular vectors up to sign
    with pytest.raises(ValueError, match="not thin SVDs"):
        pair_values_from_svd(W_l, W_next, thin_svd(W_next), thin_svd(W_l))


def test_product_rank_certificate_agrees_with_singular_values(monkeypatch):
    """product_rank: full rank certified by a shifted Cholesky without singular values; a kernel, a smallest
    singular value just above or just below the cut, and a zero matrix go to svdvals; every count equals the one
    the singular values give (MATH.md §4, the GL kernel dimension's cut)."""
    U, V = torch.linalg.qr(_rand(12, 12, seed=30)).Q, torch.linalg.qr(_rand(9, 9, seed=31)).Q
    cases = {"full": torch.logspace(0, -3, 9, dtype=F64), "kernel": torch.cat([torch.ones(6, dtype=F64),
             torch.zeros(3, dtype=F64)]), "above": torch.tensor([1.0] * 8 + [1.5e-8], dtype=F64),
             "below": torch.tensor([1.0] * 8 + [0.5e-8], dtype=F64), "zero": torch.zeros(9, dtype=F64)}
    M = torch.stack([U[:, :9] * s @ V.T for s in cases.values()])  # (5, 12, 9), sigma_1 = 1 except "zero"
    scale = torch.ones(5, dtype=F64)
    calls = []
    real = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda X: calls.append(X.shape[0]) or real(X))
    rank = product_rank(M, scale, rtol=PRODUCT_RANK_RTOL)
    assert rank.tolist() == [(real(m) > PRODUCT_RANK_RTOL).sum().item() for m in M] == [9, 6, 9, 8, 0]
    assert calls == [4]  # only the full-rank member was certified; the other four went to singular values
    calls.clear()
    assert product_rank(M[:1], scale[:1]).tolist() == [9] and calls == []


def test_pair_values_from_svd_tiny_kappa_uses_the_factored_form():
    W_l, E = _rand(40, 12, seed=1), _rand(12, 40, seed=2)
    W_next = W_l.T + 1e-9 * E
    v = pair_values_from_svd(W_l[None], W_next[None], thin_svd(W_l[None]), thin_svd(W_next[None]))
    assert v.commutator_ratio.item() == pytest.approx(_first_order_kappa(W_l, E, 1e-9), rel=1e-6)
