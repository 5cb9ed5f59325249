"""Overhead of FlagAlignmentCallback at its default interval on a small Llama, side by side in one run.

Trains the same model from the same initial weights without and with the callback (interleaved repeats) and prints:
the median training-step time of each and their ratio (robust to load spikes from other processes), the mean step
time of each and their ratio (includes the measuring steps, but noisy on a shared machine), and the time spent inside
the callback's measurements as a fraction of the rest of the training time in the same run (the overhead figure:
goal < 5 % at ``every_n_steps=50``).

    .venv/bin/python benchmarks/bench_callback_overhead.py [--steps 200] [--repeats 3] [--every 50] [--threads 1]

``--fsdp`` (under ``torch.distributed.run --nproc_per_node 2``, gloo, CPU): the same model sharded by FSDP2
``fully_shard`` (each decoder layer and the root); per repeat, interleaved, one sharded measurement on both ranks
(gathering one layer at a time), one unsharded measurement of the same weights on rank 0, and ``--steps`` training
steps of the sharded model; prints the medians, the sharded / unsharded ratio and the measurement in training steps:

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 \\
        benchmarks/bench_callback_overhead.py --fsdp [--steps 20] [--repeats 5]
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


def fsdp_main(opts: argparse.Namespace) -> None:
    """Sharded (FSDP2, 2 ranks) vs unsharded measurement of the same weights, and sharded training steps."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from hf_flag.integrations.trainer import optimizer_hyperparameters

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = small_llama().train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, weight_decay=0.01)
    hyper = optimizer_hyperparameters(optimizer, None)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 256, (8, 64), generator=g)
    sharded, callback = FlagAlignmentCallback(), FlagAlignmentCallback()
    sharded.sharding = "fsdp2"
    times: dict[str, list[float]] = {"sharded": [], "unsharded": [], "step": []}
    for repeat in range(opts.repeats + 1):  # the first round warms up (imports, first analyze)
        dist.barrier()
        start = time.perf_counter()
        sharded.measure(model, repeat, hyper, optimizer=optimizer, compute=rank == 0)
        dist.barrier()
        sharded_s = time.perf_counter() - start
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        unsharded_s = 0.0
        if rank == 0:
            copy_model = small_llama()
            copy_model.load_state_dict(full)
            start = time.perf_counter()
            callback.measure(copy_model, repeat, hyper, optimizer=None)
            unsharded_s = time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        for _ in range(opts.steps):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        dist.barrier()
        if repeat:
            times["sharded"].append(sharded_s)
            times["unsharded"].append(unsharded_s)
            times["step"].append((time.perf_counter() - start) / opts.steps)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"model: Llama 4 layers, d=128, d_ff=344, 4 heads (2 KV), FSDP2 on 2 CPU ranks (gloo), batch 8 x 64 "
              f"tokens per rank; torch threads {torch.get_num_threads()}; {opts.repeats} repeats, medians")
        print(f"one measurement, sharded (gather one layer at a time, rank 0 computes): {med['sharded'] * 1e3:.1f} ms")
        print(f"one measurement, unsharded copy of the same weights (rank 0):         {med['unsharded'] * 1e3:.1f} ms "
              f"(sharded / unsharded {med['sharded'] / med['unsharded']:.2f})")
        print(f"one sharded training step: {med['step'] * 1e3:.1f} ms; one measurement = "
              f"{med['sharded'] / med['step']:.2f} steps = {med['sharded'] / med['step'] / opts.every * 100:.1f} % "
              f"at every_n_steps={opts.every}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=50, help="every_n_steps (the callback's default is 50)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids oversubscription on a shared machine)")
    parser.add_argument("--fsdp", action="store_true",
                        help="sharded measurement under FSDP2 (run with torch.distributed.run --nproc_per_node 2)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.fsdp:
        fsdp_main(opts)
        return
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
