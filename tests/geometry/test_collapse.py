"""Tests of hf_flag.geometry.collapse: exact simplex ETF, ETF + noise closed form, constructed separator (MATH §5)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from hf_flag.geometry.collapse import classifier_collapse, level2_alignment, level3_alignment, neural_collapse
from hf_flag.geometry.pairs import commutator_ratio

C, P = 4, 10


def _etf_means(C: int, p: int, seed: int) -> torch.Tensor:
    """Unit-norm simplex ETF, rows (C, p): M^T M = C/(C-1) (I - 11^T/C), embedded by a random isometry."""
    E = math.sqrt(C / (C - 1)) * (np.eye(C) - 1.0 / C)
    return torch.from_numpy(E @ ortho_group.rvs(p, random_state=seed)[:C])


def _samples(means: torch.Tensor, per_class: int, noise: float, seed: int, offset: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(means.shape[0]).repeat_interleave(per_class)
    mu_G = offset * torch.ones(means.shape[1], dtype=torch.float64)
    feats = mu_G + means[labels] + noise * torch.randn(len(labels), means.shape[1], generator=g, dtype=torch.float64)
    return feats, labels, mu_G


def test_exact_simplex_etf_gives_perfect_collapse():
    M = _etf_means(C, P, seed=0)
    feats, labels, mu_G = _samples(M, per_class=5, noise=0.0, seed=0)
    out = neural_collapse(feats, labels, classifier=2.0 * M, classifier_bias=-2.0 * M @ mu_G)
    for key in ("nc1_covariance_pinv", "nc1_covariance_ratio", "nc1_variability_cdnv", "nc2_mean_norms_cv",
                "nc2_interference_std", "nc2_interference_error", "nc2_simplex_etf_error",
                "nc2_classifier_norms_cv", "nc2_classifier_interference_std", "nc2_classifier_interference_error",
                "nc2_classifier_etf_error", "nc3_self_duality", "nc3_self_duality_error"):
        assert abs(out[key]) < 1e-12, key
    assert out["nc4_clf_ncc_agreement"] == 1.0
    lvl2, lvl3 = level2_alignment(2.0 * M, M), level3_alignment(2.0 * M, M)
    assert lvl2["level2_subspace_error"] < 1e-14 and lvl2["level2_max_angle"] < 1e-13
    assert lvl3["nc3_self_duality"] < 1e-14 and lvl3["kappa"] < 1e-13


def test_etf_plus_isotropic_noise_nc1_closed_form():
    s = 0.3
    M = _etf_means(C, P, seed=1)
    feats, labels, _ = _samples(M, per_class=2000, noise=s, seed=1)
    out = neural_collapse(feats, labels)
    assert out["nc1_covariance_pinv"] == pytest.approx(s**2 * (C - 1) ** 2 / C, rel=0.04)
    # dense references (p x p pseudo-inverse, explicit loops) for the same sample
    X, y = feats.numpy(), labels.numpy()
    means = np.stack([X[y == c].mean(0) for c in range(C)])
    Mc = means - X.mean(0)
    Z = X - means[y]
    Sw, Sb = Z.T @ Z / len(X), Mc.T @ Mc / C
    assert out["nc1_covariance_pinv"] == pytest.approx(np.trace(Sw @ np.linalg.pinv(Sb)) / C, rel=1e-8)
    assert out["nc1_covariance_ratio"] == pytest.approx(np.trace(Sw) / np.trace(Sb), rel=1e-10)
    V = np.array([(Z[y == c] ** 2).sum(1).mean() for c in range(C)])
    cdnv = np.mean([(V[a] + V[b]) / 2 / np.sum((means[a] - means[b]) ** 2)
                    for a in range(C) for b in range(a + 1, C)])
    assert out["nc1_variability_cdnv"] == pytest.approx(cdnv, rel=1e-10)
    norms = np.linalg.norm(Mc, axis=1)
    assert out["nc2_mean_norms_cv"] == pytest.approx(norms.std() / norms.mean(), rel=1e-10)
    cos = [Mc[a] @ Mc[b] / (norms[a] * norms[b]) for a in range(C) for b in range(a + 1, C)]
    assert out["nc2_interference_std"] == pytest.approx(np.std(cos), rel=1e-10)
    assert out["nc2_interference_error"] == pytest.approx(np.mean(np.abs(np.array(cos) + 1 / (C - 1))), rel=1e-10)


def test_nc4_agreement_and_classifier_metrics_against_loops():
    g = torch.Generator().manual_seed(2)
    means = torch.randn(C, P, generator=g, dtype=torch.float64)
    feats, labels, _ = _samples(means, per_class=50, noise=1.0, seed=2, offset=0.0)
    W = means + 0.8 * torch.randn(C, P, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    out = neural_collapse(feats, labels, W, classifier_bias=b)
    X, y, Wn, bn = feats.numpy(), labels.numpy(), W.numpy(), b.numpy()
    mu = np.stack([X[y == c].mean(0) for c in range(C)])
    agree = np.mean([np.argmax(Wn @ x + bn) == np.argmin(((mu - x) ** 2).sum(1)) for x in X])
    assert 0.3 < agree < 1.0
    assert out["nc4_clf_ncc_agreement"] == pytest.approx(agree, abs=1e-15)
    Mc = mu - X.mean(0)
    assert out["nc3_self_duality"] == pytest.approx(
        np.sum((Wn / np.linalg.norm(Wn) - Mc / np.linalg.norm(Mc)) ** 2), rel=1e-10)
    G = Wn @ Mc.T
    ideal = (np.eye(C) - 1 / C) / math.sqrt(C - 1)
    assert out["nc3_self_duality_error"] == pytest.approx(np.linalg.norm(G / np.linalg.norm(G) - ideal), rel=1e-10)
    weight_only = classifier_collapse(W)
    assert {k: out[k] for k in weight_only} == weight_only
    norms = np.linalg.norm(Wn, axis=1)
    assert weight_only["nc2_classifier_norms_cv"] == pytest.approx(norms.std() / norms.mean(), rel=1e-10)
    assert weight_only["nc2_classifier_etf_error"] == pytest.approx(
        np.linalg.norm(Wn @ Wn.T / np.linalg.norm(Wn @ Wn.T) - ideal), rel=1e-10)


def _rotation_in_span(M: torch.Tensor, Q: np.ndarray) -> torch.Tensor:
    """W with W^T = R M^T, R = U Q U^T + (I - U U^T): M rotated inside its own span (U: basis of span(M))."""
    U = np.linalg.svd(M.numpy().T, full_matrices=False)[0][:, : Q.shape[0]]
    R = U @ Q @ U.T + np.eye(M.shape[1]) - U @ U.T
    return torch.from_numpy((R @ M.numpy().T).T)


def test_constructed_separator_level2_but_not_level3():
    """MATH §5: W = M rotated inside span(M): Level-2 angle ~5e-15, kappa = 0, NC3 = 2 - 2 tr(Q)/(C-1) for an ETF.

    The paper's NC3 = 2.33 is this closed form with tr(Q)/(C-1) = -0.165; for C = 4 a rotation by
    theta = arccos(-0.7475) about one axis of the 3-dim span gives exactly that.
    """
    M = _etf_means(C, P, seed=3)
    theta = math.acos(-0.7475)
    Q = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    W = _rotation_in_span(M, Q)
    lvl2, lvl3 = level2_alignment(W, M), level3_alignment(W, M)
    assert lvl2["level2_max_angle"] < 1e-13 and lvl2["level2_subspace_error"] < 1e-14
    assert lvl3["nc3_self_duality"] == pytest.approx(2.33, abs=1e-12)
    assert lvl3["kappa"] < 1e-13
    assert commutator_ratio(M.T, W).item() < 1e-13  # the pair (W_l = M, W_next = W) of MATH §3
    for seed in range(3):  # the closed form for Haar-random rotations of the span
        Qr = ortho_group.rvs(C - 1, random_state=10 + seed)
        assert level3_alignment(_rotation_in_span(M, Qr), M)["nc3_self_duality"] == pytest.approx(
            2 - 2 * np.trace(Qr) / (C - 1), abs=1e-12)


def test_level3_basis_score_with_distinct_class_spread():
    """Non-degenerate means: W = M^T scores 1; M rotated inside its span stays Level-2 but loses basis score."""
    g = torch.Generator().manual_seed(4)
    means = torch.randn(C, P, generator=g, dtype=torch.float64) * torch.tensor([4.0, 2.0, 1.0, 0.5])[:, None]
    Mc = means - means.mean(0)
    aligned = level3_alignment(Mc, means)
    assert aligned["level3_basis_score"] == pytest.approx(1.0, abs=1e-12)
    assert aligned["level3_subspace_score"] == pytest.approx(1.0, abs=1e-12)
    assert aligned["kappa"] < 1e-12
    rotated = _rotation_in_span(Mc, ortho_group.rvs(C - 1, random_state=5))
    r3 = level3_alignment(rotated, means)
    assert r3["level3_subspace_score"] == pytest.approx(1.0, abs=1e-12)
    assert r3["level3_basis_score"] < 0.9 and r3["kappa"] > 1e-3
    assert level2_alignment(rotated, means)["level2_max_angle"] < 1e-13
    generic = level2_alignment(torch.randn(C, P, generator=g, dtype=torch.float64), means)
    assert generic["level2_max_angle"] > 0.1 and 0 < generic["level2_subspace_error"] < 1


def test_class_means_against_a_loop_and_their_errors():
    from hf_flag.geometry.collapse import class_means

    g = torch.Generator().manual_seed(9)
    H = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2, 2] * 4 + [1, 0, 1])  # unbalanced classes
    loop = torch.stack([H[y == c].mean(0) for c in range(3)])
    assert torch.allclose(class_means(H, y), loop, rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="class 3 has no sample"):
        class_means(H, y, n_classes=4)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        class_means(H, y.double())


def test_bad_inputs_raise_value_error():
    M = _etf_means(C, P, seed=6)
    feats, labels, _ = _samples(M, per_class=3, noise=0.1, seed=6)
    bad = feats.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        neural_collapse(bad, labels)
    with pytest.raises(ValueError, match=r"labels.*\(12,\)"):
        neural_collapse(feats, labels[:-1])
    with pytest.raises(ValueError, match="labels"):
        neural_collapse(feats, labels.double())
    with pytest.raises(ValueError, match="class 4 has no sample"):
        neural_collapse(feats, labels, n_classes=5)
    with pytest.raises(ValueError, match=r"classifier.*\(4, 9\)"):
        neural_collapse(feats, labels, classifier=M[:, :9])
    with pytest.raises(ValueError, match=r"C = 4"):
        neural_collapse(feats, labels, classifier=M[:3])
    with pytest.raises(ValueError, match="classifier_bias"):
        neural_collapse(feats, labels, classifier=M, classifier_bias=torch.ones(3))
    with pytest.raises(ValueError, match="zero row"):
        classifier_collapse(torch.cat([M[:3], torch.zeros(1, P, dtype=torch.float64)]))
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(3, 10\)"):
        level2_alignment(M, M[:3])
    with pytest.raises(ValueError, match=r"features \(0, 10\) has no samples"):
        neural_collapse(feats[:0], labels[:0])
    with pytest.raises(ValueError, match="n_classes=4.0"):
        neural_collapse(feats, labels, n_classes=4.0)
    with pytest.raises(ValueError, match="global_mean .* got list"):
        level2_alignment(M, M, global_mean=[0.0] * P)
    with pytest.raises(ValueError, match=r"global_mean .* got \(9,\)"):
        level3_alignment(M, M, global_mean=torch.zeros(9))
    with pytest.raises(ValueError, match="dtype"):
        neural_collapse(feats, labels, dtype=torch.int32)
