"""Tests of hf_flag.geometry.pairs against dense numpy references, closed forms, exact constructions (MATH §2-§4)."""
import math

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard
from scipy.stats import ortho_group

from hf_flag.geometry.pairs import (
    commutator_baseline,
    commutator_ratio,
    imbalance,
    imbalance_diagonal_norm,
    imbalance_norm,
    relative_imbalance,
    transport_matrix,
    transport_scores,
)

SHAPES = [(5, 4, 3), (200, 6, 5), (3, 7, 8), (40, 40, 40), (300, 2, 9)]  # (n, k, m): W_l n x k, W_next m x n


def _pair(n: int, k: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(m, n, generator=g, dtype=torch.float64)


def _dense_kappa(W_l: np.ndarray, W_next: np.ndarray) -> float:
    A, B = W_next.T @ W_next, W_l @ W_l.T
    return np.linalg.norm(A @ B - B @ A) / (np.linalg.norm(A) * np.linalg.norm(B))


def _orth(n: int, r: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(ortho_group.rvs(n, random_state=seed)[:, :r])


@pytest.mark.parametrize("n,k,m", SHAPES)
def test_commutator_methods_agree_with_dense_numpy(n, k, m):
    W_l, W_next = _pair(n, k, m, seed=n + k + m)
    ref = _dense_kappa(W_l.numpy(), W_next.numpy())
    assert 1e-3 < ref < 1 / math.sqrt(2)
    for method in ("trace", "factored", "direct", "auto"):
        assert commutator_ratio(W_l, W_next, method=method).item() == pytest.approx(ref, rel=1e-10), method


def test_bottcher_wenzel_equality_for_projectors_45_degrees_apart():
    n = 6
    u = torch.zeros(n, 1, dtype=torch.float64)
    u[0] = 1.0
    v = torch.zeros(1, n, dtype=torch.float64)
    v[0, :2] = 1 / math.sqrt(2)
    for method in ("trace", "factored", "direct", "auto"):
        assert commutator_ratio(u, v, method=method).item() == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    # and the bound holds on random pairs
    for seed in range(20):
        assert commutator_ratio(*_pair(7, 3, 2, seed)).item() <= 1 / math.sqrt(2) + 1e-15


def test_balanced_linear_pair_has_zero_commutator_and_zero_imbalance():
    n, r, k, m = 50, 4, 6, 5
    U, V1, V2 = _orth(n, r, 1), _orth(k, r, 2), _orth(m, r, 3)
    S = torch.diag(torch.tensor([3.0, 2.0, 1.5, 0.5], dtype=torch.float64))
    W_l, W_next = U @ S @ V1.T, V2 @ S @ U.T
    assert commutator_ratio(W_l, W_next).item() < 1e-14
    assert commutator_ratio(W_l, W_next, method="factored").item() < 1e-14
    assert relative_imbalance(W_l, W_next).item() < 1e-14
    assert torch.linalg.matrix_norm(imbalance(W_l, W_next)).item() < 1e-13
    # a generic pair with the same spectra is not balanced
    assert commutator_ratio(_orth(n, r, 4) @ S @ V1.T, W_next).item() > 1e-2


def _exact_tiny_pair(delta: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exactly representable pair with a known commutator: B = diag(1, 4, 0), A has a delta off-diagonal.

    [A, B]_ij = A_ij (B_jj - B_ii) -> entries +-3 delta; the hidden basis is rotated by Hadamard(16)/4, which is
    exactly orthogonal in floating point, and delta = 2^-33 keeps every entry exact.
    """
    n = 16
    Hd = torch.from_numpy(hadamard(n).astype(np.float64)) / 4.0
    W_l = torch.zeros(n, 2, dtype=torch.float64)
    W_l[0, 0], W_l[1, 1] = 1.0, 2.0
    W_next = torch.zeros(2, n, dtype=torch.float64)
    W_next[0, 0], W_next[0, 1], W_next[1, 2] = 1.0, delta, 1.0
    norm_A = math.sqrt(2 + 2 * delta**2 + delta**4)
    return Hd @ W_l, W_next @ Hd.T, 3 * math.sqrt(2) * delta / (norm_A * math.sqrt(17))


def test_tiny_kappa_is_accurate_in_auto_mode():
    W_l, W_next, exact = _exact_tiny_pair(2.0**-33)
    assert 5e-11 < exact < 1e-10
    assert commutator_ratio(W_l, W_next).item() == pytest.approx(exact, rel=1e-4)
    assert commutator_ratio(W_l, W_next, method="factored").item() == pytest.approx(exact, rel=1e-4)
    # batched auto mode refines only the tiny member
    W_big, W_next_big = _pair(16, 2, 2, seed=0)
    batch = commutator_ratio(torch.stack([W_l, W_big]), torch.stack([W_next, W_next_big]))
    assert batch[0].item() == pytest.approx(exact, rel=1e-4)
    assert batch[1].item() == pytest.approx(_dense_kappa(W_big.numpy(), W_next_big.numpy()), rel=1e-10)


def test_kappa_invariant_under_orthogonal_change_of_hidden_basis():
    W_l, W_next = _pair(30, 5, 4, seed=7)
    Q = torch.from_numpy(ortho_group.rvs(30, random_state=8))
    assert commutator_ratio(Q @ W_l, W_next @ Q.T).item() == pytest.approx(
        commutator_ratio(W_l, W_next).item(), rel=1e-12)
    assert relative_imbalance(Q @ W_l, W_next @ Q.T).item() == pytest.approx(
        relative_imbalance(W_l, W_next).item(), rel=1e-12)


@pytest.mark.parametrize("n,k,m", SHAPES)
def test_imbalance_norms_via_gram_factors_match_explicit(n, k, m):
    W_l, W_next = _pair(n, k, m, seed=3 * n + k)
    A, B = W_next.numpy().T @ W_next.numpy(), W_l.numpy() @ W_l.numpy().T
    D = A - B
    assert np.allclose(imbalance(W_l, W_next).numpy(), D, rtol=0, atol=1e-12 * np.abs(D).max())
    assert imbalance_norm(W_l, W_next).item() == pytest.approx(np.linalg.norm(D), rel=1e-10)
    assert relative_imbalance(W_l, W_next).item() == pytest.approx(
        np.linalg.norm(D) / (np.linalg.norm(A) + np.linalg.norm(B)), rel=1e-10)
    assert imbalance_diagonal_norm(W_l, W_next).item() == pytest.approx(np.linalg.norm(np.diag(D)), rel=1e-10)


def test_near_balanced_imbalance_uses_the_accurate_factored_path():
    """W_next = V2 S U^T + E with E tiny: D = U S V2^T E + E^T V2 S U^T + E^T E has no cancellation."""
    n, r = 64, 4
    U, V2 = _orth(n, r, 11), _orth(r, r, 12)
    S = torch.diag(torch.tensor([2.0, 1.5, 1.0, 0.75], dtype=torch.float64))
    W_l = U @ S
    E = 1e-7 * torch.randn(r, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W_next = V2 @ S @ U.T + E
    X = U @ S @ V2.T @ E
    D_ref = torch.linalg.matrix_norm(X + X.T + E.T @ E).item()
    assert D_ref < 1e-5
    assert imbalance_norm(W_l, W_next).item() == pytest.approx(D_ref, rel=1e-8)


def test_bias_augmentation():
    W_l, W_next = _pair(12, 5, 4, seed=21)
    b = torch.randn(12, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    aug = torch.cat([W_l, b[:, None]], dim=1)
    D_expected = W_next.T @ W_next - W_l @ W_l.T - torch.outer(b, b)
    assert torch.allclose(imbalance(W_l, W_next, bias_l=b), D_expected, rtol=0, atol=1e-12)
    for fn in (imbalance_norm, relative_imbalance, imbalance_diagonal_norm, commutator_ratio):
        assert fn(W_l, W_next, bias_l=b).item() == pytest.approx(fn(aug, W_next).item(), rel=1e-12), fn.__name__
    assert imbalance_diagonal_norm(W_l, W_next, bias_l=b).item() == pytest.approx(
        torch.linalg.vector_norm(torch.diagonal(D_expected)).item(), rel=1e-12)
    assert commutator_ratio(W_l, W_next, bias_l=b).item() != pytest.approx(commutator_ratio(W_l, W_next).item())


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_discrete_gd_one_step_imbalance_identity(activation):
    """MATH §2: D_{t+1} = (1-eta lam)^2 D_t - eta (1-eta lam)(E + E^T) + eta^2 (G2^T G2 - G1 G1^T)."""
    g = torch.Generator().manual_seed(5)
    k, n, m, N = 6, 9, 3, 40
    X, Y = torch.randn(N, k, generator=g, dtype=torch.float64), torch.randn(N, m, generator=g, dtype=torch.float64)
    W1 = torch.randn(n, k, generator=g, dtype=torch.float64).requires_grad_()
    W2 = torch.randn(m, n, generator=g, dtype=torch.float64).requires_grad_()
    act = torch.relu if activation == "relu" else (lambda t: t)
    loss = 0.5 * (act(X @ W1.T) @ W2.T - Y).square().sum() / N
    G1, G2 = torch.autograd.grad(loss, (W1, W2))
    W1, W2 = W1.detach(), W2.detach()
    eta, lam = 0.05, 0.1
    E = W2.T @ G2 - G1 @ W1.T
    predicted = ((1 - eta * lam) ** 2 * imbalance(W1, W2) - eta * (1 - eta * lam) * (E + E.T)
                 + eta**2 * (G2.T @ G2 - G1 @ G1.T))
    stepped = imbalance(W1 - eta * (G1 + lam * W1), W2 - eta * (G2 + lam * W2))
    assert torch.allclose(stepped, predicted, rtol=0, atol=1e-12 * stepped.abs().max().item())
    scale = (W2.norm() * G2.norm()).item()
    if activation == "identity":
        assert E.abs().max().item() < 1e-13 * scale  # linear nets: E = 0
    else:
        assert torch.diagonal(E).abs().max().item() < 1e-13 * scale  # ReLU: diag(E) = 0 (Du, Hu & Lee)
        assert E.abs().max().item() > 1e-3 * scale  # ... but E itself is not 0


def test_transport_scores_aligned_and_random():
    n, k = 20, 3
    U, V1, V2 = _orth(n, n, 31), _orth(6, 6, 32), _orth(5, 5, 33)
    W_l = U[:, :6] @ torch.diag(torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64)) @ V1.T
    W_next = V2 @ torch.diag(torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64)) @ U[:, :5].T
    sub, basis = transport_scores(W_l, W_next, k)
    assert sub.item() == pytest.approx(1.0, abs=1e-13) and basis.item() == pytest.approx(1.0, abs=1e-13)
    T = transport_matrix(W_l, W_next)
    assert T.shape == (5, 6)
    assert torch.allclose(T.abs(), torch.eye(5, 6, dtype=torch.float64), atol=1e-13)
    # Haar-random pairs: E[subspace] = k/n, E[basis] = 1/n (MATH §4)
    g = torch.Generator().manual_seed(34)
    draws = torch.stack(transport_scores(torch.randn(400, n, 6, generator=g, dtype=torch.float64),
                                         torch.randn(400, 5, n, generator=g, dtype=torch.float64), k), dim=1)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert abs(mean[0].item() - k / n) < 5 * se[0].item()
    assert abs(mean[1].item() - 1 / n) < 5 * se[1].item()


def _rms_of_rotated_kappas(W_l: torch.Tensor, W_next: torch.Tensor, samples: int) -> tuple[float, float]:
    """sqrt(mean kappa^2) over scipy's Haar rotations of W_l's hidden basis (dense kappa), and the standard error
    of the mean of kappa^2."""
    k2 = np.array([_dense_kappa(ortho_group.rvs(W_l.shape[0], random_state=s) @ W_l.numpy(), W_next.numpy()) ** 2
                   for s in range(samples)])
    return math.sqrt(k2.mean()), k2.std() / math.sqrt(samples)


def test_commutator_baseline_matches_full_haar_rotation_monte_carlo():
    n = 10
    W_l, W_next = _pair(n, 3, 4, seed=41)
    W_l = W_l * torch.tensor([5.0, 1.0, 0.2], dtype=torch.float64)  # unequal spectrum
    ours = commutator_baseline(W_l, W_next).item()
    rms, se = _rms_of_rotated_kappas(W_l, W_next, 2000)
    assert abs(ours ** 2 - rms ** 2) < 5 * se
    # balanced pairs: kappa = 0 but the null value is not
    U, S = _orth(n, 3, 43), torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert commutator_ratio(U @ S, S @ U.T).item() < 1e-12
    assert commutator_baseline(U @ S, S @ U.T).item() > 0.05


def test_batched_equals_loop():
    g = torch.Generator().manual_seed(51)
    W_l = torch.randn(2, 3, 30, 4, generator=g, dtype=torch.float64)
    W_next = torch.randn(2, 3, 5, 30, generator=g, dtype=torch.float64)
    for fn in (commutator_ratio, imbalance_norm, relative_imbalance, imbalance_diagonal_norm):
        batched = fn(W_l, W_next)
        assert batched.shape == (2, 3)
        loop = torch.stack([torch.stack([fn(W_l[i, j], W_next[i, j]) for j in range(3)]) for i in range(2)])
        assert torch.allclose(batched, loop, rtol=1e-12, atol=0), fn.__name__
    sub, basis = transport_scores(W_l, W_next, 2)
    assert sub.shape == (2, 3) and basis[1, 2].item() == pytest.approx(
        transport_scores(W_l[1, 2], W_next[1, 2], 2)[1].item(), rel=1e-12)


def test_float32_input_is_computed_in_float64():
    W_l, W_next = _pair(50, 6, 5, seed=61)
    ref = _dense_kappa(W_l.float().double().numpy(), W_next.float().double().numpy())
    out = commutator_ratio(W_l.float(), W_next.float())
    assert out.dtype == torch.float64 and out.item() == pytest.approx(ref, rel=1e-10)


def test_zero_matrices_give_zero_not_nan():
    W_l, W_next = _pair(8, 3, 2, seed=71)
    Z_l, Z_next = torch.zeros_like(W_l), torch.zeros_like(W_next)
    for method in ("auto", "trace", "factored", "direct"):
        assert commutator_ratio(Z_l, W_next, method=method).item() == 0.0
        assert commutator_ratio(W_l, Z_next, method=method).item() == 0.0
    assert relative_imbalance(Z_l, Z_next).item() == 0.0
    assert relative_imbalance(Z_l, W_next).item() == pytest.approx(1.0, rel=1e-12)  # D = A
    assert imbalance_norm(Z_l, Z_next).item() == 0.0


def test_bad_inputs_raise_value_error_naming_shapes():
    W_l, W_next = _pair(8, 3, 2, seed=81)
    with pytest.raises(ValueError, match=r"\(8, 3\).*\(2, 7\)"):
        commutator_ratio(W_l, W_next[:, :7])
    with pytest.raises(ValueError, match=r"\(8, 3\).*\(2, 7\)"):
        imbalance_norm(W_l, W_next[:, :7])
    bad = W_l.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        commutator_ratio(bad, W_next)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        relative_imbalance(bad, W_next)
    with pytest.raises(ValueError, match="bias_l"):
        imbalance(W_l, W_next, bias_l=torch.ones(3))
    with pytest.raises(ValueError, match="method"):
        commutator_ratio(W_l, W_next, method="svd")
    with pytest.raises(ValueError, match="k must be"):
        transport_scores(W_l, W_next, 3)
    with pytest.raises(ValueError, match="bias_l"):
        commutator_baseline(W_l, W_next, bias_l=torch.ones(3))
    with pytest.raises(ValueError, match="at least 2 dims|matrix"):
        commutator_ratio(W_l[0], W_next)
    with pytest.raises(ValueError, match="dtype=torch.int64"):
        commutator_ratio(W_l, W_next, dtype=torch.int64)
    with pytest.raises(ValueError, match="bias_l .* complex"):
        imbalance_norm(W_l, W_next, bias_l=torch.ones(8, dtype=torch.complex128))


def test_small_hidden_dim_uses_n_by_n_form_with_same_values():
    """Per-head V -> O pairs have n (head_dim) below both outer dims: auto kappa, the imbalance norms and the
    baseline go through the n x n form; values equal the Gram-factor forms and a dense Monte Carlo."""
    from hf_flag.geometry.pairs import gram_diagnostics

    n = 6
    W_l, W_next = _pair(n, 20, 18, seed=61)
    W_l = W_l * torch.linspace(0.2, 3.0, 20, dtype=torch.float64)
    assert commutator_ratio(W_l, W_next).item() == pytest.approx(
        commutator_ratio(W_l, W_next, method="trace").item(), rel=1e-10)
    g = gram_diagnostics(W_l, W_next)
    D = (W_next.T @ W_next - W_l @ W_l.T).numpy()
    assert g.imbalance_norm.item() == pytest.approx(np.linalg.norm(D), rel=1e-12)
    A, B = (W_next.T @ W_next).numpy(), (W_l @ W_l.T).numpy()
    assert g.relative_imbalance.item() == pytest.approx(
        np.linalg.norm(D) / (np.linalg.norm(A) + np.linalg.norm(B)), rel=1e-12)
    assert g.commutator_ratio.item() == pytest.approx(_dense_kappa(W_l.numpy(), W_next.numpy()), rel=1e-12)
    rms, se = _rms_of_rotated_kappas(W_l, W_next, 2000)
    assert abs(commutator_baseline(W_l, W_next).item() ** 2 - rms ** 2) < 5 * se
