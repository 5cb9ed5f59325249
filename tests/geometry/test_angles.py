"""Principal angles, projection kernel, overlaps, distances (MATH.md §1) against independent references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from hf_flag.geometry.angles import (
    all_finite,
    check_matrix,
    chordal_distance,
    geodesic_distance,
    orthonormal_basis,
    padded_orthonormal_basis,
    principal_angles,
    projection_distance,
    projection_kernel,
    subspace_overlap,
)

X_MATLAB = torch.tensor(
    [[0.537667139546100, 0.318765239858981, 3.578396939725760, 0.725404224946106],
     [1.833885014595086, -1.307688296305273, 2.769437029884877, -0.063054873189656],
     [-2.258846861003648, -0.433592022305684, -1.349886940156521, 0.714742903826096],
     [0.862173320368121, 0.342624466538650, 3.034923466331855, -0.204966058299775]], dtype=torch.float64)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(_rand(n, n, seed=seed))[0]


def test_matlab_reference_angles() -> None:
    x = X_MATLAB
    assert abs(principal_angles(x[:, :2], x[:, 2:])[-1].item() - 1.481454682101605) < 1e-12
    assert abs(principal_angles(x[:, :2], x[:, [2]]).item() - 0.746361174247302) < 1e-12
    assert abs(principal_angles(x[:, :3], x[:, [3]]).item() - 0.487163718534313) < 1e-12
    shared = principal_angles(x[:, :2], x[:, 1:])
    assert torch.allclose(shared, torch.tensor([0.0, 0.328950515907756], dtype=torch.float64), atol=1e-12, rtol=0)
    hadamard = torch.tensor(scipy.linalg.hadamard(8), dtype=torch.float64)
    right = principal_angles(hadamard[:, :3], hadamard[:, 3:])
    assert right.shape == (3,)
    assert torch.allclose(right, torch.full((3,), math.pi / 2, dtype=torch.float64), atol=1e-12, rtol=0)


def _mixed_pair(angles: tuple[float, ...], n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A = span(e_1..e_k), B = span(cos t_i e_i + sin t_i e_{k+i}): principal angles exactly ``angles``."""
    k = len(angles)
    A, B = torch.zeros(n, k, dtype=torch.float64), torch.zeros(n, k, dtype=torch.float64)
    for i, t in enumerate(angles):
        A[i, i] = 1.0
        B[i, i], B[k + i, i] = math.cos(t), math.sin(t)
    return A, B


@pytest.mark.parametrize("angles", [(1e-8, 1.5), (1e-12, 1.2)])
def test_mixed_small_and_large_angles(angles: tuple[float, float]) -> None:
    A, B = _mixed_pair(angles)
    truth = torch.tensor(angles, dtype=torch.float64)
    for theta in (principal_angles(A, B), principal_angles(A, B, orthonormal=True),
                  principal_angles(A * 3.0, B * -0.5)):
        assert ((theta - truth).abs() / truth).max().item() <= 1e-6
    # Exact signed permutations keep the construction exact (orthonormal input path).
    perm = torch.eye(6, dtype=torch.float64)[torch.tensor([4, 0, 5, 2, 1, 3])] * torch.tensor([1., -1, 1, 1, -1, 1])
    theta = principal_angles(perm @ A, perm @ B, orthonormal=True)
    assert ((theta - truth).abs() / truth).max().item() <= 1e-6
    # The oracle is the construction, not scipy: scipy 1.17 mis-pairs sines/cosines here (MATH.md §1).
    scipy_small = np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))[0]
    assert abs(scipy_small - angles[0]) / angles[0] > 1e-6


def test_tiny_angle_under_random_rotation_has_no_sqrt_eps_floor() -> None:
    A, B = _mixed_pair((1e-8, 1.5))
    Q = _orthogonal(6, seed=1)
    mix = _rand(2, 2, seed=2) + 3 * torch.eye(2, dtype=torch.float64)
    theta = principal_angles(Q @ A @ mix, Q @ B)
    assert abs(theta[0].item() - 1e-8) / 1e-8 <= 1e-6  # arccos alone would floor at ~1.5e-8
    assert abs(theta[1].item() - 1.5) <= 1e-12


@pytest.mark.parametrize("p,q,seed", [(3, 4, 0), (5, 2, 1), (4, 4, 2)])
def test_scipy_oracle_generic_case(p: int, q: int, seed: int) -> None:
    A, B = _rand(12, p, seed=seed), _rand(12, q, seed=seed + 100)
    ours = principal_angles(A, B)
    ref = np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))
    assert ref.min() > 0.05  # well separated from 0: scipy is trustworthy here
    assert np.allclose(ours.numpy(), ref, atol=1e-12, rtol=0)
    assert ours.dtype == torch.float64 and bool((ours[1:] >= ours[:-1]).all())


def test_projection_kernel_overlap_and_distance_identities() -> None:
    A, B = _rand(10, 4, seed=3), _rand(10, 3, seed=4)
    QA, QB = orthonormal_basis(A), orthonormal_basis(B)
    theta = principal_angles(A, B)
    pk = projection_kernel(A, B)
    P_A, P_B = QA @ QA.T, QB @ QB.T
    assert abs(pk.item() - torch.trace(P_A @ P_B).item()) < 1e-12
    assert abs(pk.item() - torch.cos(theta).pow(2).sum().item()) < 1e-12
    assert abs(subspace_overlap(A, B).item() - pk.item() / 3) < 1e-12
    pd = projection_distance(A, B)
    assert abs(pd.item() - torch.linalg.norm(P_A - P_B).item()) < 1e-12
    assert abs(pd.item() ** 2 - (4 + 3 - 2 * pk.item())) < 1e-12
    assert abs(chordal_distance(A, B).item() ** 2 - torch.sin(theta).pow(2).sum().item()) < 1e-12
    assert abs(geodesic_distance(A, B).item() - theta.norm().item()) < 1e-12
    # Symmetric, and invariant under a change of basis of each subspace (GL on the columns).
    assert torch.allclose(principal_angles(B, A), theta, atol=1e-13)
    G = _rand(4, 4, seed=5) + 4 * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(principal_angles(A @ G, B), theta, atol=1e-12)


def test_invariance_under_orthogonal_change_of_ambient_basis() -> None:
    A, B = _rand(9, 3, seed=6), _rand(9, 5, seed=7)
    theta, pk = principal_angles(A, B), projection_kernel(A, B)
    Q = _orthogonal(9, seed=8)
    assert torch.allclose(principal_angles(Q @ A, Q @ B), theta, atol=1e-12)
    assert abs(projection_kernel(Q @ A, Q @ B).item() - pk.item()) < 1e-12


def test_batched_equals_loop_with_broadcasting() -> None:
    A, B = _rand(3, 2, 8, 3, seed=9), _rand(2, 8, 4, seed=10)
    for fn in (principal_angles, projection_kernel, subspace_overlap, projection_distance, chordal_distance,
               geodesic_distance):
        batched = fn(A, B)
        looped = torch.stack([torch.stack([fn(A[i, j], B[j]) for j in range(2)]) for i in range(3)])
        assert batched.shape == looped.shape
        assert torch.allclose(batched, looped, atol=1e-12, rtol=0), fn.__name__


def test_rank_deficient_and_zero_subspaces() -> None:
    base = _rand(7, 2, seed=11)
    A = torch.cat([base, base.sum(1, keepdim=True)], dim=1)  # rank 2 with 3 columns
    B = _rand(7, 3, seed=12)
    assert orthonormal_basis(A).shape == (7, 2)
    assert torch.allclose(principal_angles(A, B), principal_angles(base, B), atol=1e-12)
    assert abs(subspace_overlap(A, B).item() - projection_kernel(base, B).item() / 2) < 1e-12
    zero = torch.zeros(7, 3)
    assert orthonormal_basis(zero).shape == (7, 0)
    assert principal_angles(zero, B).shape == (0,)
    for value, expected in ((projection_kernel(zero, B), 0.0), (subspace_overlap(zero, B), 0.0),
                            (chordal_distance(zero, B), 0.0), (geodesic_distance(zero, B), 0.0),
                            (projection_distance(zero, B), math.sqrt(3))):
        assert math.isfinite(value.item()) and abs(value.item() - expected) < 1e-12
    # Batch members of different rank: kernel/overlap still work (zero-padded bases), angles refuse.
    stack = torch.stack([A, B, zero.double()])
    overlaps = subspace_overlap(stack, B)
    assert torch.allclose(overlaps, torch.stack([subspace_overlap(m, B) for m in stack]), atol=1e-12)
    Q, rank = padded_orthonormal_basis(stack)
    assert rank.tolist() == [2, 3, 0] and Q.shape == (3, 7, 3)
    with pytest.raises(ValueError, match="ranks 0..3"):
        principal_angles(stack, B)


def test_bad_inputs_raise_value_error_naming_the_input() -> None:
    A = _rand(5, 2, seed=13)
    with pytest.raises(ValueError, match=r"\(5, 2\).*\(4, 2\)"):
        principal_angles(A, _rand(4, 2, seed=14))
    bad = A.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="B of shape"):
        subspace_overlap(A, bad)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="A of shape"):
        projection_kernel(bad, A)
    with pytest.raises(ValueError, match="matrix"):
        principal_angles(torch.ones(5), A)
    with pytest.raises(ValueError, match="do not broadcast"):
        projection_kernel(_rand(2, 5, 2), _rand(3, 5, 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_finiteness_by_one_sum_agrees_with_the_entrywise_check(dtype: torch.dtype) -> None:
    """all_finite (a finite sum proves every entry finite) against torch.isfinite(x).all() entry by entry: one
    NaN, +Inf, -Inf, +Inf with -Inf (whose sum is NaN), and finite entries whose sum overflows (the fallback
    to the entrywise check must accept them); check_matrix's one-line error on every non-finite case."""
    big = torch.finfo(dtype).max
    cases = {"finite": _rand(40, 30, seed=3).to(dtype), "overflowing sum": torch.full((6, 5), big, dtype=dtype)}
    for name, values in (("nan", [float("nan")]), ("+inf", [float("inf")]), ("-inf", [float("-inf")]),
                         ("+inf and -inf", [float("inf"), float("-inf")])):
        x = _rand(40, 30, seed=4).to(dtype)
        x.view(-1)[[7, 901][: len(values)]] = torch.tensor(values, dtype=dtype)
        cases[name] = x
    assert not bool(torch.isfinite(cases["overflowing sum"].sum()))  # the fallback is exercised
    for name, x in cases.items():
        expected = bool(torch.isfinite(x).all())
        assert all_finite(x) == expected, name
        if expected:
            check_matrix("W", x, where="test")
        else:
            with pytest.raises(ValueError, match=r"^test: W of shape \(40, 30\) contains NaN or Inf; clean the "
                                                 r"weights first$"):
                check_matrix("W", x, where="test")


def test_float32_input_gives_float64_angles_and_dtype_rank_cut() -> None:
    A = _rand(6, 3, seed=15)
    A32 = A.float()
    theta = principal_angles(A32, A32 @ _rand(3, 3, seed=16).float())
    assert theta.dtype == torch.float64 and theta.max().item() < 1e-5
    near = torch.cat([A, A[:, :1] + 1e-9 * _rand(6, 1, seed=17)], dim=1).float()  # rank 3 at float32 precision
    assert orthonormal_basis(near).shape == (6, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    A, B = _rand(4, 16, 3, seed=18), _rand(4, 16, 5, seed=19)
    for fn in (principal_angles, projection_kernel, subspace_overlap, geodesic_distance):
        gpu = fn(A.cuda(), B.cuda())
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), fn(A, B), atol=1e-10)
