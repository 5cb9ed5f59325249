"""FlagAlignmentCallback on sharded parameters, in real 2-process CPU runs (gloo): FSDP2 ``fully_shard`` and
DeepSpeed ZeRO-3 under ``transformers.Trainer``, FSDP1 ``FullyShardedDataParallel`` by hand.

The script is ``sharded_train.py`` beside this file.  Checks: the parameters really were sharded (DTensors,
partitioned DeepSpeed parameters) and training ran; the callback never raised; the values it logged equal
``analyze`` of the same weights gathered whole by the sharding library's own whole-model API, and (FSDP2) the
values an unsharded Trainer run from the same seed logs; it gathered one decoder-layer unit at a time and never the
root (embeddings, LM head); only rank 0 logs.  Not run here: FSDP through accelerate's FSDP plugin (enabled for
GPUs only; on CPU the Trainer gets the model already sharded, as transformers' distributed loading leaves it),
FSDP1 under the Trainer (measured by hand after a training step), and GPU/NCCL runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from tests.integrations.test_trainer_ddp import launch_two_ranks  # noqa: E402

SCRIPT = Path(__file__).with_name("sharded_train.py")
MAX_STEPS, EVERY = 20, 5
FLAG_STEPS = list(range(0, MAX_STEPS + 1, EVERY))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    launch_two_ranks(SCRIPT, [str(out), str(MAX_STEPS), str(EVERY)])
    return out


def load(run: Path, phase: str, rank: int) -> dict:
    return json.loads((run / f"{phase}.rank{rank}.json").read_text())


def numeric_flags(entry: dict) -> dict[str, float]:
    return {k: v for k, v in entry.items() if k.startswith("flag/") and isinstance(v, float)}


def assert_equals_reference(logged: dict, reference: dict) -> None:
    """Every kind's kappa and baseline, and the law's series (``flag/law/<kind>/<metric>``), equal the summary of
    ``analyze`` on the gathered weights."""
    compared = 0
    for key, value in numeric_flags(logged).items():
        name = key.removeprefix("flag/").removeprefix("law/")
        if name in reference:
            assert value == pytest.approx(reference[name], rel=1e-9), key
            compared += 1
    assert compared >= 9  # 4 kinds x (kappa, baseline) + the law's mlp series


@pytest.mark.slow
def test_fsdp2_trainer_run_was_sharded_and_measured_on_rank0(sharded_run):
    ranks = [load(sharded_run, "fsdp2", r) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert (info["rank"], info["world_size"], info["sharding"]) == (r, 2, "fsdp2")
        assert info["parameter_class"] == "DTensor" and info["wrapped_model_class"] == "FSDPLlamaForCausalLM"
        assert info["global_step"] == MAX_STEPS and len(info["losses"]) == MAX_STEPS // 5
        assert info["eval_steps"] == [10, 20]  # evaluations at measured steps: measured once, no hang
        # one decoder-layer unit gathered at a time on every rank; the root (embeddings, LM head) never
        assert info["peak_gathered_units"] == 1 and info["gathered_unit_classes"] == ["FSDPLlamaDecoderLayer"]
    assert [e["step"] for e in ranks[0]["flag_logs"]] == FLAG_STEPS and ranks[1]["flag_logs"] == []
    assert_equals_reference(ranks[0]["flag_logs"][-1], ranks[0]["reference"])


@pytest.mark.slow
def test_fsdp2_logs_equal_an_unsharded_run_from_the_same_seed(sharded_run, tmp_path):
    from transformers import Trainer

    from hf_flag.integrations.trainer import FlagAlignmentCallback
    from tests.conftest import make_tiny_llama
    from tests.integrations.sharded_train import PER_RANK, SEED, flag_logs, token_data, training_args

    trainer = Trainer(model=make_tiny_llama(seed=SEED).train(), args=training_args(tmp_path, MAX_STEPS, 2 * PER_RANK),
                      train_dataset=token_data())
    FlagAlignmentCallback.attach(trainer, every_n_steps=EVERY)
    trainer.train()
    unsharded = flag_logs(trainer.state.log_history)
    sharded = load(sharded_run, "fsdp2", 0)["flag_logs"]
    assert [e["step"] for e in unsharded] == [e["step"] for e in sharded] == FLAG_STEPS
    for a, b in zip(sharded, unsharded):
        assert numeric_flags(a).keys() == numeric_flags(b).keys()
        for key, value in numeric_flags(a).items():  # float32 training, reductions in another order
            assert value == pytest.approx(b[key], rel=1e-4, abs=1e-9), (a["step"], key)
    assert sharded[0]["flag/law"] == unsharded[0]["flag/law"]  # full-batch SGD on both
    assert "full-batch GD" in sharded[0]["flag/law"]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses == pytest.approx(load(sharded_run, "fsdp2", 0)["losses"], rel=1e-5)


@pytest.mark.slow
def test_fsdp1_measures_the_gathered_weights(sharded_run):
    logged = load(sharded_run, "fsdp1", 0)
    assert logged["flag_logs"][0]["sharding"] == "fsdp1"
    assert_equals_reference(logged["flag_logs"][0], logged["reference"])
    assert load(sharded_run, "fsdp1", 1)["flag_logs"] == [{"sharding": "fsdp1"}]  # rank 1 gathers, logs nothing


@pytest.mark.slow
def test_deepspeed_zero3_trainer_run_measures_the_gathered_weights(sharded_run):
    ranks = [load(sharded_run, "zero3", r) for r in (0, 1)]
    if "skipped" in ranks[0]:
        pytest.skip(ranks[0]["skipped"])
    for info in ranks:
        assert info["partitioned"] and info["deepspeed"] and info["sharding"] == "zero3"
        assert info["wrapped_model_class"] == "DeepSpeedEngine" and info["global_step"] == MAX_STEPS
    logs = ranks[0]["flag_logs"]
    assert [e["step"] for e in logs] == FLAG_STEPS and ranks[1]["flag_logs"] == []
    assert_equals_reference(logs[-1], ranks[0]["reference"])
    # DeepSpeed's optimizer holds flattened partitions: the decayed parameters come from the Trainer's rule
    assert logs[0]["flag/law"].startswith("SGD: (1 - lr wd)^2 per step (full-batch GD")
    assert math.isfinite(logs[-1]["flag/law/mlp/imbalance_diagonal_norm_decay_rate"])
