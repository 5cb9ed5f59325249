"""Training script launched by ``test_trainer_ddp.py`` on 2 CPU processes (``accelerate launch --multi_gpu``).

A tiny Llama (``tests.conftest.make_tiny_llama``) trained by ``transformers.Trainer`` under DDP (gloo backend,
``use_cpu=True``) with :class:`FlagAlignmentCallback` attached.  Each rank sends its TensorBoard events to its own
folder ``<out>/tb/rank<r>`` and, after training, writes ``<out>/rank<r>.json``: what the process group and the Trainer
say about the run (rank, world size, backend, class of the DDP-wrapped model), the flag entries in its own log history
and a SHA-256 of its final weights.  Usage: ``ddp_train.py OUT_DIR MAX_STEPS EVERY_N_STEPS SAVE_STEPS``, with the
repository root on ``PYTHONPATH`` (the model comes from ``tests.conftest``).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_flag.integrations.trainer import FlagAlignmentCallback
from tests.conftest import make_tiny_llama

SEQ_LEN, N_SEQ, BATCH = 12, 160, 4


def token_data() -> Dataset:
    """The same ``N_SEQ`` random token sequences on every rank (the Trainer's sampler shards them)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (N_SEQ, SEQ_LEN), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def build_trainer(out: Path, max_steps: int, every: int, save_steps: int, report_to: str,
                  ddp_backend: Optional[str] = None) -> Trainer:
    """Trainer (SGD, constant lr, loss logged every 5 steps) of a tiny Llama with the callback attached.

    ``ddp_backend`` only for a distributed launch: in a single process ``ddp_backend="gloo"`` makes accelerate 1.15
    ask an uninitialised process group for its size."""
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=max_steps, per_device_train_batch_size=BATCH, learning_rate=1e-2,
        weight_decay=0.1, optim="sgd", lr_scheduler_type="constant", logging_steps=5,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=report_to,
        use_cpu=True, ddp_backend=ddp_backend, ddp_find_unused_parameters=False, disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    trainer = Trainer(model=make_tiny_llama(seed=3).train(), args=args, train_dataset=token_data())
    FlagAlignmentCallback.attach(trainer, every_n_steps=every)
    return trainer


def main(argv: list[str]) -> None:
    out, max_steps, every, save_steps = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    rank = int(os.environ["RANK"])
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb" / f"rank{rank}")  # read by TensorBoardCallback
    trainer = build_trainer(out, max_steps, every, save_steps, "tensorboard", ddp_backend="gloo")
    trainer.train()
    digest = hashlib.sha256()
    for p in trainer.model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    info = {
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
        "parallel_mode": str(trainer.args.parallel_mode), "args_world_size": trainer.args.world_size,
        "wrapped_model_class": type(trainer.model_wrapped).__name__, "global_step": trainer.state.global_step,
        "is_world_process_zero": trainer.is_world_process_zero(),
        "flag_steps": [e["step"] for e in trainer.state.log_history if "flag/mlp/commutator_ratio" in e],
        "weights_sha256": digest.hexdigest(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()  # both ranks reach the end: neither waits on a collective the other never joins


if __name__ == "__main__":
    main(sys.argv[1:])
