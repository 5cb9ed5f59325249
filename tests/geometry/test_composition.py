"""Tests of hf_flag.geometry.composition: trace form vs the naive d x d formula, tiling, Haar baseline (MATH §6)."""
import math

import pytest
import torch

from hf_flag.geometry.composition import composition_scores


def _heads(H: int, d: int, dh: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(H, d, dh, generator=g, dtype=torch.float64)


def _naive(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Elhage et al.: ||L_h R_h'||_F / (||L_h||_F ||R_h'||_F), forming every d x d product."""
    out = torch.empty(L.shape[0], R.shape[0], dtype=torch.float64)
    for i in range(L.shape[0]):
        for j in range(R.shape[0]):
            out[i, j] = torch.linalg.matrix_norm(L[i] @ R[j]) / (
                torch.linalg.matrix_norm(L[i]) * torch.linalg.matrix_norm(R[j]))
    return out


@pytest.fixture
def layer_pair():
    g = torch.Generator().manual_seed(0)
    H, H2, d, dh, dh2 = 3, 4, 24, 4, 5
    src = {"V": _heads(H, d, dh, g), "O": _heads(H, d, dh, g).mT}
    dst = {"Q": _heads(H2, d, dh2, g), "K": _heads(H2, d, dh2, g), "V": _heads(H2, d, dh2, g),
           "O": _heads(H2, d, dh2, g).mT}
    return src, dst


def test_trace_form_equals_naive_formula_for_q_k_v(layer_pair):
    src, dst = layer_pair
    L = src["V"] @ src["O"]
    expected = {
        "q": _naive(L, dst["Q"] @ dst["K"].mT),
        "k": _naive(L, dst["K"] @ dst["Q"].mT),
        "v": _naive(L, dst["V"] @ dst["O"]),
    }
    got = {
        "q": composition_scores(src["V"], src["O"], dst["Q"], dst["K"], kind="q"),
        "k": composition_scores(src["V"], src["O"], dst["Q"], dst["K"], kind="k"),
        "v": composition_scores(src["V"], src["O"], dst["V"], dst["O"].mT, kind="v"),
    }
    for kind in "qkv":
        assert got[kind].shape == (3, 4)
        assert torch.allclose(got[kind], expected[kind], rtol=1e-10, atol=0), kind
    assert not torch.allclose(got["q"], got["k"], rtol=1e-3)


@pytest.mark.parametrize("tile_size", [1, 2, 5, 7, 1000])
def test_tiled_equals_untiled(layer_pair, tile_size):
    src, dst = layer_pair
    full = composition_scores(src["V"], src["O"], dst["Q"], dst["K"], kind="q", tile_size=12)
    tiled = composition_scores(src["V"], src["O"], dst["Q"], dst["K"], kind="q", tile_size=tile_size)
    assert torch.allclose(tiled, full, rtol=1e-13, atol=0)


def test_haar_baseline_mean_square_is_one_over_d():
    g = torch.Generator().manual_seed(1)
    H, d, dh = 8, 32, 4
    per_draw = []
    for _ in range(24):
        s = composition_scores(_heads(H, d, dh, g), _heads(H, d, dh, g).mT, _heads(H, d, dh, g),
                               _heads(H, d, dh, g), kind="q")
        per_draw.append(s.square().mean().item())
    per_draw = torch.tensor(per_draw)
    se = per_draw.std() / math.sqrt(len(per_draw))
    assert abs(per_draw.mean().item() - 1 / d) < 5 * se.item()
    assert se.item() < 0.1 / d  # the test has the power to see a wrong baseline


def test_aligned_heads_score_one():
    """A source writing exactly into the destination's query read space: ||L R|| = ||L|| ||R|| (rank one)."""
    d = 16
    u = torch.zeros(1, d, 1, dtype=torch.float64)
    u[0, 3] = 1.0
    w = torch.zeros(1, d, 1, dtype=torch.float64)
    w[0, 5] = 2.0
    score = composition_scores(w, u.mT, u, w, kind="q")  # L = w u^T, R = u w^T
    assert score.item() == pytest.approx(1.0, rel=1e-14)
    assert composition_scores(w, u.mT, w, u, kind="q").item() == 0.0  # L R = w u^T w u^T = 0


def test_float32_and_zero_head():
    g = torch.Generator().manual_seed(2)
    W_V, W_O, W_Q, W_K = _heads(2, 12, 3, g), _heads(2, 12, 3, g).mT, _heads(3, 12, 3, g), _heads(3, 12, 3, g)
    ref = composition_scores(W_V.float().double(), W_O.float().double(), W_Q.float().double(),
                             W_K.float().double(), kind="k")
    out = composition_scores(W_V.float(), W_O.float(), W_Q.float(), W_K.float(), kind="k")
    assert out.dtype == torch.float64 and torch.allclose(out, ref, rtol=1e-12, atol=0)
    W_V[1] = 0.0
    s = composition_scores(W_V, W_O, W_Q, W_K, kind="q")
    assert torch.all(s[1] == 0) and torch.all(s[0] > 0)


def test_bad_inputs_raise_value_error_naming_shapes():
    g = torch.Generator().manual_seed(3)
    W_V, W_O, W_Q, W_K = _heads(2, 12, 3, g), _heads(2, 12, 3, g).mT, _heads(3, 12, 3, g), _heads(3, 12, 3, g)
    with pytest.raises(ValueError, match="kind"):
        composition_scores(W_V, W_O, W_Q, W_K, kind="o")
    with pytest.raises(ValueError, match=r"W_O.*\(2, 12, 3\)"):
        composition_scores(W_V, W_O.mT, W_Q, W_K, kind="q")
    with pytest.raises(ValueError, match=r"W_K.*\(3, 3, 12\)"):
        composition_scores(W_V, W_O, W_Q, W_K.mT, kind="v")
    with pytest.raises(ValueError, match=r"\(3, 12, 3\).*\(2, 12, 3\)"):
        composition_scores(W_V, W_O, W_Q, W_K[:2], kind="q")
    bad = W_Q.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        composition_scores(W_V, W_O, bad, W_K, kind="q")
    with pytest.raises(ValueError, match="tile_size"):
        composition_scores(W_V, W_O, W_Q, W_K, kind="q", tile_size=0)
    with pytest.raises(ValueError, match="composition_scores: dtype=torch.int64"):
        composition_scores(W_V, W_O, W_Q, W_K, kind="q", dtype=torch.int64)


def test_packed_grams_equal_trace_form_and_naive(layer_pair):
    """scores_from_grams(source_grams, destination_grams) against the tiled trace form and the naive d x d formula,
    for every kind, with head tiles of the Gram build of several sizes."""
    from hf_flag.geometry.composition import (CompositionGrams, destination_grams, packed_gram_bytes,
                                              scores_from_grams, source_grams)

    src, dst = layer_pair
    L = src["V"] @ src["O"]
    naive = {"q": _naive(L, dst["Q"] @ dst["K"].mT), "k": _naive(L, dst["K"] @ dst["Q"].mT),
             "v": _naive(L, dst["V"] @ dst["O"])}
    reads = {"q": (dst["Q"], dst["K"]), "k": (dst["Q"], dst["K"]), "v": (dst["V"], dst["O"].mT)}
    for tile in (None, 1, 2):
        P = source_grams(src["V"], src["O"], tile_size=tile)
        d = src["V"].shape[1]
        assert P.packed.shape == (3, d * (d + 1) // 2) and packed_gram_bytes(3, d) == P.packed.numel() * 8
        assert torch.allclose(P.norm2, torch.linalg.matrix_norm(L).square(), rtol=1e-12, atol=0)
        for kind, (X, Y) in reads.items():
            got = scores_from_grams(P, destination_grams(X, Y, kind=kind, tile_size=tile))
            assert torch.allclose(got, composition_scores(src["V"], src["O"], X, Y, kind=kind), rtol=1e-12, atol=0)
            assert torch.allclose(got, naive[kind], rtol=1e-10, atol=0), kind
    # built in place into slices of a larger cache (as the analysis does): the same Grams
    cache = CompositionGrams(torch.zeros(7, P.packed.shape[1], dtype=torch.float64),
                             torch.zeros(7, dtype=torch.float64))
    source_grams(src["V"], src["O"], out=CompositionGrams(cache.packed[2:5], cache.norm2[2:5]))
    assert torch.equal(cache.packed[2:5], P.packed) and torch.equal(cache.norm2[2:5], P.norm2)
    assert not cache.packed[:2].any() and not cache.packed[5:].any()
    with pytest.raises(ValueError, match="out holds packed"):
        source_grams(src["V"], src["O"], out=CompositionGrams(cache.packed[:2], cache.norm2[:2]))


def test_packed_grams_zero_head_and_bad_inputs():
    from hf_flag.geometry.composition import destination_grams, scores_from_grams, source_grams

    g = torch.Generator().manual_seed(4)
    W_V, W_O, W_Q, W_K = _heads(2, 12, 3, g), _heads(2, 12, 3, g).mT, _heads(3, 12, 3, g), _heads(3, 12, 3, g)
    W_V[1] = 0.0
    s = scores_from_grams(source_grams(W_V, W_O), destination_grams(W_Q, W_K, kind="q"))
    assert torch.all(s[1] == 0) and torch.all(s[0] > 0)  # a zero head scores 0, not NaN
    with pytest.raises(ValueError, match="kind"):
        destination_grams(W_Q, W_K, kind="o")
    with pytest.raises(ValueError, match=r"W_O.*\(2, 12, 3\)"):
        source_grams(W_V, W_O.mT)
    with pytest.raises(ValueError, match="tile_size"):
        source_grams(W_V, W_O, tile_size=0)
    with pytest.raises(ValueError, match="different model dimensions"):
        scores_from_grams(source_grams(W_V, W_O), destination_grams(_heads(3, 10, 3, g), _heads(3, 10, 3, g),
                                                                    kind="q"))


@pytest.mark.parametrize("tile_size", [None, 1, 5])
def test_shared_kv_heads_equal_the_expanded_heads_and_the_naive_formula(tile_size):
    """Grouped-query destination (4 query heads on 2 KV heads): kinds k and v with the KV projection passed
    unexpanded (``shared``) give the scores of the expanded heads and of the d x d formula (MATH.md §6)."""
    g = torch.Generator().manual_seed(4)
    H, H2, n_kv, d, dh = 3, 4, 2, 24, 5
    W_V, W_O = _heads(H, d, dh, g), _heads(H, d, dh, g).mT
    Q, K, V, O = _heads(H2, d, dh, g), _heads(n_kv, d, dh, g), _heads(n_kv, d, dh, g), _heads(H2, d, dh, g).mT
    kv = torch.tensor([0, 0, 1, 1])
    L = W_V @ W_O
    cases = {"k": ((Q, K), (Q, K[kv]), _naive(L, K[kv] @ Q.mT)),
             "v": ((V, O.mT), (V[kv], O.mT), _naive(L, V[kv] @ O))}
    for kind, (grouped, expanded, naive) in cases.items():
        got = composition_scores(W_V, W_O, *grouped, kind=kind, shared=kv, tile_size=tile_size)
        assert torch.allclose(got, composition_scores(W_V, W_O, *expanded, kind=kind), rtol=1e-12, atol=0)
        assert torch.allclose(got, naive, rtol=1e-10, atol=0), kind
    with pytest.raises(ValueError, match="kind 'k' or 'v'"):
        composition_scores(W_V, W_O, Q, K[kv], kind="q", shared=kv)
    with pytest.raises(ValueError, match="KV head indices"):
        composition_scores(W_V, W_O, Q, K, kind="k", shared=torch.tensor([0, 1, 2, 0]))
