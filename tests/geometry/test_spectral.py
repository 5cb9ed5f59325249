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
                                       transport_window, wedin_bounds, wedin_window)

F64, F32 = torch.float64, torch.float32
BF16_EPS = torch.finfo(torch.bfloat16).eps



def residuals_by_hand(A, U, s, Vh):
    """``sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2) / s_1`` per triplet, written out with plain torch
    (an independent reference for the certificate)."""
    out = []
    for i in range(s.shape[-1]):
        u, v = U[:, i], Vh[i]
        out.append(torch.sqrt(torch.sum((A @ v - s[i] * u) ** 2) + torch.sum((A.T @ u - s[i] * v) ** 2)) / s[0])
    return torch.stack(out)

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
    again = residuals_by_hand(A, p.U.double(), p.s.double(), p.Vh.double())
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


def spiked_pair(n: int, k: int, m: int, seed: int, shared: int = 3):
    """``W_l`` (n x k) and ``W_next`` (m x n): Gaussian bulks plus 6 separated spikes each, ``shared`` of them on
    common hidden directions (so flags and transport have real entries), the others on random directions."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, 12 - shared, generator=g, dtype=F64)).Q
    left, right = Q[:, :6], torch.cat([Q[:, :shared], Q[:, 6:12 - shared]], dim=1)
    spikes = torch.tensor([40.0, 30.0, 22.0, 16.0, 11.0, 7.0], dtype=F64)
    W_l = torch.randn(n, k, generator=g, dtype=F64) / math.sqrt(n) + \
        (left * spikes) @ torch.linalg.qr(torch.randn(k, 6, generator=g, dtype=F64)).Q.T
    W_next = torch.randn(m, n, generator=g, dtype=F64) / math.sqrt(n) + \
        torch.linalg.qr(torch.randn(m, 6, generator=g, dtype=F64)).Q @ (right * spikes).T
    return W_l[None], W_next[None]


WINDOW_KEYS = ("window_in", "window_out", "svd_residual_in", "svd_residual_out")


@pytest.mark.parametrize("storage_eps", [torch.finfo(torch.float16).eps, torch.finfo(F32).eps])
def test_window_values_agree_with_the_full_svd_values(storage_eps):
    W_l, W_next = spiked_pair(700, 300, 260, seed=11)
    (full, full_details), = pair_geometry_values(W_l, W_next, storage_eps=storage_eps)
    svds = [partial_svd(W, K_MAX + 1, dtype=F64, storage_eps=storage_eps) for W in (W_l, W_next)]
    (window, details), = pair_window_values(W_l, W_next, storage_eps=storage_eps, dtype=F64, svd_l=svds[0],
                                            svd_next=svds[1])
    for key in ("commutator_ratio", "commutator_ratio_normalized", "commutator_ratio_baseline", "imbalance_norm",
                "relative_imbalance", "imbalance_diagonal_norm"):  # exact in both
        assert window[key] == pytest.approx(full[key], rel=1e-10), key
    assert window["gl_kernel_dim"] is None and all(window[k] is not None for k in WINDOW_KEYS)
    # the six spikes: fp16 determines the cuts between them (gaps >= 4; 0.577 * 2^-10 * 40 / 0.1 = 0.23 needed)
    # and the one into the bulk (5.5), none inside the bulk; float32 determines every cut: the window is the cap
    if storage_eps == torch.finfo(torch.float16).eps:
        assert window["window_in"] == window["window_out"] == 6
    else:
        assert window["window_in"] == window["window_out"] == K_MAX
    assert max(window["svd_residual_in"], window["svd_residual_out"]) <= max(storage_eps / 100, 1e-12)
    if storage_eps == torch.finfo(torch.float16).eps:
        # the window holds every flag cut, so cuts, rank and soft matrices and tau are today's
        for key in ("cuts_left", "cuts_right", "rank_matrix", "permutation", "is_permutation", "intersection_cut"):
            assert details[key] == full_details[key], key
        for key in ("intersection_dim", "intersection_dim_baseline", "flag_tau"):
            assert window[key] == pytest.approx(full[key], rel=1e-10, abs=1e-12), key
        assert window["intersection_soft"] == pytest.approx(full["intersection_soft"], abs=1e-9)
        assert full_details["cuts_left"][:3] == [1, 2, 3]  # today's flags have cuts: there is something to agree on
    else:  # capped window: flags cut at 1..K_MAX only (today's also cut at the rank, 300); the spikes agree
        assert set(details["cuts_left"]) <= set(range(1, K_MAX + 1)) | {700}
    at3 = [d["rank_matrix"][d["cuts_left"].index(3)][d["cuts_right"].index(3)] for d in (details, full_details)]
    assert at3[0] == at3[1]
    # transport on the window: today's transport matrix read at the window's k
    k = details["transport_k"]
    svd_l, svd_next = thin_svd(W_l), thin_svd(W_next)
    T_full = svd_next[2] @ svd_l[0]
    subspace, basis = transport_scores_from_matrix(T_full, k)
    assert window["subspace_score"] == pytest.approx(float(subspace), abs=1e-9)
    if window["basis_score"] is not None:
        assert window["basis_score"] == pytest.approx(float(basis), abs=1e-9)


def test_window_is_empty_when_the_storage_determines_nothing():
    g = torch.Generator().manual_seed(2)
    W_l = torch.randn(1, 600, 250, generator=g, dtype=F64)  # pure bulk: no gap reaches 0.36 sigma_1 at 4 bits
    W_next = torch.randn(1, 240, 600, generator=g, dtype=F64)
    svds = [partial_svd(W, K_MAX + 1, dtype=F64, storage_eps=2.0 ** -4) for W in (W_l, W_next)]
    (values, details), = pair_window_values(W_l, W_next, storage_eps=2.0 ** -4, dtype=F64, svd_l=svds[0],
                                            svd_next=svds[1])
    assert values["window_in"] == values["window_out"] == 0 and details["transport_k"] == 0
    assert values["subspace_score"] is None and values["basis_score"] is None
    assert values["intersection_dim"] is None and details["cuts_left"] == [600]
    full = gram_pair_values(W_l, W_next, dtype=F64)
    assert values["commutator_ratio"] == pytest.approx(float(full.commutator_ratio[0]), rel=1e-12)


def bf16_rounded(W: torch.Tensor) -> torch.Tensor:
    return W.to(torch.bfloat16).to(F64)


def test_float32_values_agree_with_float64_within_the_bf16_tolerance():
    """Each value kind, computed in float32 from bf16-stored weights, against its float64 computation on the same
    (rounded) weights: within eps_bf16 (absolute for values in [0, 1], relative for norms); rank matrices equal."""
    W_l, W_next = (bf16_rounded(W) for W in spiked_pair(700, 300, 260, seed=12))
    rows = {}
    for dtype in (F32, F64):
        svds = [partial_svd(W, K_MAX + 1, dtype=dtype, storage_eps=BF16_EPS) for W in (W_l, W_next)]
        rows[dtype] = pair_window_values(W_l.to(dtype), W_next.to(dtype), storage_eps=BF16_EPS, dtype=dtype,
                                         svd_l=svds[0], svd_next=svds[1])[0]
    (v32, d32), (v64, d64) = rows[F32], rows[F64]
    for key in ("commutator_ratio", "commutator_ratio_baseline", "relative_imbalance", "subspace_score",
                "basis_score", "intersection_soft"):
        assert v32[key] == pytest.approx(v64[key], abs=BF16_EPS), key
    for key in ("imbalance_norm", "imbalance_diagonal_norm"):
        assert v32[key] == pytest.approx(v64[key], rel=BF16_EPS), key
    assert v32["flag_tau"] == pytest.approx(v64["flag_tau"], rel=BF16_EPS)
    for key in ("rank_matrix", "cuts_left", "cuts_right"):
        assert d32[key] == d64[key], key
    assert v32["window_in"] == v64["window_in"]


def test_near_balanced_kappa_in_float32_matches_float64():
    """kappa ~ 1e-6 (MATH.md §3: the trace form cancels; the factored form takes over): float32 Grams from bf16
    storage give kappa within eps_bf16 of float64, and within 1e-3 relative of the exact value."""
    g = torch.Generator().manual_seed(4)
    n, k = 500, 200
    U = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64)).Q
    s = torch.linspace(3, 1, k, dtype=F64)
    W_l = (U * s) @ V.T  # W_l W_l^T = U S^2 U^T
    W_next = (V * s) @ U.T  # W_next^T W_next = U S^2 U^T: balanced, kappa = 0
    W_next = W_next + 1e-6 * torch.randn(k, n, generator=g, dtype=F64)
    W_l, W_next = bf16_rounded(W_l)[None], bf16_rounded(W_next)[None]
    exact = gram_pair_values(W_l, W_next, dtype=F64).commutator_ratio
    from hf_flag.geometry.pairs import commutator_ratio
    direct = commutator_ratio(W_l, W_next, method="direct")
    assert float(exact) == pytest.approx(float(direct), rel=1e-6)
    assert float(exact) < 1e-2
    low = gram_pair_values(W_l.float(), W_next.float(), dtype=gram_dtype(BF16_EPS, F32)).commutator_ratio
    assert abs(float(low) - float(exact)) <= BF16_EPS
    assert float(low) == pytest.approx(float(exact), rel=1e-3)


def test_tiny_angles_in_float32_count_as_float64():
    """Shared directions tilted by 1e-4 rad (far below tau): the rank matrix counts them in float32 as in
    float64 (cosines, MATH.md §1), from fp16-rounded weights (bf16 storage determines no flag cut here)."""
    eps = torch.finfo(torch.float16).eps
    g = torch.Generator().manual_seed(9)
    n = 400
    Q = torch.linalg.qr(torch.randn(n, 8, generator=g, dtype=F64)).Q
    tilted = Q[:, :4] * math.cos(1e-4) + Q[:, 4:] * math.sin(1e-4)
    spikes = torch.tensor([40.0, 30.0, 20.0, 10.0], dtype=F64)
    bulk = lambda r, c: 1e-3 * torch.randn(r, c, generator=g, dtype=F64) / math.sqrt(n)  # noqa: E731
    W_l = bulk(n, 150) + (Q[:, :4] * spikes) @ torch.linalg.qr(torch.randn(150, 4, generator=g, dtype=F64)).Q.T
    W_next = bulk(140, n) + torch.linalg.qr(torch.randn(140, 4, generator=g, dtype=F64)).Q @ (tilted * spikes).T
    W_l, W_next = W_l.half().double()[None], W_next.half().double()[None]
    out = {}
    for dtype in (F32, F64):
        svds = [partial_svd(W, K_MAX + 1, dtype=dtype, storage_eps=eps) for W in (W_l, W_next)]
        out[dtype] = pair_window_values(W_l.to(dtype), W_next.to(dtype), storage_eps=eps, dtype=dtype,
                                        svd_l=svds[0], svd_next=svds[1])[0]
    assert out[F32][1]["rank_matrix"] == out[F64][1]["rank_matrix"]
    assert out[F64][1]["cuts_left"][:4] == [1, 2, 3, 4] and out[F64][1]["rank_matrix"][3][3] == 4
    assert out[F32][0]["subspace_score"] == pytest.approx(out[F64][0]["subspace_score"], abs=eps)


def test_shared_grams_give_the_same_pair_values():
    """gram_pair_values with precomputed Grams (weight_gram on the sides pair_gram_sides names) equals the values
    it computes itself, on both paths (hidden dim large: Gram factors; small: n x n), against the direct form."""
    from hf_flag.geometry.pairs import commutator_ratio, pair_gram_sides, weight_gram

    g = torch.Generator().manual_seed(21)
    for n, k, m in ((90, 30, 20), (20, 60, 50)):  # n large (Gram factors), n small (direct)
        W_l = torch.randn(2, n, k, generator=g, dtype=F64)
        W_next = torch.randn(2, m, n, generator=g, dtype=F64)
        sides = pair_gram_sides(W_l, W_next)
        assert sides == (("cols", "rows") if n == 90 else ("rows", "cols"))
        shared = gram_pair_values(W_l, W_next, dtype=F64, gram_l=weight_gram(W_l, sides[0], dtype=F64),
                                  gram_next=weight_gram(W_next, sides[1], dtype=F64))
        alone = gram_pair_values(W_l, W_next, dtype=F64)
        for a, b in zip(shared, alone):
            assert torch.allclose(a, b, rtol=1e-12)
        assert torch.allclose(shared.commutator_ratio, commutator_ratio(W_l, W_next, method="direct"), rtol=1e-9)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("small", [200, 120])
def test_partial_svd_small_gram_route_matches_the_thin_svd(dtype, small):
    """k = 65 of a 600 x 200 matrix (the Krylov basis would pass half of 200) or of a 600 x 120 one (more than half
    the spectrum, not all of it): eigenvectors of the small Gram; leading values, subspaces at the separated cuts
    and the certificate against the dense thin SVD."""
    s = torch.cat([torch.tensor([30.0, 20.0, 12.0, 8.0], dtype=F64), torch.linspace(3, 0.5, small - 4, dtype=F64)])
    A = with_spectrum(600, small, s, seed=8)
    p = partial_svd(A.to(dtype), 65, dtype=dtype)
    assert not p.exhausted and p.U.shape == (600, 65) and p.Vh.shape == (65, small)
    eps = torch.finfo(dtype).eps
    assert torch.max((p.s.double() - s[:65]).abs()) <= 100 * eps * s[0]
    U, _, Vh = thin_svd(A)
    for k in (1, 2, 3, 4):
        assert top_subspace_sin(p.U[:, :k], U[:, :k]) <= 1e3 * eps
        assert top_subspace_sin(p.Vh[:k].mT, Vh[:k].mT) <= 1e3 * eps
    again = residuals_by_hand(A, p.U.double(), p.s.double(), p.Vh.double())
    assert torch.allclose(again[:4], p.residuals[:4].double(), atol=50 * eps)
    assert float(p.residuals[:4].max()) <= 1e3 * eps


def reference_window(A: torch.Tensor, storage_eps: float):
    """Float64 thin SVD of ``A`` (2-D) and the window its exact leading values give (the old code's rule on exact
    values): the independent reference of the routes below."""
    U, s, Vh = thin_svd(A.double())
    return U, s, Vh, int(wedin_window(s[: K_MAX + 1], storage_eps=storage_eps, exhausted=False))


SPIKES = [40.0, 30.0, 22.0, 16.0, 11.0, 7.0]


@pytest.mark.parametrize("route", ["dense", "krylov"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("storage_eps,window", [(torch.finfo(torch.float16).eps, 6), (2.0 ** -4, 0)])
def test_window_triplets_match_the_float64_svd(monkeypatch, route, shared, dtype, storage_eps, window):
    """Six separated spikes over a Gaussian bulk: fp16 storage determines the cuts between them and into the bulk
    (window 6), 4-bit storage none (window 0).  Each route (the small Gram's eigenvectors; block Krylov on X or on
    the shared Gram), in float64 and float32: the window of the float64 SVD, vectors for its w + 1 triplets only,
    values within their residuals, each determined top-i subspace within ``residual / gap_i`` of the exact one (the
    certificate bounds the true error), and the certificate equal to the residuals recomputed by hand."""
    import hf_flag.geometry.spectral as spectral

    if route == "krylov":  # 500 is below the dense threshold: lower it so the Krylov route runs at this size
        monkeypatch.setattr(spectral, "DENSE_GRAM_MAX", 100)
    for rows, cols in ((1300, 500), (500, 1300)):
        A = spiked_bulk(rows, cols, SPIKES, seed=rows)
        U_ref, s_ref, Vh_ref, w_ref = reference_window(A, storage_eps)
        assert w_ref == window
        X = A.to(dtype)
        gram = (X @ X.mT if rows <= cols else X.mT @ X) if shared else None
        p = partial_svd(X, K_MAX + 1, dtype=dtype, storage_eps=storage_eps, gram=gram)
        assert p.s.shape == (K_MAX + 1,) and p.U.shape == (rows, window + 1) and p.Vh.shape == (window + 1, cols)
        w = int(wedin_window(p.s, storage_eps=storage_eps, exhausted=False))
        assert w == window
        eps = torch.finfo(dtype).eps
        again = residuals_by_hand(A, p.U.double(), p.s[: w + 1].double(), p.Vh.double())
        assert torch.allclose(again, p.residuals.double(), atol=50 * eps)
        cert = float(p.certificate(torch.tensor(w)))
        assert cert <= max(storage_eps / 100, 4 * math.sqrt(cols) * eps)
        assert bool(p.gap_known(torch.tensor(w)))
        s1 = float(s_ref[0])
        bound = (p.residuals.double() + 50 * eps) * s1  # |s_i - sigma_i| <= residual_i (Weyl on the Jordan form)
        assert torch.all((p.s[: w + 1].double() - s_ref[: w + 1]).abs() <= bound)
        for i in range(1, w + 1):  # Wedin: sin theta_i <= residual / gap_i
            gap = float(s_ref[i - 1] - s_ref[i])
            limit = 2 * (cert + 50 * eps) * s1 / gap
            assert top_subspace_sin(p.U[:, :i], U_ref[:, :i]) <= limit
            assert top_subspace_sin(p.Vh[:i].mT, Vh_ref[:i].mT) <= limit


@pytest.mark.parametrize("route", ["dense", "krylov"])
def test_partial_svd_with_the_shared_gram_equals_it_without(monkeypatch, route):
    """The same window, values and window subspaces with ``gram`` as without (the Krylov route iterates on the
    Gram instead of ``X (X^T .)``; the dense route diagonalises the given Gram), batched over two members whose
    windows differ (6 and 1: both get 7 triplets)."""
    import hf_flag.geometry.spectral as spectral
    from hf_flag.analysis.pairs import small_gram_side, window_svd
    from hf_flag.geometry.pairs import weight_gram

    if route == "krylov":
        monkeypatch.setattr(spectral, "DENSE_GRAM_MAX", 100)
    eps = torch.finfo(torch.float16).eps
    A = torch.stack([spiked_bulk(400, 1000, SPIKES, seed=4), spiked_bulk(400, 1000, [40.0], seed=3)])
    assert small_gram_side(A) == "rows" and small_gram_side(A.mT) == "cols"
    alone = window_svd(A, eps)
    shared = window_svd(A, eps, gram=weight_gram(A, small_gram_side(A), dtype=F64))
    for p in (alone, shared):
        assert wedin_window(p.s, storage_eps=eps, exhausted=False).tolist() == [6, 1]
        assert p.U.shape == (2, 400, 7) and p.residuals.shape == (2, 7)
    for i, w in enumerate((6, 1)):  # values of the window and the one closing it; the window's subspaces
        assert torch.allclose(alone.s[i, : w + 1], shared.s[i, : w + 1], rtol=0, atol=1e-6 * 40)
        assert top_subspace_sin(alone.U[i, :, :w], shared.U[i, :, :w]) <= 1e-6
        assert top_subspace_sin(alone.Vh[i, :w].mT, shared.Vh[i, :w].mT) <= 1e-6


def test_certificate_refuses_a_window_past_the_computed_vectors():
    """Vectors computed for 4-bit storage (window 0: one triplet) cannot serve the fp16 window (6): a clear error,
    not a silently shorter window; a float64 SVD without ``storage_eps`` keeps all ``k`` triplets."""
    A = spiked_bulk(300, 700, SPIKES, seed=5)
    p = partial_svd(A, K_MAX + 1, dtype=F64, storage_eps=2.0 ** -4)
    assert p.U.shape == (300, 1)
    w = wedin_window(p.s, storage_eps=torch.finfo(torch.float16).eps, exhausted=False)
    assert int(w) == 6
    with pytest.raises(ValueError, match="a window of 6 needs 7 triplets with vectors; this one has 1"):
        p.certificate(w)
    assert partial_svd(A, K_MAX + 1, dtype=F64).U.shape == (300, K_MAX + 1)


def test_partial_svd_refuses_a_gram_of_the_wrong_side_or_with_nan():
    A = spiked_bulk(300, 200, SPIKES, seed=6)
    with pytest.raises(ValueError, match=r"partial_svd: gram has shape \(300, 300\); pass the small Gram A\^T A "
                                         r"of shape \(200, 200\)"):
        partial_svd(A, 10, dtype=F64, gram=A @ A.T)
    bad = A.T @ A
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="partial_svd: gram of shape .* contains NaN or Inf"):
        partial_svd(A, 10, dtype=F64, gram=bad)


def test_smollm2_windows_equal_the_float64_svd_windows(smollm2_gguf):
    """Real Q4_1 weights (SmolLM2-135M, three layers' MLP): the default report's windows (float32, on the Gram
    shared with kappa) equal those of the exact float64 spectra, and their certificates are below the tolerance."""
    from hf_flag.analysis.pairs import small_gram_side, window_svd
    from hf_flag.geometry.pairs import weight_gram
    from hf_flag.weights.adapters import get_adapter
    from hf_flag.weights.sources import open_weights

    source = open_weights(str(smollm2_gguf))
    adapter = get_adapter(source.config, source.keys())
    layout = adapter.layout(source.config, source.keys())
    windows = []
    for i in (0, 15, 29):
        block = adapter.block(source, layout, i, dtype=F32, device=torch.device("cpu"))
        eps = block.storage_eps
        assert eps == 2.0 ** -4
        for W in (block.mlp.mlp_in, block.mlp.mlp_gate, block.mlp.mlp_out):
            p = window_svd(W[None], eps, gram=weight_gram(W[None], small_gram_side(W), dtype=F32))
            w = wedin_window(p.s, storage_eps=eps, exhausted=False)
            assert int(w) == reference_window(W, eps)[3]
            assert float(p.certificate(w)) <= eps / 100 and bool(p.gap_known(w).all())
            windows.append(int(w))
    assert set(windows) == {0, 1}  # both kinds occur: some weights have a determined leading cut
