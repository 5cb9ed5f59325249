"""The default report's pair values at Llama-7B MLP shapes: the previous routes against today's, side by side in one
run, CPU seconds (``time.process_time``) on one thread (BENCHMARKS.md).

Weights: bf16 numbers held in float32 (a bf16 checkpoint loaded at the compute precision), ``W_up``, ``W_gate``
(d_ff x d) and ``W_down`` (d x d_ff), Gaussian with a flat-ish spectrum (full rank at the bf16 cut), d = 4096,
d_ff = 11008 (``--scale s`` divides both).

(a) the reading of the residual pair (does W_down or W_up have rank d at the §1 cut?): ``torch.linalg.matrix_rank``
    of both weights (before) vs ``gram_cut`` of the d x d Grams kappa already forms, with ``lambda_max`` from the
    partial SVD's sigma_1 (now; the Grams' cost counted in (c)).
(b) range_overlap of the mlp pair (up -> down): eigendecompositions of both Grams with pseudo-inverse products and
    C recomputed (before) vs ``range_overlap_from_grams`` with the shared C and the Cholesky factors of the shared
    cuts (now; the cuts' cost counted here, once per weight, as the report computes them).
(c) the products with the hidden dim: the three Grams and C = W_down W_up in plain float32 vs storage-exact bf16
    inputs with float32 accumulation (``storage_exact_matmul``), with the relative difference to float64.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pairs.py            # 7B shapes
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pairs.py --scale 4  # quick
"""
from __future__ import annotations

import argparse
import time

import torch

from hf_flag.geometry.angles import default_rtol
from hf_flag.geometry.pairs import gram_cut, pair_product, range_overlap_from_grams, weight_gram

BF16_EPS = torch.finfo(torch.bfloat16).eps


def timed(fn):
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def plain_range_overlap(W_l, W_next, rtol):
    """The previous route: eigh of both Grams, pseudo-inverses formed, C recomputed (float32 Grams)."""
    def pinv(G, rel):
        lam, V = torch.linalg.eigh(G)
        keep = lam > lam[..., -1:] * max(rel * rel, G.shape[-1] * torch.finfo(G.dtype).eps)
        w = torch.where(keep, 1.0 / lam.clamp_min(torch.finfo(lam.dtype).tiny), torch.zeros_like(lam))
        return (V * w.unsqueeze(-2)) @ V.mT, keep.sum(-1)

    (Gq, r_l), (Gp, r_n) = pinv(W_l.mT @ W_l, rtol[0]), pinv(W_next @ W_next.mT, rtol[1])
    C = W_next @ W_l
    return ((Gp @ C) * (C @ Gq)).sum((-2, -1), dtype=torch.float64) / torch.minimum(r_l, r_n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1, help="divide d = 4096 and d_ff = 11008 by this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d, d_ff = 4096 // args.scale, 11008 // args.scale
    g = torch.Generator().manual_seed(0)
    up, gate = (torch.randn(1, d_ff, d, generator=g).bfloat16().float() for _ in range(2))
    down = torch.randn(1, d, d_ff, generator=g).bfloat16().float()
    rtol_up, rtol_down = default_rtol(up, BF16_EPS), default_rtol(down, BF16_EPS)
    print(f"d = {d}, d_ff = {d_ff}, one thread, CPU seconds; torch {torch.__version__}")

    # (c) products
    plain = {}
    for name, fn in (("gram down rows", lambda: down @ down.mT), ("gram up cols", lambda: up.mT @ up),
                     ("C = down up", lambda: down @ up)):
        plain[name] = timed(fn)
    fast = {"gram down rows": timed(lambda: weight_gram(down, "rows", dtype=torch.float32)),
            "gram up cols": timed(lambda: weight_gram(up, "cols", dtype=torch.float32)),
            "C = down up": timed(lambda: pair_product(up, down, torch.float32))}
    exact = {"gram down rows": down.double() @ down.double().mT, "gram up cols": up.double().mT @ up.double(),
             "C = down up": down.double() @ up.double()}
    print("(c) product              plain   exact-bf16  ratio   rel.err plain / exact-bf16 vs float64")
    for name in plain:
        ref = exact[name]
        err = [float(torch.linalg.matrix_norm(x[1].double() - ref) / torch.linalg.matrix_norm(ref))
               for x in (plain[name], fast[name])]
        print(f"    {name:18s} {plain[name][0]:7.2f} {fast[name][0]:10.2f} {plain[name][0] / fast[name][0]:7.2f}x"
              f"   {err[0]:.1e} / {err[1]:.1e}")
    G_down, G_up, C = fast["gram down rows"][1], fast["gram up cols"][1], fast["C = down up"][1]
    del exact

    # (a) the reading of the residual pair
    t_rank, ranks = timed(lambda: [int(torch.linalg.matrix_rank(W, rtol=r)) for W, r in
                                   ((down, rtol_down), (up, rtol_up))])
    tops = [torch.linalg.matrix_norm(W, 2) for W in (down, up)]  # the partial SVD's sigma_1 in the report
    t_cut, cuts = timed(lambda: [gram_cut(G, r, top=t) for G, r, t in ((G_down, rtol_down, tops[0]),
                                                                        (G_up, rtol_up, tops[1]))])
    assert [r == d for r in ranks] == [bool(c.full) for c in cuts]
    print(f"(a) reading, 2 weights   matrix_rank {t_rank:7.2f}   gram_cut {t_cut:6.2f}   "
          f"ratio {t_rank / t_cut:6.1f}x   (rank d: {[r == d for r in ranks]})")

    # (b) range_overlap of the mlp pair
    t_old, old = timed(lambda: plain_range_overlap(up, down, (rtol_up, rtol_down)))
    t_new, (new, _) = timed(lambda: range_overlap_from_grams(up, down, rtol=(rtol_up, rtol_down), gram_l=G_up,
                                                              gram_next=G_down, product=C,
                                                              cuts=(cuts[1], cuts[0])))
    print(f"(b) range_overlap        eigh+pinv {t_old:7.2f}   Cholesky {t_new:6.2f} (+ cuts {t_cut:.2f} shared)   "
          f"ratio {t_old / (t_new + t_cut):6.1f}x   values {float(old):.7f} / {float(new):.7f}")


if __name__ == "__main__":
    main()
