"""Peak memory of all-pairs composition scores: tiled trace form vs the naive broadcast (BENCHMARKS.md).

All layer pairs l < l' and all head pairs, kinds q, k, v, random weights at GPT-2-small (12 layers, 12 heads,
d = 768) and GPT-2-medium (24 layers, 16 heads, d = 1024) shapes, d_head = 64, computed in float64 by
``hf_flag.geometry.composition.composition_scores`` one layer pair and kind at a time.

Memory is measured as the peak above the level just before the computation (weights already resident):
  * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
  * CPU: resident set size sampled every 1 ms from /proc/self/statm by a background thread (torch's CPU
    allocations are invisible to tracemalloc).
The naive broadcast (every ``L_h = W_V W_O`` and ``R_h' = W_Q W_K^T`` as d x d matrices and all products
``L_h R_h'`` at once) is not run for the whole model: its size is computed.  It is run for one layer pair at
GPT-2-small (0.63 GiB of products) to check the values and measure its peak side by side.

    .venv/bin/python benchmarks/bench_composition_memory.py           # small and medium
    .venv/bin/python benchmarks/bench_composition_memory.py --quick   # small only
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from hf_flag.geometry.composition import composition_scores

GB, MiB = 1024**3, 1024**2
SHAPES = {"gpt2-small": (12, 12, 768, 64), "gpt2-medium": (24, 16, 1024, 64)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict whose ``"peak"`` (bytes above the starting level) is filled in on exit."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - start
        return
    start, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak"] = max(peak[0], _rss()) - start


def _weights(n_layers: int, n_heads: int, d: int, dh: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    shapes = {"Q": (d, dh), "K": (d, dh), "V": (d, dh), "O": (dh, d)}
    return {k: torch.randn(n_layers, n_heads, *s, generator=g, device=device, dtype=torch.float32) / d**0.5
            for k, s in shapes.items()}


def layer_pairs(n_layers: int, adjacent_only: bool) -> list[tuple[int, int]]:
    return [(l, m) for l in range(n_layers) for m in range(l + 1, n_layers) if not adjacent_only or m == l + 1]


def all_pairs_tiled(W: dict[str, torch.Tensor], pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Scores (layer, layer', kind, head, head') for the given layer pairs; other entries stay 0."""
    n_layers, n_heads = W["Q"].shape[:2]
    out = torch.zeros(n_layers, n_layers, 3, n_heads, n_heads, dtype=torch.float64, device=W["Q"].device)
    for l, m in pairs:
        src = (W["V"][l], W["O"][l])
        out[l, m, 0] = composition_scores(*src, W["Q"][m], W["K"][m], kind="q")
        out[l, m, 1] = composition_scores(*src, W["Q"][m], W["K"][m], kind="k")
        out[l, m, 2] = composition_scores(*src, W["V"][m], W["O"][m].mT, kind="v")
    return out


def naive_layer_pair(W: dict[str, torch.Tensor], l: int, m: int) -> torch.Tensor:
    """Q-composition of one layer pair by broadcasting every d x d product (H, H', d, d) at once."""
    L = W["V"][l].double() @ W["O"][l].double()
    R = W["Q"][m].double() @ W["K"][m].double().mT
    prod = L[:, None] @ R[None, :]
    return torch.linalg.matrix_norm(prod) / (torch.linalg.matrix_norm(L)[:, None] * torch.linalg.matrix_norm(R))


def naive_bytes(n_layers: int, n_heads: int, d: int, per_layer_pair: bool) -> int:
    """float64 bytes of the naive broadcast products L_h R_h' (one kind)."""
    pairs = 1 if per_layer_pair else n_layers * (n_layers - 1) // 2
    return pairs * n_heads * n_heads * d * d * 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2-small only")
    parser.add_argument("--shapes", default="gpt2-small,gpt2-medium", help="comma-separated subset of "
                        "gpt2-small, gpt2-medium (run one per process for a clean RSS peak)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--adjacent-only", default="", help="comma-separated shapes scored on adjacent layer pairs "
                        "only (l, l+1), e.g. gpt2-medium; the peak is per tile, the full time is extrapolated")
    args = parser.parse_args()
    device = torch.device(args.device)
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "RSS sampled every 1 ms"
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, memory: {how}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    for name in ["gpt2-small"] if args.quick else args.shapes.split(","):
        n_layers, n_heads, d, dh = SHAPES[name]
        W = _weights(n_layers, n_heads, d, dh, device)
        pairs = layer_pairs(n_layers, name in args.adjacent_only.split(","))
        t0 = time.perf_counter()
        with peak_memory(device) as mem:
            scores = all_pairs_tiled(W, pairs)
        seconds = time.perf_counter() - t0
        n_scores = 3 * len(pairs) * n_heads * n_heads
        n_all = 3 * n_layers * (n_layers - 1) // 2 * n_heads * n_heads
        tile = (d // dh) * dh * dh * 8
        print(f"{name}: {n_scores} of {n_all} scores ({len(pairs)} layer pairs) in {seconds:.1f} s "
              f"(all pairs: ~{seconds * n_all / n_scores:.0f} s); tiled peak {mem['peak'] / MiB:.1f} MiB "
              f"(one tile of M = W_O W_Q: {tile / MiB:.2f} MiB); naive broadcast would need "
              f"{naive_bytes(n_layers, n_heads, d, True) / GB:.2f} GiB per layer pair and kind, "
              f"{3 * naive_bytes(n_layers, n_heads, d, False) / GB:.1f} GiB for all pairs and kinds at once; "
              f"mean q-score^2 * d = {scores[:, :, 0].square().sum().item() / (n_scores / 3) * d:.3f} "
              f"(Haar: 1)", flush=True)
        if name == "gpt2-small":
            with peak_memory(device) as mem_naive:
                naive = naive_layer_pair(W, 0, 1)
            with peak_memory(device) as mem_one:
                tiled = composition_scores(W["V"][0], W["O"][0], W["Q"][1], W["K"][1], kind="q")
            err = ((tiled - naive).abs() / naive).max().item()
            print(f"{name} one layer pair, kind q: naive peak {mem_naive['peak'] / GB:.3f} GiB vs tiled "
                  f"{mem_one['peak'] / MiB:.1f} MiB; max rel diff {err:.1e}", flush=True)
        del W, scores


if __name__ == "__main__":
    main()
