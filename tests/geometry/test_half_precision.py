"""Half-precision inputs (bf16, fp16): the public angle, overlap, head and flag functions compute in float64 and cut
ranks one storage ulp below s_max (MATH.md §1), so they return the float64 result on the same rounded values.

Reference: the same function on ``X.double()`` (the exact rounded values) with the rank cut passed explicitly, and
closed-form angles built into the constructions.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from hf_flag.geometry.angles import (
    chordal_distance,
    default_rtol,
    orthonormal_basis,
    padded_orthonormal_basis,
    principal_angles,
    projection_kernel,
    subspace_overlap,
    thin_svd,
)
from hf_flag.geometry.flags import flag_relative_position
from hf_flag.geometry.heads import head_overlap_matrix
from hf_flag.geometry.pairs import commutator_ratio, pair_values_from_svd

HALF = [torch.bfloat16, torch.float16]


def _spread(n: int, p: int, top: float, bottom: float, seed: int) -> torch.Tensor:
    """n x p matrix with singular values geometrically from ``top`` to ``bottom`` and Haar singular vectors."""
    U = ortho_group.rvs(n, random_state=seed)[:, :p]
    V = ortho_group.rvs(p, random_state=seed + 1)
    return torch.from_numpy(U @ np.diag(np.geomspace(top, bottom, p)) @ V.T)


@pytest.mark.parametrize("dtype", HALF)
def test_head_sized_inputs_keep_every_direction(dtype):
    """576 x 64 (a SmolLM2 head slice): the old cut max(shape) eps was 4.5 (bf16) and 0.56 (fp16) of s_max."""
    A = _spread(576, 64, 1.0, 0.02, seed=0).to(dtype)
    B = _spread(576, 64, 1.0, 0.02, seed=2).to(dtype)
    Ad, Bd = A.double(), B.double()
    assert padded_orthonormal_basis(A)[1].item() == 64
    angles = principal_angles(A, B)
    assert angles.shape == (64,)
    torch.testing.assert_close(angles, principal_angles(Ad, Bd), rtol=1e-10, atol=1e-12)
    assert subspace_overlap(A, B).item() == pytest.approx(subspace_overlap(Ad, Bd).item(), rel=1e-12)
    assert subspace_overlap(A, B).item() > 0.05  # Haar value 64/576 = 0.11, not the old 0.0
    assert projection_kernel(A, B).item() == pytest.approx(projection_kernel(Ad, Bd).item(), rel=1e-12)
    assert chordal_distance(A, B).item() == pytest.approx(chordal_distance(Ad, Bd).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", HALF)
def test_small_angle_survives_half_storage(dtype):
    """Two 3-planes sharing two directions exactly and a third at a known angle, stored exactly in half precision
    (entries 0, +-1 and small multiples of powers of two): angles (0, 0, theta) with theta = atan(1/8)."""
    n = 200
    A = torch.zeros(n, 3, dtype=dtype)
    B = torch.zeros(n, 3, dtype=dtype)
    A[0, 0] = A[1, 1] = A[2, 2] = 1
    B[0, 0] = B[1, 1] = B[2, 2] = 1
    B[3, 2] = 0.125
    angles = principal_angles(A, B)
    assert angles.dtype == torch.float64
    torch.testing.assert_close(angles, torch.tensor([0.0, 0.0, math.atan(0.125)], dtype=torch.float64),
                               rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", HALF)
def test_rank_cut_sits_one_storage_ulp_below_smax(dtype):
    eps = torch.finfo(dtype).eps
    A = torch.zeros(300, 4, dtype=dtype)
    A[0, 0], A[1, 1], A[2, 2] = 1.0, 4 * eps, eps / 4  # three directions: 1, above the cut, below it
    A[3, 3] = 0.0
    rtol = default_rtol(A)
    assert eps < rtol < 1.1 * eps
    assert orthonormal_basis(A).shape == (300, 2)
    assert orthonormal_basis(A.double(), rtol=rtol).shape == (300, 2)  # float64 reference with the same cut


def test_float32_and_float64_cut_keep_their_classical_value():
    for dtype in (torch.float32, torch.float64):
        A = torch.zeros(50, 7, dtype=dtype)
        eps = torch.finfo(dtype).eps
        assert default_rtol(A) == pytest.approx(50 * eps + eps)


@pytest.mark.parametrize("dtype", HALF)
def test_head_overlaps_match_float64(dtype):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 576, 64, generator=g).to(dtype)
    Y = torch.randn(3, 576, 64, generator=g).to(dtype)
    ov = head_overlap_matrix(X, Y)
    torch.testing.assert_close(ov, head_overlap_matrix(X.double(), Y.double()), rtol=1e-12, atol=1e-14)
    assert bool((ov > 0.05).all())


@pytest.mark.parametrize("dtype", HALF)
def test_flag_rank_cuts_and_pair_values_match_float64(dtype):
    W_l = _spread(40, 12, 8.0, 1.0, seed=5).to(dtype)
    W_next = _spread(40, 10, 6.0, 1.0, seed=9).T.contiguous().to(dtype)
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    pos = flag_relative_position(W_l, W_next, tau=0.05)
    ref = flag_relative_position(W_l.double(), W_next.double(), tau=0.05, storage_eps=eps)
    assert pos.storage_eps == eps
    assert pos.cuts_left == ref.cuts_left and pos.cuts_right == ref.cuts_right
    assert torch.equal(pos.rank_matrix, ref.rank_matrix)
    torch.testing.assert_close(pos.soft_matrix, ref.soft_matrix, rtol=1e-10, atol=1e-12)
    v = pair_values_from_svd(W_l, W_next, thin_svd(W_l), thin_svd(W_next))
    vd = pair_values_from_svd(W_l.double(), W_next.double(), thin_svd(W_l.double()), thin_svd(W_next.double()))
    assert float(v.range_overlap) == pytest.approx(float(vd.range_overlap), rel=1e-12)
    assert float(v.range_overlap) > 0.1
    assert float(commutator_ratio(W_l, W_next)) == pytest.approx(float(commutator_ratio(W_l.double(),
                                                                                         W_next.double())), rel=1e-10)


@pytest.mark.parametrize("dtype", HALF)
def test_half_compute_dtype_is_refused(dtype):
    W = torch.ones(4, 4)
    with pytest.raises(ValueError, match="too coarse to compute in"):
        commutator_ratio(W, W, dtype=dtype)
