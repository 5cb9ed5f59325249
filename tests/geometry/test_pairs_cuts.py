"""Rank cuts from Grams (gram_cut), the reading of kappa at the storage-precision cut, range_overlap's Cholesky
route and the storage-exact bf16 products (hf_flag.geometry.pairs; MATH.md §1, §3).

References: float64 ``torch.linalg.matrix_rank`` of the weight itself at the same rtol, the eigendecomposition
route, ``range_overlap_from_svd`` on float64 thin SVDs, float64 products, and the float64 computation of every
default-report value on the same bf16 numbers.
"""
import math

import pytest
import torch

from hf_flag.analysis.pairs import pair_window_values, window_svd
from hf_flag.geometry.angles import default_rtol, thin_svd
from hf_flag.geometry.pairs import (GramCut, bf16_exact, commutator_reading_of_pairs, gram_cut, gram_cut_level,
                                    pair_product, range_overlap_from_grams, range_overlap_from_svd,
                                    storage_exact_matmul, weight_gram)
from hf_flag.geometry.spectral import K_MAX, partial_svd

F64, F32 = torch.float64, torch.float32
BF16_EPS = torch.finfo(torch.bfloat16).eps


def with_spectrum(rows: int, cols: int, s, seed: int) -> torch.Tensor:
    """``U diag(s) V^T`` with Haar-random orthonormal ``U`` (rows x r), ``V`` (cols x r), float64."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=F64)
    U = torch.linalg.qr(torch.randn(rows, s.numel(), generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(cols, s.numel(), generator=g, dtype=F64)).Q
    return (U * s) @ V.mT


def flat_with_last(n: int, last: float) -> torch.Tensor:
    """A flat spectrum ``1 .. 0.5`` whose smallest value is ``last`` (``||G||_F`` far above ``lambda_max``: the
    bracket of gram_cut leaves borderline members to the eigenvalues)."""
    s = torch.linspace(1.0, 0.5, n, dtype=F64)
    s[-1] = last
    return s


def reference_full(W: torch.Tensor, rtol: float) -> bool:
    """rank n (the shorter side) at the cut, by float64 matrix_rank of the weight itself."""
    return int(torch.linalg.matrix_rank(W.double(), rtol=rtol)) == min(W.shape[-2:])


@pytest.mark.parametrize("factor", [0.97, 1.03])  # just below / just above the cut
@pytest.mark.parametrize("with_top", [True, False])
def test_gram_cut_matches_matrix_rank_at_the_borderline(factor, with_top):
    n, k, rtol = 40, 90, 1e-3
    W = 3.0 * torch.stack([with_spectrum(n, k, flat_with_last(n, factor * rtol), seed=1),
                     with_spectrum(n, k, flat_with_last(n, 0.9), seed=2),
                     with_spectrum(n, k, torch.logspace(0, -6, n, dtype=F64), seed=3)])  # far below the cut
    G = weight_gram(W, "rows", dtype=F64)
    top = torch.linalg.matrix_norm(W, 2) if with_top else None
    cut = gram_cut(G, rtol, top=top)
    expected = [reference_full(w, rtol) for w in W]
    assert expected == [factor > 1, True, False]
    assert cut.full.tolist() == expected
    assert cut.factor is None  # one member is not full: no shared factor
    alone = gram_cut(G[1:2], rtol, top=None if top is None else top[1:2])
    assert alone.full.tolist() == [True]
    assert torch.allclose(alone.factor @ alone.factor.mT, G[1:2], rtol=1e-12, atol=1e-12)


def test_gram_cut_of_rank_deficient_and_zero_grams():
    W = torch.stack([with_spectrum(12, 30, [3.0, 2.0, 1.0] + [0.5] * 8, seed=4),  # rank 11 of 12
                     torch.zeros(12, 30, dtype=F64)])
    cut = gram_cut(weight_gram(W, "rows", dtype=F64), 1e-8)
    assert cut.full.tolist() == [False, False] and cut.factor is None
    assert [reference_full(w, 1e-8) for w in W] == [False, False]


def test_float32_gram_resolves_the_cut_only_down_to_its_rounding():
    """A Gram in float32 cannot tell eigenvalues below ``size eps_32 lambda_max``: there the cut is
    ``sqrt(size eps_32)`` in singular values (MATH.md §3), above a small rtol; float64 resolves rtol itself."""
    n, k, rtol = 64, 150, 1e-3
    level = math.sqrt(n * torch.finfo(F32).eps)  # 2.8e-3 > rtol
    W = with_spectrum(n, k, flat_with_last(n, 2 * rtol), seed=5)[None]  # between rtol and the float32 level
    assert reference_full(W[0], rtol) and 2 * rtol < level
    assert gram_cut(weight_gram(W, "rows", dtype=F64), rtol).full.tolist() == [True]
    assert gram_cut(weight_gram(W, "rows", dtype=F32), rtol).full.tolist() == [False]
    assert gram_cut_level(torch.zeros(n, n, dtype=F32), rtol) == pytest.approx(level ** 2)


@pytest.mark.parametrize("factor, expected", [(0.8, False), (1.25, True)])
def test_reading_counts_ranks_at_the_storage_precision(factor, expected):
    """The reading's rank cut uses the storage epsilon (MATH.md §1: max(shape) eps_c + eps_s): a weight loaded into
    float32 from bf16 storage with sigma_n / sigma_1 just below that cut does not have rank n, although it has at
    the float32 cut; float64 matrix_rank of the weight at the same rtol agrees."""
    n, k, m = 48, 120, 100
    W_l = with_spectrum(n, k, flat_with_last(n, 1.0), seed=6).to(torch.bfloat16).to(F32)
    probe = torch.zeros(m, n, dtype=F32)
    rtol = default_rtol(probe, BF16_EPS)
    assert rtol == pytest.approx(100 * torch.finfo(F32).eps + BF16_EPS)
    W_next = with_spectrum(m, n, flat_with_last(n, factor * rtol), seed=7).to(F32)
    low = with_spectrum(n, k, [1.0] * (n - 2), seed=8).to(F32)  # rank n - 2: W_l never carries the reading
    assert reference_full(W_next, rtol) is expected and reference_full(W_next, default_rtol(W_next))
    for pair in ((low, W_next), (W_l, W_next)):
        W_a, W_b = (X[None] for X in pair)
        got = commutator_reading_of_pairs(W_a, W_b, storage_eps=BF16_EPS)
        assert got == [expected or pair[0] is W_l]
        s_a, s_b = torch.linalg.svdvals(W_a.double()), torch.linalg.svdvals(W_b.double())
        assert commutator_reading_of_pairs(W_a, W_b, storage_eps=BF16_EPS, s_l=s_a, s_next=s_b) == got
        # from the shared n x n Grams and the partial SVDs' sigma_1, as the default report does
        cuts = tuple(gram_cut(weight_gram(X.double(), side, dtype=F64), default_rtol(X, BF16_EPS),
                              top=torch.linalg.matrix_norm(X.double(), 2)) for X, side in ((W_a, "rows"),
                                                                                           (W_b, "cols")))
        assert commutator_reading_of_pairs(W_a, W_b, storage_eps=BF16_EPS, cuts=cuts) == got
    # at the float32 storage cut (today's dtype-only rule) the same W_next has rank n
    assert commutator_reading_of_pairs(low[None], W_next[None]) == [True]


def eigh_route(W_l, W_next, rtol):
    """range_overlap_from_grams forced onto its eigendecomposition route (no Cholesky factors)."""
    none = GramCut(torch.zeros(W_l.shape[:-2], dtype=torch.bool), None)
    return range_overlap_from_grams(W_l, W_next, rtol=rtol, cuts=(none, none))


@pytest.mark.parametrize("dtype", [F64, F32])
def test_range_overlap_cholesky_route_equals_eigh_route_and_thin_svd(dtype):
    """An MLP-shaped pair (n = 80 above both ranks 20, 24) at full rank: the Cholesky route against the eigh route
    and against range_overlap_from_svd on float64 thin SVDs (the sum of squares of the transport window)."""
    n, k, m = 80, 20, 24
    g = torch.Generator().manual_seed(9)
    W_l = torch.randn(2, n, k, generator=g, dtype=F64)
    W_next = torch.randn(2, m, n, generator=g, dtype=F64)
    W_next[1, :k] += 3 * W_l[1].mT  # partly aligned ranges: overlap well above its baseline
    rtol = (default_rtol(W_l), default_rtol(W_next))
    (U, s_l, _), (_, s_n, Vh) = thin_svd(W_l), thin_svd(W_next)
    ref, ref_base = range_overlap_from_svd(Vh @ U, s_l, s_n, n, rtol=rtol)
    X_l, X_n = W_l.to(dtype), W_next.to(dtype)
    grams = weight_gram(X_l, "cols", dtype=dtype), weight_gram(X_n, "rows", dtype=dtype)
    cuts = gram_cut(grams[0], rtol[0]), gram_cut(grams[1], rtol[1])
    assert cuts[0].factor is not None and cuts[1].factor is not None
    chol, base = range_overlap_from_grams(X_l, X_n, rtol=rtol, gram_l=grams[0], gram_next=grams[1],
                                          product=pair_product(X_l, X_n, dtype), cuts=cuts)
    eig, eig_base = eigh_route(X_l, X_n, rtol)
    tol = 1e-12 if dtype == F64 else 2e-5
    assert torch.allclose(chol, ref, atol=tol) and torch.allclose(eig, ref, atol=tol)
    assert torch.equal(base, ref_base) and torch.equal(eig_base, ref_base)
    assert float(ref[1]) > 1.5 * float(ref_base[1])  # the aligned member is far from the Haar value


def test_range_overlap_takes_eigenvectors_for_a_rank_deficient_gram():
    n, k, m = 60, 16, 18
    W_l = with_spectrum(n, k, [4.0, 3.0, 2.0, 1.0] * 3, seed=10)[None]  # rank 12 of 16
    W_next = with_spectrum(m, n, torch.linspace(2, 1, m, dtype=F64), seed=11)[None]
    W_next = W_next + 0.5 * with_spectrum(m, n, [1.0] * 6, seed=12)[None] @ (W_l[0] @ W_l[0].mT)
    rtol = (default_rtol(W_l), default_rtol(W_next))
    (U, s_l, _), (_, s_n, Vh) = thin_svd(W_l), thin_svd(W_next)
    ref, ref_base = range_overlap_from_svd(Vh @ U, s_l, s_n, n, rtol=rtol)
    got, base = range_overlap_from_grams(W_l, W_next, rtol=rtol)
    # mixed route: W_l's Gram is rank deficient (eigenvectors), W_next's full (Cholesky)
    assert gram_cut(weight_gram(W_l, "cols", dtype=F64), rtol[0]).factor is None
    assert gram_cut(weight_gram(W_next, "rows", dtype=F64), rtol[1]).factor is not None
    assert float(ref_base) == 18 / 60
    assert torch.allclose(got, ref, atol=1e-10) and torch.equal(base, ref_base)


def test_storage_exact_matmul_only_for_bf16_numbers_and_restores_the_setting():
    g = torch.Generator().manual_seed(13)
    W = torch.randn(3, 50, 70, generator=g).to(torch.bfloat16).to(F32)
    before = torch.backends.mkldnn.matmul.fp32_precision
    assert bf16_exact(W) and bf16_exact(W.mT)
    derived = W @ W.mT
    assert not bf16_exact(derived) and not bf16_exact(W.double())
    with storage_exact_matmul(W, derived) as on:
        assert not on and torch.backends.mkldnn.matmul.fp32_precision == before
    with pytest.raises(RuntimeError):
        with storage_exact_matmul(W) as on:
            assert on and torch.backends.mkldnn.matmul.fp32_precision == "bf16"
            raise RuntimeError("inside")
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    one = W.clone()
    one[1, 2, 3] += 2.0 ** -12 * float(one[1, 2, 3])  # one entry off the bf16 grid
    assert not bf16_exact(one)


@pytest.mark.parametrize("shape", [(4096 // 8, 11008 // 8), (128, 4096 // 4)])
def test_storage_exact_products_are_float32_accurate(shape):
    """Grams and the pair product of bf16 numbers through bf16 inputs: within float32 accumulation error of the
    float64 products of the same numbers."""
    g = torch.Generator().manual_seed(14)
    rows, cols = shape
    W = torch.randn(1, rows, cols, generator=g).to(torch.bfloat16).to(F32)
    V = torch.randn(1, cols, rows, generator=g).to(torch.bfloat16).to(F32)
    for got, ref in ((weight_gram(W, "rows", dtype=F32), W.double() @ W.double().mT),
                     (weight_gram(V, "cols", dtype=F32), V.double().mT @ V.double()),
                     (pair_product(V, W, F32), W.double() @ V.double())):
        assert float(torch.linalg.matrix_norm(got.double() - ref) / torch.linalg.matrix_norm(ref)) < 2e-6


def mlp_pair(n: int, d: int, kappa_scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A near-balanced MLP-shaped pair (hidden n = d_ff above d): ``W_next ~ W_l^T`` plus a perturbation of relative
    size ``kappa_scale``, rounded to bf16 (float32 holding bf16 numbers)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.linspace(3.0, 1.0, d, dtype=F64)
    U = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64)).Q
    W_l = (U * s) @ V.T
    W_next = (V * s) @ U.T + kappa_scale * torch.randn(d, n, generator=g, dtype=F64)
    return tuple(X.to(torch.bfloat16).to(F32)[None] for X in (W_l, W_next))


@pytest.mark.parametrize("kappa_scale", [3e-3, 1e-4])  # kappa above AUTO_FACTORED_BELOW (trace form), and below
def test_default_report_values_with_storage_exact_products_match_float64(kappa_scale):
    """Every default-report pair value computed in float32 (storage-exact bf16 products, Cholesky cuts) against its
    float64 computation on the same bf16 numbers: within eps_bf16 (absolute for values in [0, 1], relative for
    norms); the reading and the ranks equal."""
    W_l, W_next = mlp_pair(400, 96, kappa_scale, seed=15)
    with storage_exact_matmul(W_l, W_next) as on:
        assert on  # the fast products are what this test measures
    out = {}
    for dtype in (F32, F64):
        svds = [partial_svd(W.to(dtype), K_MAX + 1, dtype=dtype, storage_eps=BF16_EPS) for W in (W_l, W_next)]
        out[dtype] = pair_window_values(W_l.to(dtype), W_next.to(dtype), storage_eps=BF16_EPS, dtype=dtype,
                                        svd_l=svds[0], svd_next=svds[1])[0]
    (v32, d32), (v64, d64) = out[F32], out[F64]
    if kappa_scale > 1e-3:
        assert 1e-3 < v64["commutator_ratio"] < 1e-2  # near-balanced, on the trace form
    else:
        assert v64["commutator_ratio"] < 1e-3
    for key in ("commutator_ratio", "commutator_ratio_normalized", "commutator_ratio_baseline",
                "commutator_ratio_normalized_baseline", "relative_imbalance", "relative_imbalance_baseline",
                "range_overlap", "range_overlap_baseline"):
        assert v32[key] == pytest.approx(v64[key], abs=BF16_EPS), key
    assert v32["commutator_ratio"] == pytest.approx(v64["commutator_ratio"], rel=1e-2)
    for key in ("imbalance_norm", "imbalance_norm_baseline", "imbalance_diagonal_norm"):
        assert v32[key] == pytest.approx(v64[key], rel=BF16_EPS), key
    assert v64["range_overlap_baseline"] == 96 / 400 and v64["range_overlap"] > 0.99  # balanced: shared ranges
    assert d32["commutator_reading_holds"] is d64["commutator_reading_holds"] is False


def test_a_float32_gram_that_cannot_resolve_the_cut_hands_it_to_float64():
    """bf16 weight, n = 1024, sigma_min / sigma_max = 0.010 above the §1 cut rtol = 0.0079 (full rank there): a
    float32 Gram's rounding (n eps32 = 1.2e-4 of lambda_max) exceeds the cut rtol^2 = 6.2e-5, so ``gram_cut``
    leaves it unresolved instead of calling the weight rank-deficient, and ``resolved_gram_cut`` decides it on
    the float64 Gram, as the thin SVD does."""
    from hf_flag.geometry.angles import default_rtol
    from hf_flag.geometry.pairs import gram_cut, gram_resolves, resolved_gram_cut

    torch.manual_seed(0)
    n, k = 1024, 1100
    U = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(k, n, dtype=torch.float64)).Q
    W = ((U * torch.linspace(1, 0.01, n, dtype=torch.float64)) @ V.T).to(torch.bfloat16).float()[None]
    eps = torch.finfo(torch.bfloat16).eps
    rtol = default_rtol(W, eps)
    s = torch.linalg.svdvals(W.double())
    assert float(s[0, -1] / s[0, 0]) > rtol  # full rank at the cut (the reference)
    G32 = weight_gram(W, "rows", dtype=torch.float32)
    assert not gram_resolves(G32, rtol)
    assert not gram_cut(G32, rtol, top=s[:, 0]).resolved
    cut, G = resolved_gram_cut(W, "rows", rtol, gram=G32, top=s[:, 0])
    assert G.dtype == torch.float64 and cut.resolved and cut.full.tolist() == [True]
    W_next = (torch.randn(k, 10) @ torch.randn(10, n))[None]  # rank 10: W_l decides the reading
    assert commutator_reading_of_pairs(W, W_next, storage_eps=eps) == [True]
    assert commutator_reading_of_pairs(W, W_next, storage_eps=eps, s_l=s,
                                       s_next=torch.linalg.svdvals(W_next.double())) == [True]


@pytest.mark.parametrize("wide", ["l", "next"])
def test_default_report_reads_range_overlap_where_one_weight_could_have_rank_n(wide):
    """The default report's last branch: n above one outer dim (Gram-factor side) while the other weight's shorter
    side is n, so that weight alone can have rank n (e.g. a residual pair with d_ff = d - 1, bias-augmented, or a
    linear chain 12 -> 8 -> 4).  Where it has rank n kappa reads (MATH.md §3) and range_overlap is None; where it is
    rank-deficient at the storage cut kappa does not read, and range_overlap is the thin-SVD value."""
    n, other = 8, 4
    if wide == "l":  # W_l (8 x 12) may have rank 8, W_next (4 x 8) cannot
        low = with_spectrum(n, 12, [4.0, 3.0, 2.0, 1.5, 1.0], seed=41)  # rank 5 < n
        full = with_spectrum(n, 12, torch.linspace(4.0, 1.0, n), seed=42)
        W_l, W_next = torch.stack([low, full]), with_spectrum(other, n, [2.0, 1.0, 0.5, 0.3], seed=43).expand(2, -1, -1)
    else:  # W_next (12 x 8) may have rank 8, W_l (8 x 4) cannot
        low = with_spectrum(12, n, [4.0, 3.0, 2.0, 1.5, 1.0], seed=44)
        full = with_spectrum(12, n, torch.linspace(4.0, 1.0, n), seed=45)
        W_l, W_next = with_spectrum(n, other, [2.0, 1.0, 0.5, 0.3], seed=46).expand(2, -1, -1), torch.stack([low, full])
    eps = torch.finfo(F64).eps
    out = pair_window_values(W_l, W_next, storage_eps=eps, dtype=F64, svd_l=window_svd(W_l, eps),
                             svd_next=window_svd(W_next, eps))
    assert [d["commutator_reading_holds"] for _, d in out] == [False, True]
    (U, s_l, _), (_, s_n, Vh) = thin_svd(W_l), thin_svd(W_next)
    ref, ref_base = range_overlap_from_svd(Vh @ U, s_l, s_n, n, rtol=(default_rtol(W_l), default_rtol(W_next)))
    low_values, full_values = out[0][0], out[1][0]
    assert low_values["range_overlap"] == pytest.approx(float(ref[0]), abs=1e-12)
    assert low_values["range_overlap_baseline"] == float(ref_base[0]) == 5 / n  # max(5, 4) / 8
    assert 0 < low_values["range_overlap"] < 1
    assert full_values["range_overlap"] is None and full_values["range_overlap_baseline"] is None
