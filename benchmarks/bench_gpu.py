"""One prepared GPU check: the default report of a Llama-7B-shaped model on one CUDA device, under 5 minutes.

Writes a ``--layers``-block Llama checkpoint with Llama-7B shapes (d = 4096, d_ff = 11008, 32 query / 8 key-value
heads, bf16, random weights with spikes; ``bench_weightwatcher.write_llama_checkpoint``) to a temporary folder,
then times on ``cuda``: (1) the default report of every layer with adjacent composition, after a one-layer warm-up
(CUDA context, kernels); (2) ``full=True`` of layer 0 only (today's all-vectors analysis, float64).  Prints the
per-layer time, its extrapolation to 32 layers, peak device memory (``torch.cuda.max_memory_allocated``) and the
largest certificate residual; writes the figures as JSON to ``$OUT/bench_gpu.json`` when ``OUT`` is set.

    python benchmarks/bench_gpu.py --layers 4          # ~1.6 GB checkpoint; budget: < 5 minutes on one H200

Runs from a checkout with torch, safetensors, numpy and tqdm installed (hf_flag is imported from the checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # hf_flag from this checkout where it is not installed
from bench_weightwatcher import write_llama_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import torch

    from hf_flag.analysis.api import analyze

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device; run it on the GPU machine")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    out: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                 "layers": args.layers, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = write_llama_checkpoint(Path(tmp) / "llama7b", args.layers)
        out["write_s"] = time.perf_counter() - t
        analyze(path, device=args.device, layers=[0], diagnostics=["mlp", "vo"], composition="none")  # warm-up
        sync()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        report = analyze(path, device=args.device, composition="adjacent")
        sync()
        out["default_s"] = time.perf_counter() - t
        out["default_per_layer_s"] = out["default_s"] / args.layers
        out["default_32_layers_min"] = 32 * out["default_per_layer_s"] / 60
        out["rows"] = len(report.rows)
        out["dtype"] = report.params["dtype"]
        residuals = [r.values[k] for r in report.rows for k in ("svd_residual_in", "svd_residual_out")
                     if r.values.get(k) is not None]
        out["max_svd_residual"] = max(residuals, default=None)
        out["windows"] = sorted({(r.kind, r.values.get("window_in"), r.values.get("window_out"))
                                 for r in report.rows if "window_in" in r.values and r.kind != "vo"})
        if args.device.startswith("cuda"):
            out["default_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        t = time.perf_counter()
        analyze(path, device=args.device, layers=[0], composition="none", full=True)
        sync()
        out["full_layer0_s"] = time.perf_counter() - t
    print(json.dumps(out, indent=1, default=str))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_gpu.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
