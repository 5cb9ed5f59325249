"""Overhead of FlagAlignmentCallback at its default interval on a small Llama, side by side in one run.

Trains the same model from the same initial weights without and with the callback (interleaved repeats) and prints:
the median training-step time of each and their ratio (robust to load spikes from other processes), the mean step
time of each and their ratio (includes the measuring steps, but noisy on a shared machine), and the time spent inside
the callback's measurements as a fraction of the rest of the training time in the same run (the overhead figure:
goal < 5 % at ``every_n_steps=50``).

    .venv/bin/python benchmarks/bench_callback_overhead.py [--steps 200] [--repeats 3] [--every 50] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from typing import Any, Optional

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_flag.integrations.trainer import FlagAlignmentCallback


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (added last, so it includes the callbacks' on_step_end work)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class TimedFlagCallback(FlagAlignmentCallback):
    """FlagAlignmentCallback that adds up the time of its measurements."""

    seconds = 0.0

    def measure(self, *args: Any, **kwargs: Any) -> dict:
        start = time.perf_counter()
        try:
            return super().measure(*args, **kwargs)
        finally:
            TimedFlagCallback.seconds += time.perf_counter() - start


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def run(model: LlamaForCausalLM, data: datasets.Dataset, steps: int, every: Optional[int]) -> tuple[list[float], float]:
    """Per-step times and the seconds spent in the callback's measurements (0 without it)."""
    TimedFlagCallback.seconds = 0.0
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
                                 weight_decay=0.01, lr_scheduler_type="constant", report_to="none",
                                 save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10**6)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        if every is not None:
            TimedFlagCallback.attach(trainer, every_n_steps=every)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    return timer.times, TimedFlagCallback.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=50, help="every_n_steps (the callback's default is 50)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids oversubscription on a shared machine)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (256, 64), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    base = small_llama()
    run(copy.deepcopy(base), data, 5, opts.every)  # warm-up (imports, first analyze)
    steps: dict[str, list[float]] = {"without": [], "with": []}
    in_callback = 0.0
    for _ in range(opts.repeats):
        steps["without"] += run(copy.deepcopy(base), data, opts.steps, None)[0]
        times, seconds = run(copy.deepcopy(base), data, opts.steps, opts.every)
        steps["with"] += times
        in_callback += seconds
    median = {k: statistics.median(v) for k, v in steps.items()}
    mean = {k: statistics.fmean(v) for k, v in steps.items()}
    calls = opts.repeats * (opts.steps // opts.every + 1)  # step 0 included
    print(f"model: Llama 4 layers, d=128, d_ff=344, 4 heads (2 KV), batch 8 x 64 tokens; torch threads "
          f"{torch.get_num_threads()}; {opts.repeats} x {opts.steps} steps each, every_n_steps={opts.every}")
    print(f"median step without / with callback: {median['without'] * 1e3:.1f} / {median['with'] * 1e3:.1f} ms "
          f"(ratio {median['with'] / median['without']:.3f})")
    print(f"mean step without / with callback:   {mean['without'] * 1e3:.1f} / {mean['with'] * 1e3:.1f} ms "
          f"(ratio {mean['with'] / mean['without']:.3f}, noisy)")
    print(f"one measurement (analyze cheap=True + fit): {in_callback / calls * 1e3:.1f} ms "
          f"= {in_callback / calls / median['with']:.2f} median steps")
    print(f"overhead = time in callback / rest of training (same runs): "
          f"{in_callback / (sum(steps['with']) - in_callback) * 100:.2f} %")


if __name__ == "__main__":
    main()
