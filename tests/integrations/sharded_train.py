"""Script launched by ``test_trainer_sharded.py`` on 2 CPU processes (``accelerate launch --multi_gpu``, gloo).

Three phases, each comparing what :class:`FlagAlignmentCallback` measures on sharded parameters with the unsharded
model, and each writing ``<out>/<phase>.rank<r>.json``:

- ``fsdp2``: a real ``transformers.Trainer`` run of a tiny Llama sharded by FSDP2 ``fully_shard`` (each decoder
  layer and the root), as transformers' distributed loading leaves it (``is_distributed_loading_by_transformers``:
  accelerate enables its FSDP plugin for GPUs only, so on CPU the model arrives sharded), full-batch SGD, measured
  every ``EVERY`` steps.  Each rank writes the largest number of units the callback held gathered at once and
  their classes; rank 0 its log history and ``analyze`` of the final weights gathered whole
  (``get_model_state_dict(full_state_dict=True)``) into an unsharded copy.
- ``fsdp1``: the same model wrapped by ``FullyShardedDataParallel`` (decoder layers auto-wrapped,
  ``use_orig_params=True``), one SGD step by hand, then one measurement on every rank; rank 0 writes the logged
  values and ``analyze`` of the unsharded copy holding the gathered weights (``summon_full_params`` of the root).
- ``zero3`` (when deepspeed imports): a real ``transformers.Trainer`` run under DeepSpeed ZeRO-3 (accelerate's
  DeepSpeed plugin, DeepSpeed's CPU accelerator, its SGD optimizer over flattened partitions); rank 0 writes its
  log history and ``analyze`` of an unsharded copy filled inside ``GatheredParameters`` of all parameters.

Usage: ``sharded_train.py OUT_DIR MAX_STEPS EVERY`` with the repository root on ``PYTHONPATH``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import Trainer, TrainerState, TrainingArguments

from hf_flag import analyze
from hf_flag.integrations.trainer import FlagAlignmentCallback, optimizer_hyperparameters, sharding_kind
from tests.conftest import make_tiny_llama

SEQ_LEN, N_SEQ, PER_RANK, SEED = 12, 8, 4, 3
LR, WD = 1e-2, 0.1


def token_data() -> Dataset:
    """``N_SEQ`` random sequences: one global batch of 2 x ``PER_RANK`` is the whole set (full-batch SGD, so the
    order the sampler draws them in does not change the gradient)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (N_SEQ, SEQ_LEN), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(out: Path, max_steps: int, per_device: int, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=per_device, learning_rate=LR,
        weight_decay=WD, optim="sgd", lr_scheduler_type="constant", logging_steps=5, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, **extra)


def flag_logs(log_history: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k.startswith("flag/") or k == "step"} for e in log_history
            if any(k.startswith("flag/") for k in e)]


def reference_summary(state_dict: dict) -> dict:
    """``analyze(cheap=True)`` of an unsharded tiny Llama holding ``state_dict`` (the gathered weights)."""
    model = make_tiny_llama(seed=SEED)
    model.load_state_dict(state_dict)
    return analyze(model, cheap=True, composition="none").summary


class GatherCounter:
    """Wraps the callback's one-unit gather (``hf_flag.integrations.trainer.unit_gathered``): the largest number of
    units it held whole at once, and which units it gathered."""

    def __init__(self) -> None:
        import contextlib

        import hf_flag.integrations.trainer as callback_module

        self.now = self.peak = 0
        self.units: set[str] = set()
        inner = callback_module.unit_gathered

        @contextlib.contextmanager
        def counting(kind, unit, params):
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.units.add(type(unit).__name__)
            try:
                with inner(kind, unit, params):
                    yield
            finally:
                self.now -= 1

        callback_module.unit_gathered = counting


def fsdp2_phase(out: Path, max_steps: int, every: int) -> int:
    """The FSDP2 Trainer run (see the module docstring); returns this process's rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    # an evaluation every 10 steps falls on measured steps: no rank may gather twice for one step
    args = training_args(out / "fsdp2", max_steps, PER_RANK, ddp_backend="gloo", eval_strategy="steps",
                         eval_steps=10)  # initialises the process group
    rank = dist.get_rank()
    model = make_tiny_llama(seed=SEED).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model._is_distributed_loading_by_transformers = True  # what from_pretrained(distributed_config=...) sets
    counter = GatherCounter()
    trainer = Trainer(model=model, args=args, train_dataset=token_data(), eval_dataset=token_data())
    FlagAlignmentCallback.attach(trainer, every_n_steps=every)
    trainer.train()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    info = {"rank": rank, "world_size": dist.get_world_size(), "sharding": sharding_kind(model),
            "parameter_class": type(model.model.layers[0].mlp.up_proj.weight).__name__,
            "wrapped_model_class": type(trainer.model_wrapped).__name__, "global_step": trainer.state.global_step,
            "peak_gathered_units": counter.peak, "gathered_unit_classes": sorted(counter.units),
            "flag_logs": flag_logs(trainer.state.log_history),
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "eval_steps": [e["step"] for e in trainer.state.log_history if "eval_loss" in e]}
    if rank == 0:
        info["reference"] = reference_summary(full)
    (out / f"fsdp2.rank{rank}.json").write_text(json.dumps(info))
    return rank


def measure_everywhere(model, optimizer, rank: int) -> list[dict]:
    """One measurement on every rank (the callback's events, as the Trainer calls them); rank 0's logs."""
    args = training_args(Path("unused"), 1, PER_RANK)
    state = TrainerState()
    state.is_world_process_zero = rank == 0
    callback = FlagAlignmentCallback(every_n_steps=1)
    callback.sharding = sharding_kind(model)
    logs = callback.measure(model, 0, optimizer_hyperparameters(optimizer, args), optimizer=optimizer,
                            compute=rank == 0)
    return [{**logs, "sharding": callback.sharding}]


def fsdp1_phase(out: Path, rank: int) -> None:
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = FSDP(make_tiny_llama(seed=SEED).train(), device_id=torch.device("cpu"), use_orig_params=True,
                 auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                    transformer_layer_cls={LlamaDecoderLayer}))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    ids = torch.tensor(token_data()["input_ids"][rank * PER_RANK:(rank + 1) * PER_RANK])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    logs = measure_everywhere(model, optimizer, rank)
    info = {"rank": rank, "flag_logs": logs}
    with FSDP.summon_full_params(model, writeback=False):
        full = {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone()
                for k, v in model.named_parameters()}
    if rank == 0:
        info["reference"] = reference_summary(full)
    (out / f"fsdp1.rank{rank}.json").write_text(json.dumps(info))


def zero3_phase(out: Path, max_steps: int, every: int, rank: int) -> None:
    try:
        import deepspeed
    except ImportError:
        (out / f"zero3.rank{rank}.json").write_text(json.dumps({"rank": rank, "skipped": "deepspeed not installed"}))
        return
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # shard every tensor
              "zero_allow_untested_optimizer": True,
              "optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}}}
    args = training_args(out / "zero3", max_steps, PER_RANK, ddp_backend="gloo", deepspeed=config)
    trainer = Trainer(model=make_tiny_llama(seed=SEED).train(), args=args, train_dataset=token_data())
    FlagAlignmentCallback.attach(trainer, every_n_steps=every)
    trainer.train()
    model = trainer.model
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        full = {k: v.detach().clone() for k, v in model.named_parameters()}
    info = {"rank": rank, "flag_logs": flag_logs(trainer.state.log_history), "partitioned": partitioned,
            "sharding": sharding_kind(model), "deepspeed": trainer.is_deepspeed_enabled,
            "wrapped_model_class": type(trainer.model_wrapped).__name__, "global_step": trainer.state.global_step}
    if rank == 0:
        info["reference"] = reference_summary(full)
    (out / f"zero3.rank{rank}.json").write_text(json.dumps(info))


def main(argv: list[str]) -> None:
    out, max_steps, every = Path(argv[0]), int(argv[1]), int(argv[2])
    rank = fsdp2_phase(out, max_steps, every)
    fsdp1_phase(out, rank)
    zero3_phase(out, max_steps, every, rank)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
