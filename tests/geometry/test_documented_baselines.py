"""Every Haar baseline stated in docs/MATH.md §7 matches Monte Carlo, and the code's baseline functions return it.

The table in MATH.md is parsed (id, expression, dims); each id has a sampler below drawing the quantity for
independent Haar-random subspaces with the core functions; an id without a sampler, or a sampler without a row,
fails.  Tolerance: 5 Monte Carlo standard errors.  The prose of MATH.md, the evaluate module cards and the
generated reproduction report are checked for the Level-2 baseline written with C - 1 (the old mistake).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from hf_flag.geometry.angles import projection_kernel, subspace_overlap, thin_svd
from hf_flag.geometry.baselines import (composition_baseline, gl_kernel_dim_baseline, imbalance_haar_rms,
                                        intersection_baseline, intersection_soft_baseline, overlap_baseline,
                                        projection_kernel_moments, transport_baselines)
from hf_flag.geometry.collapse import level2_alignment
from hf_flag.geometry.flags import flag_relative_position, gl_invariant_kernel_dim
from hf_flag.geometry.heads import head_overlap_baseline
from hf_flag.geometry.pairs import imbalance_norm, pair_values_from_svd, transport_scores

ROOT = Path(__file__).resolve().parents[2]
MATH = ROOT / "docs" / "MATH.md"
N_DRAWS = 3000


def _table() -> dict[str, tuple[str, dict[str, int]]]:
    text = MATH.read_text(encoding="utf-8")
    section = text[text.index("## 7. Haar baselines"):]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("id", "---") or set(cells[0]) <= {"-"}:
            continue
        dims = {k: int(v) for k, v in (item.split("=") for item in cells[3].split(", "))}
        rows[cells[0]] = (cells[2], dims)
    return rows


def _frames(count: int, n: int, k: int, seed: int) -> torch.Tensor:
    G = torch.randn(count, n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def _gauss(count: int, *shape: int, seed: int) -> torch.Tensor:
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _overlap(p: int, q: int, n: int) -> torch.Tensor:
    return subspace_overlap(_frames(N_DRAWS, n, p, 1), _frames(N_DRAWS, n, q, 2), orthonormal=True)


def _projection_kernel(p: int, q: int, n: int) -> torch.Tensor:
    return projection_kernel(_frames(N_DRAWS, n, p, 3), _frames(N_DRAWS, n, q, 4), orthonormal=True)


def _head_overlap(r: int, r2: int, d: int) -> torch.Tensor:
    return subspace_overlap(_gauss(N_DRAWS, d, r, seed=5), _gauss(N_DRAWS, d, r2, seed=6))


def _transport(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return transport_scores(_gauss(N_DRAWS, n, n, seed=7), _gauss(N_DRAWS, n, n, seed=8), k)


def _intersection(i: int, j: int, n: int, *, soft: bool = False, draws: int = 20) -> torch.Tensor:
    """dim(F_i cap G_j) (``soft``: sum cos^2 of their angles) of the singular flags of two Gaussian n x n weights
    (generic position; Haar-distributed singular vectors, independent)."""
    values = []
    for s in range(draws):
        W_l, W_next = _gauss(1, n, n, seed=100 + s)[0], _gauss(1, n, n, seed=200 + s)[0]
        pos = flag_relative_position(W_l, W_next, tau=1e-6, gap_ratio=1.0)
        matrix = pos.soft_matrix if soft else pos.rank_matrix
        values.append(float(matrix[pos.cuts_left.index(i), pos.cuts_right.index(j)]))
    return torch.tensor(values, dtype=torch.float64)


def _imbalance_sq(ra: int, rb: int, n: int) -> torch.Tensor:
    """||P_A - O P_B O^T||_F^2 for rank-ra / rank-rb projectors, O Haar: the squared imbalance of W_next = P_A's
    frame^T and W_l = O P_B's frame (MATH.md §2)."""
    W_l = _frames(N_DRAWS, n, rb, 15)
    W_next = torch.eye(n, dtype=torch.float64)[:ra].expand(N_DRAWS, ra, n)
    return imbalance_norm(W_l, W_next).square()


def _gl_kernel_dim(rl: int, rn: int, n: int) -> torch.Tensor:
    """dim(range W_l cap ker W_next) for Gaussian W_l (n x rl) and W_next (rn x n): Haar relative position."""
    return torch.tensor([float(gl_invariant_kernel_dim(_gauss(1, n, rl, seed=400 + s)[0],
                                                       _gauss(1, rn, n, seed=500 + s)[0])) for s in range(30)],
                        dtype=torch.float64)


def _composition(d: int) -> torch.Tensor:
    """score^2 = ||L R||_F^2 / (||L||_F^2 ||R||_F^2) for Haar-rotated factors (MATH.md §6)."""
    L = _frames(N_DRAWS, d, d, 9) @ torch.diag_embed(torch.rand(N_DRAWS, d, dtype=torch.float64) + 0.5)
    R = torch.diag_embed(torch.rand(N_DRAWS, d, dtype=torch.float64) + 0.5) @ _frames(N_DRAWS, d, d, 10).mT
    num = torch.linalg.matrix_norm(L @ R).square()
    return num / (torch.linalg.matrix_norm(L).square() * torch.linalg.matrix_norm(R).square())


def _range_overlap(r_l: int, r_n: int, n: int) -> torch.Tensor:
    W_l = _frames(N_DRAWS, n, r_l, 11) @ _gauss(N_DRAWS, r_l, r_l, seed=12)
    W_next = _gauss(N_DRAWS, r_n, r_n, seed=13) @ _frames(N_DRAWS, n, r_n, 14).mT
    return pair_values_from_svd(W_l, W_next, thin_svd(W_l), thin_svd(W_next)).range_overlap


def _level2_error(C: int, p: int) -> torch.Tensor:
    values = []
    for s in range(400):
        W, means = _gauss(1, C, p, seed=300 + s)[0], _gauss(1, C, p, seed=700 + s)[0]
        values.append(level2_alignment(W, means)["level2_subspace_error"])
    return torch.tensor(values, dtype=torch.float64)


SAMPLERS = {
    "overlap": lambda d: _overlap(d["p"], d["q"], d["n"]),
    "projection_kernel": lambda d: _projection_kernel(d["p"], d["q"], d["n"]),
    "head_overlap": lambda d: _head_overlap(d["r"], d["r2"], d["d"]),
    "subspace_score": lambda d: _transport(d["k"], d["n"])[0],
    "basis_score": lambda d: _transport(d["k"], d["n"])[1],
    "intersection": lambda d: _intersection(d["i"], d["j"], d["n"]),
    "composition": lambda d: _composition(d["d"]),
    "range_overlap": lambda d: _range_overlap(d["r_l"], d["r_n"], d["n"]),
    "level2_error": lambda d: _level2_error(d["C"], d["p"]),
    "imbalance_sq": lambda d: _imbalance_sq(d["ra"], d["rb"], d["n"]),
    "intersection_soft": lambda d: _intersection(d["i"], d["j"], d["n"], soft=True, draws=400),
    "gl_kernel_dim": lambda d: _gl_kernel_dim(d["rl"], d["rn"], d["n"]),
}

#: the code's own baseline for each documented row (None: no function, the formula is the reference)
CODE = {
    "overlap": lambda d: overlap_baseline(d["p"], d["q"], d["n"]),
    "projection_kernel": lambda d: projection_kernel_moments(d["p"], d["q"], d["n"])[0],
    "head_overlap": lambda d: head_overlap_baseline(d["r"], d["r2"], d["d"]),
    "subspace_score": lambda d: transport_baselines(d["k"], d["n"])[0],
    "basis_score": lambda d: transport_baselines(d["k"], d["n"])[1],
    "intersection": lambda d: intersection_baseline(d["i"], d["j"], d["n"]),
    "composition": lambda d: composition_baseline(d["d"]) ** 2,
    "range_overlap": lambda d: float(_range_overlap_baseline(d)),
    "level2_error": lambda d: level2_alignment(_gauss(1, d["C"], d["p"], seed=1)[0],
                                               _gauss(1, d["C"], d["p"], seed=2)[0])["level2_subspace_error_baseline"],
    "imbalance_sq": lambda d: imbalance_haar_rms(d["ra"], d["ra"], d["rb"], d["rb"], d["n"]).item() ** 2,
    "intersection_soft": lambda d: intersection_soft_baseline(d["i"], d["j"], d["n"]),
    "gl_kernel_dim": lambda d: gl_kernel_dim_baseline(d["rl"], d["rn"], d["n"]),
}


def _range_overlap_baseline(d: dict) -> float:
    W_l, W_next = _gauss(1, d["n"], d["r_l"], seed=1)[0], _gauss(1, d["r_n"], d["n"], seed=2)[0]
    return float(pair_values_from_svd(W_l, W_next, thin_svd(W_l), thin_svd(W_next)).range_overlap_baseline)


def test_table_and_samplers_cover_each_other():
    assert set(_table()) == set(SAMPLERS) == set(CODE)


@pytest.mark.parametrize("key", sorted(SAMPLERS))
def test_documented_baseline_matches_monte_carlo_and_code(key):
    expression, dims = _table()[key]
    stated = eval(expression, {"__builtins__": {}, "max": max, "min": min}, dict(dims))  # noqa: S307 (our own doc)
    samples = SAMPLERS[key](dims).to(torch.float64)
    se = samples.std().item() / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - stated) <= 5 * se + 1e-12, (key, samples.mean().item(), stated)
    assert CODE[key](dims) == pytest.approx(stated, rel=1e-12, abs=1e-15)


def test_no_level2_baseline_written_with_c_minus_1():
    paths = [MATH, ROOT / "docs" / "reproduction.md", *sorted((ROOT / "hf_flag" / "integrations" /
                                                              "evaluate_modules").glob("*/README.md"))]
    for path in paths:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"1 - 9/64|1 - \(C ?- ?1\) ?/ ?p", text.replace("not 1 - (C-1)/p", "")), path


def test_projection_kernel_variance_matches_monte_carlo():
    """The code's Var[PK] (the overlap z-score's spread) against the sample variance of the same Haar draws, within
    5 standard errors of a sample variance (sqrt((m4 - var^2) / N))."""
    _, dims = _table()["projection_kernel"]
    samples = _projection_kernel(dims["p"], dims["q"], dims["n"]).to(torch.float64)
    centred = samples - samples.mean()
    var, m4 = centred.square().mean().item(), centred.pow(4).mean().item()
    se = math.sqrt((m4 - var * var) / samples.numel())
    stated = projection_kernel_moments(dims["p"], dims["q"], dims["n"])[1]
    assert abs(var - stated) <= 5 * se, (var, stated, se)
