"""Core geometry vs the straightforward dense implementation, side by side in one run (BENCHMARKS.md).

MLP pairs (W_l = up/in projection d_ff x d, W_next = down/out projection d x d_ff, random float64 weights):
  core  = hf_flag.geometry.pairs: commutator_ratio (Gram-factor trace form), relative_imbalance (Gram factors),
          transport_scores (thin SVDs);
  dense = numpy/scipy: A = W_next^T W_next and B = W_l W_l^T (d_ff x d_ff), ||AB - BA||, ||A - B||, full SVDs
          (scipy.linalg.svd, full_matrices=True) and T = V^T U.
Head overlaps (32 heads, d = 4096, d_head = 128): core = hf_flag.geometry.heads.head_overlap_matrix (batched
  orthonormalisation + one matmul) vs a loop of scipy.linalg.subspace_angles over all head pairs
  (overlap = sum cos^2 / d_head).

Prints, per case, the seconds of each side, their ratio and the max relative difference of the values.

    .venv/bin/python benchmarks/bench_core.py            # GPT-2 (768 x 3072), Llama-7B (4096 x 11008), heads
    .venv/bin/python benchmarks/bench_core.py --quick    # GPT-2 only, head loop on a 128-pair sample, scaled
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from hf_flag.geometry.heads import head_overlap_matrix
from hf_flag.geometry.pairs import commutator_ratio, relative_imbalance, transport_scores


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _dense_commutator(W_l: np.ndarray, W_next: np.ndarray) -> float:
    A, B = W_next.T @ W_next, W_l @ W_l.T
    kappa = np.linalg.norm(A @ B - B @ A) / (np.linalg.norm(A) * np.linalg.norm(B))
    return float(kappa)


def _dense_imbalance(W_l: np.ndarray, W_next: np.ndarray) -> float:
    A, B = W_next.T @ W_next, W_l @ W_l.T
    return float(np.linalg.norm(A - B) / (np.linalg.norm(A) + np.linalg.norm(B)))


def _dense_transport(W_l: np.ndarray, W_next: np.ndarray, k: int) -> np.ndarray:
    U = scipy.linalg.svd(W_l, full_matrices=True)[0]
    V = scipy.linalg.svd(W_next, full_matrices=True)[2].T
    T = (V.T @ U)[:k, :k]
    return np.array([np.sum(T**2) / k, np.sum(np.diag(T) ** 2) / k])


def _row(name: str, t_core: float, t_dense: float, rel: float, note: str = "") -> None:
    print(f"{name:<44} core {t_core:9.3f} s   dense {t_dense:9.3f} s   ratio {t_dense / t_core:7.1f}x   "
          f"max rel diff {rel:.1e}{note}", flush=True)


def bench_mlp(label: str, d: int, d_ff: int, k: int, repeats: int, only: set[str]) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    W_l = torch.randn(d_ff, d, generator=g, dtype=torch.float64) / d**0.5
    W_next = torch.randn(d, d_ff, generator=g, dtype=torch.float64) / d_ff**0.5
    nl, nn = W_l.numpy(), W_next.numpy()
    cases = [
        ("commutator kappa", lambda: commutator_ratio(W_l, W_next).item(), lambda: _dense_commutator(nl, nn)),
        ("relative imbalance", lambda: relative_imbalance(W_l, W_next).item(), lambda: _dense_imbalance(nl, nn)),
        (f"transport scores (k={k})", lambda: torch.stack(transport_scores(W_l, W_next, k)).numpy(),
         lambda: _dense_transport(nl, nn, k)),
    ]
    total_core = total_dense = 0.0
    for name, core, dense in cases:
        if name.split()[0] not in only:
            continue
        t_c, v_c = _timed(core, repeats)
        t_d, v_d = _timed(dense, 1 if d_ff > 4096 else repeats)
        total_core, total_dense = total_core + t_c, total_dense + t_d
        _row(f"{label} {name}", t_c, t_d, _rel(v_c, v_d))
    _row(f"{label} sum of the cases above", total_core, total_dense, 0.0)
    return total_core, total_dense


def bench_heads(n_heads: int, d: int, d_head: int, sample_pairs: int | None) -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n_heads, d, d_head, generator=g, dtype=torch.float64)
    Y = torch.randn(n_heads, d, d_head, generator=g, dtype=torch.float64)
    t_c, ov = _timed(lambda: head_overlap_matrix(X, Y).numpy(), 1)
    pairs = [(h, j) for h in range(n_heads) for j in range(n_heads)]
    if sample_pairs is not None:
        pairs = pairs[:: max(1, len(pairs) // sample_pairs)][:sample_pairs]
    Xn, Yn = X.numpy(), Y.numpy()

    def loop() -> np.ndarray:
        return np.array([np.sum(np.cos(scipy.linalg.subspace_angles(Xn[h], Yn[j])) ** 2) / d_head
                         for h, j in pairs])

    t_d, ref = _timed(loop, 1)
    scale = n_heads * n_heads / len(pairs)
    note = "" if scale == 1 else f"  (dense timed on {len(pairs)} pairs, x{scale:.0f})"
    _row(f"heads {n_heads}x{n_heads} overlaps d={d} dh={d_head}", t_c, t_d * scale,
         _rel(np.array([ov[h, j] for h, j in pairs]), ref), note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 shapes only, sampled head loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="commutator,relative,transport,heads",
                        help="comma-separated subset of: commutator, relative (imbalance), transport, heads")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    only = set(args.only.split(","))
    bench_mlp("warm-up 64x256", 64, 256, 8, 1, only)  # thread pools and BLAS/LAPACK initialisation, both sides
    bench_mlp("GPT-2 MLP 768x3072", 768, 3072, 64, args.repeats, only)
    if not args.quick:
        bench_mlp("Llama-7B MLP 4096x11008", 4096, 11008, 128, 1, only)
    if "heads" in only:
        bench_heads(32, 4096, 128, 128 if args.quick else None)


if __name__ == "__main__":
    main()
