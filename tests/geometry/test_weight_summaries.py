"""Per-weight summaries converted a slice at a time (``geometry.pairs.weight_gram``, ``weight_norms``,
``pair_product``; issue #11 item 4): the same numbers as the whole converted weight gives, and no full-size
converted copy of a weight during the default report's pair values.

Tolerances: a float32 weight's float64 Gram or product summed over slices differs from one product only in the
rounding of the float64 sums (the entries' products are exact in float64), a few ulp of float64 (checked at
``1e-14`` of the scale); row norms are each summed whole (bit-identical), column norms slice by slice (a few
ulp)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hf_flag.geometry.pairs as pairs
from hf_flag.analysis.pairs import pair_rows
from hf_flag.geometry.pairs import gram_pair_values, imbalance_diagonal_norm, pair_product, weight_gram, weight_norms

F64 = torch.float64


def weights(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@pytest.fixture
def small_chunks(monkeypatch):
    """Slices of at most 4 KiB: every summary below is summed over many slices."""
    monkeypatch.setattr(pairs, "CONVERT_CHUNK_BYTES", 4096)


@pytest.mark.parametrize("shape", [(257, 70), (3, 70, 257)])
def test_sliced_summaries_match_the_whole_converted_weight(small_chunks, shape):
    W = weights(*shape)
    X = W.double()
    for side, dense in (("rows", X @ X.mT), ("cols", X.mT @ X)):
        G = weight_gram(W, side, dtype=F64)
        assert G.dtype == F64 and (G - dense).abs().max() <= 1e-14 * dense.abs().max()
    norms = weight_norms(W, F64)
    assert torch.equal(norms.rows, X.square().sum(-1))
    assert torch.allclose(norms.cols, X.square().sum(-2), rtol=1e-14, atol=0)
    assert torch.allclose(norms.fro2, X.square().sum((-2, -1)), rtol=1e-14, atol=0)
    W_next = weights(*shape[:-2], 40, shape[-2], seed=1)
    C = pair_product(W, W_next, F64)
    dense = W_next.double() @ X
    assert (C - dense).abs().max() <= 1e-14 * dense.abs().max()
    # a weight already in the dtype is used as it is: the one product, bit-identical
    assert torch.equal(weight_gram(X, "cols", dtype=F64), X.mT @ X)
    assert torch.equal(pair_product(X, W_next.double(), F64), dense)


def test_pair_values_from_shared_norms_match_the_closed_forms(small_chunks):
    """kappa, ||D||, the relative imbalance (MATH.md §2-§3 on the n x n matrices) and ||diag D|| from the sliced
    summaries, n large (Gram factors) and n small (hidden-side Grams)."""
    for W_l, W_next in ((weights(300, 40), weights(50, 300, seed=1)), (weights(30, 90), weights(80, 30, seed=1))):
        A, B = W_next.double().mT @ W_next.double(), W_l.double() @ W_l.double().mT
        fro = torch.linalg.matrix_norm
        g = gram_pair_values(W_l, W_next, dtype=F64, norms=(weight_norms(W_l, F64), weight_norms(W_next, F64)))
        assert float(g.commutator_ratio) == pytest.approx(float(fro(A @ B - B @ A) / (fro(A) * fro(B))), rel=1e-12)
        assert float(g.imbalance_norm) == pytest.approx(float(fro(A - B)), rel=1e-12)
        assert float(g.relative_imbalance) == pytest.approx(float(fro(A - B) / (fro(A) + fro(B))), rel=1e-12)
        assert float(imbalance_diagonal_norm(W_l, W_next)) == pytest.approx(
            float(torch.linalg.vector_norm(torch.diagonal(A) - torch.diagonal(B))), rel=1e-12)


class LargestFloat64(TorchDispatchMode):
    """Records the largest float64 storage any torch op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == F64:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("hidden", [512, 48])
def test_default_pair_values_make_no_full_size_float64_copy(monkeypatch, hidden):
    """The default report's pair values of float32 weights (float64 Grams, MATH.md §3) never convert a weight
    whole: no float64 tensor as large as the smaller weight's float64 copy (the Grams, C and the slices are
    smaller).  The check sees such a copy: ``W.double()`` inside the mode is reported."""
    monkeypatch.setattr(pairs, "CONVERT_CHUNK_BYTES", 16 * 1024)
    # up (n x d), down (d x n), n = hidden; d = 128 above the window (K_MAX + 1 = 65 vectors at most, MATH.md §4)
    W_l, W_next = weights(1, hidden, 128), weights(1, 128, hidden, seed=1)
    copy = min(W_l.numel(), W_next.numel()) * 8
    with LargestFloat64() as seen:
        W_l.double()
    assert seen.largest == copy
    with LargestFloat64() as seen:
        rows = pair_rows("m", "mlp", [(0, 0, "in", "out")], W_l, None, W_next, activation="identity", cheap=False,
                         storage_eps=torch.finfo(torch.float32).eps, window=True)
    assert rows and 0 < seen.largest < copy
