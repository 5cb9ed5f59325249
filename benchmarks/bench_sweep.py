"""Sweep scaling and harness overhead, measured side by side in one run.

1. Scaling: the same sweep of N synthetic models as one process (``python -m harness.sweep``) and as two
   (``accelerate launch --multi_gpu --num_processes 2 -m harness.sweep ... --device cpu``: a torchrun launch whose
   processes join a gloo group on CPU), each process single-threaded (``OMP_NUM_THREADS=1``), fresh output folders.
   Reported: wall(2 processes) / wall(1 process); ideal 0.5 (+ the second launch's start-up).
2. Overhead: in one process, the bare ``analyze`` calls on the same models vs ``harness.sweep.main`` on them
   (markers, atomic JSON, dataset, CSV/Markdown, plots, cards), alternating, best of ``--repeats``.
   Reported: wall(sweep) / wall(bare analyze) - 1, and, free of load drift between the two, the sweep's wall time
   over the analyze time measured inside that same sweep (each report's ``params["elapsed_s"]``).

Run:  .venv/bin/python benchmarks/bench_sweep.py [--models 4] [--repeats 2] [--diagnostics ...] [--composition adjacent]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_models(root: Path, n: int, scale: int = 1, layers: int = 4) -> list[str]:
    """``n`` random GPT-2 / Llama checkpoints of a few sizes (so largest-first round robin has work to balance);
    widths ``scale * (128, 192, 256)``, ``layers`` blocks each."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    paths = []
    for i in range(n):
        width = scale * (128, 192, 256)[i % 3]
        if i % 2:
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=3 * width, vocab_size=64,
                                                 bos_token_id=0, eos_token_id=0))
        else:
            model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=64, n_positions=32,
                                               bos_token_id=0, eos_token_id=0))
        path = root / f"model{i}"
        model.save_pretrained(path, safe_serialization=True)
        paths.append(str(path))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_subprocess(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--diagnostics", nargs="+", default=None, help="default: all")
    parser.add_argument("--composition", default="adjacent")
    parser.add_argument("--scale", type=int, default=1, help="width multiplier of the synthetic models")
    parser.add_argument("--layers", type=int, default=4, help="blocks per synthetic model")
    args = parser.parse_args()

    import torch

    from harness import sweep
    from hf_flag.analyze import analyze

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = make_models(tmp / "models", args.models, args.scale, args.layers)
        common = [*models, "--composition", args.composition]
        if args.diagnostics:
            common += ["--diagnostics", *args.diagnostics]

        # 1. scaling: one process vs two, fresh output folders
        one = timed_subprocess([sys.executable, "-m", "harness.sweep", *common, "--out", str(tmp / "p1")])
        two = timed_subprocess([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(free_port()), "-m", "harness.sweep", *common, "--out",
                                str(tmp / "p2"), "--device", "cpu"])

        # per-rank analyze seconds of the 2-process run: how evenly largest-first round robin split the work
        per_rank = [0.0, 0.0]
        for run in (tmp / "p2" / "runs").iterdir():
            rank = json.loads((run / "started.json").read_text())["rank"]
            per_rank[rank] += json.loads((run / "report.json").read_text())["params"]["elapsed_s"]

        # 2. overhead: bare analyze calls vs the full harness, alternating, in this process
        bare, harness, inside = [], [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            for m in models:
                analyze(m, device="cpu", diagnostics=args.diagnostics, composition=args.composition, name=m)
            bare.append(time.perf_counter() - start)
            start = time.perf_counter()
            code = sweep.main([*common, "--out", str(tmp / f"inproc{r}")])
            harness.append(time.perf_counter() - start)
            if code != 0:
                raise SystemExit(f"in-process sweep exited with {code}")
            # the same run's own analyze time (params.elapsed_s of each report): overhead free of load drift
            inside.append(sum(json.loads(p.read_text())["params"]["elapsed_s"]
                              for p in (tmp / f"inproc{r}" / "runs").glob("*/report.json")))

    print(f"models: {args.models} synthetic GPT-2/Llama (d {128 * args.scale}-{256 * args.scale}, {args.layers} layers), diagnostics "
          f"{args.diagnostics or 'all'}, composition {args.composition}, OMP_NUM_THREADS=1 per process")
    print(f"1 process: {one:.1f} s   2 processes: {two:.1f} s   ratio 2/1: {two / one:.2f} (ideal 0.50)")
    print(f"2-process work split: rank 0 {per_rank[0]:.1f} s, rank 1 {per_rank[1]:.1f} s of analyze -> "
          f"bound with 2 free cores: {max(per_rank) / sum(per_rank):.2f} of the 1-process analyze time")
    print(f"bare analyze: {min(bare):.2f} s   harness sweep: {min(harness):.2f} s   "
          f"overhead: {100 * (min(harness) / min(bare) - 1):.1f} %")
    best = min(range(len(harness)), key=harness.__getitem__)
    print(f"same run: analyze {inside[best]:.2f} s of {harness[best]:.2f} s -> harness overhead "
          f"{100 * (harness[best] / inside[best] - 1):.1f} % (markers, JSON, dataset, CSV/Markdown, plots, cards)")


if __name__ == "__main__":
    main()
