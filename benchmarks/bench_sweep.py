"""Sweep scaling and harness overhead, on fresh processes as a user runs them.

Synthetic GPT-2/Llama checkpoints (default ``--scale 2 --layers 4``: d 256-512, about 2 s of analysis per model on
one thread, so that analysis dominates as it does on real models while a run stays within a few minutes on two
cores), all diagnostics, ``composition adjacent``, one thread per process (``OMP_NUM_THREADS=1``). Each repeat runs,
one after the other, with fresh output folders:

* bare: a fresh interpreter that calls ``analyze`` on every model and nothing else (the reference);
* 1 process: ``python -m hf_flag.harness.sweep MODELS --out DIR``;
* 2 processes: ``accelerate launch --multi_gpu --num_processes 2 -m hf_flag.harness.sweep ... --device cpu`` (a torchrun
  launch whose processes join a gloo group on CPU).

Reported, each wall time the best of ``--repeats``:

1. Scaling: wall(2 processes) / wall(1 process); ideal 0.5 (plus the launcher's start-up), reachable only with two
   free cores, so the load average is printed too.  The 2-process run's per-rank analyze seconds show how evenly
   largest-first round robin split the work.
2. Overhead: wall(1 process) / wall(bare) - 1, all the harness adds to the same work: its imports (accelerate,
   matplotlib, datasets, and their teardown at exit), markers and report JSON, plots, dataset, CSV/Markdown, cards.
   Less sensitive to load drift between runs: the harness's own seconds in one sweep, its wall minus its analyze
   time (the reports' ``params.elapsed_s``) minus the interpreter start-up and exit that the bare run also pays (its
   wall minus its analyze time), as a share of the sweep's analyze time.

Run:  .venv/bin/python benchmarks/bench_sweep.py [--models 6] [--repeats 2] [--scale 2] [--layers 4]
      [--diagnostics ...] [--composition adjacent]
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BARE = r"""
import json, sys
from hf_flag.analysis.api import analyze
kwargs = json.loads(sys.argv[1])
analyze_s = 0.0
for model in sys.argv[2:]:
    analyze_s += analyze(model, device="cpu", name=model, **kwargs).params["elapsed_s"]
print(json.dumps({"analyze_s": analyze_s}))
"""


@dataclass(frozen=True)
class Run:
    """One timed command: its wall seconds and the analyze seconds measured inside each of its processes."""

    wall: float
    analyze_by_rank: tuple[float, ...]

    @property
    def analyze(self) -> float:
        return sum(self.analyze_by_rank)


def make_models(root: Path, n: int, scale: int = 2, layers: int = 4) -> list[str]:
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


def timed_subprocess(cmd: list[str]) -> tuple[float, str]:
    """``(wall seconds, stdout)`` of ``cmd`` run single-threaded and offline; exits if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def run_bare(models: list[str], kwargs: dict) -> Run:
    """``analyze`` on every model in a fresh interpreter; analyze time = sum of its reports' ``elapsed_s``."""
    wall, stdout = timed_subprocess([sys.executable, "-c", BARE, json.dumps(kwargs), *models])
    return Run(wall, (json.loads(stdout.strip().splitlines()[-1])["analyze_s"],))


def run_sweep(common: list[str], out: Path, processes: int) -> Run:
    """A fresh sweep into ``out`` with 1 or 2 processes; analyze times from its reports' ``elapsed_s``."""
    if processes == 1:
        cmd = [sys.executable, "-m", "hf_flag.harness.sweep", *common, "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "-m", "hf_flag.harness.sweep", *common, "--out", str(out), "--device", "cpu"]
    wall, _ = timed_subprocess(cmd)
    return Run(wall, rank_analyze_seconds(out))


def rank_analyze_seconds(out: Path) -> tuple[float, ...]:
    """Analyze seconds of each rank of the sweep in ``out`` (from its run folders' markers and reports)."""
    per_rank: dict[int, float] = {}
    for run in (out / "runs").iterdir():
        rank = json.loads((run / "started.json").read_text())["rank"]
        elapsed = json.loads((run / "report.json").read_text())["params"]["elapsed_s"]
        per_rank[rank] = per_rank.get(rank, 0.0) + elapsed
    return tuple(per_rank[r] for r in sorted(per_rank))


def load() -> str:
    """The 1, 5 and 15 minute load averages, for the figures' context."""
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--diagnostics", nargs="+", default=None, help="default: all")
    parser.add_argument("--composition", default="adjacent")
    parser.add_argument("--scale", type=int, default=2, help="width multiplier of the synthetic models")
    parser.add_argument("--layers", type=int, default=4, help="blocks per synthetic model")
    args = parser.parse_args()

    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = make_models(tmp / "models", args.models, args.scale, args.layers)
        common = [*models, "--composition", args.composition]
        if args.diagnostics:
            common += ["--diagnostics", *args.diagnostics]
        kwargs = {"diagnostics": args.diagnostics, "composition": args.composition}

        bare, one, two = [], [], []
        for r in range(args.repeats):
            bare.append(run_bare(models, kwargs))
            one.append(run_sweep(common, tmp / f"p1-{r}", 1))
            two.append(run_sweep(common, tmp / f"p2-{r}", 2))

    b, o, t = (min(runs, key=lambda run: run.wall) for runs in (bare, one, two))
    harness_s = (o.wall - o.analyze) - (b.wall - b.analyze)
    print(f"models: {args.models} synthetic GPT-2/Llama (d {128 * args.scale}-{256 * args.scale}, {args.layers} "
          f"layers), diagnostics {args.diagnostics or 'all'}, composition {args.composition}, OMP_NUM_THREADS=1 per "
          f"process, best of {args.repeats}; {os.cpu_count()} cores, {load_before} before, {load()} after")
    print(f"1 process: {o.wall:.1f} s   2 processes: {t.wall:.1f} s   ratio 2/1: {t.wall / o.wall:.2f} (ideal 0.50)")
    print("2-process work split: " + ", ".join(f"rank {i} {s:.1f} s" for i, s in enumerate(t.analyze_by_rank))
          + f" of analyze -> bound with 2 free cores: {max(t.analyze_by_rank) / t.analyze:.2f} of the 1-process "
          "analyze time")
    print(f"bare analyze process: {b.wall:.1f} s ({b.analyze:.1f} s analyze, {b.wall - b.analyze:.1f} s start-up/"
          f"exit)   1-process sweep: {o.wall:.1f} s   overhead: {100 * (o.wall / b.wall - 1):.1f} %")
    print(f"same run: harness {harness_s:.1f} s ({harness_s / args.models:.2f} s per model) beyond its "
          f"{o.analyze:.1f} s of analyze and the bare start-up/exit -> overhead {100 * harness_s / o.analyze:.1f} %")


if __name__ == "__main__":
    main()
