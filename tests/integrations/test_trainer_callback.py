"""FlagAlignmentCallback in real transformers Trainer runs: log_history, TensorBoard, decay law, checkpoint resume."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_flag.analysis.api import analyze  # noqa: E402
from hf_flag.geometry.dynamics import fit_decay_rate, predicted_decay_rate  # noqa: E402
from hf_flag.integrations.trainer import (  # noqa: E402
    FlagAlignmentCallback, ShardedModelError, _check_unsharded, optimizer_hyperparameters)


class Regressor(nn.Module):
    """Three bias-free Linear layers (8 -> 16 -> 16 -> 4), ReLU between them or none; MSE loss."""

    def __init__(self, relu: bool):
        super().__init__()
        torch.manual_seed(1)
        act = [nn.ReLU()] if relu else []
        self.net = nn.Sequential(nn.Linear(8, 16, bias=False), *act, nn.Linear(16, 16, bias=False), *act,
                                 nn.Linear(16, 4, bias=False))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


def regression_data(n: int = 256):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 8, generator=g)
    Y = torch.tanh(X @ torch.randn(8, 4, generator=g))
    return datasets.Dataset.from_dict({"x": X.tolist(), "labels": Y.tolist()})


LR, WD = 0.1, 0.1


def make_trainer(tmp_path, model, *, max_steps, report_to="none", save_steps=None, **extra):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=32, learning_rate=LR,
        weight_decay=WD, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, logging_steps=10,
        report_to=report_to, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0, **extra)
    eval_data = regression_data(64) if extra.get("eval_strategy") else None
    return Trainer(model=model, args=args, train_dataset=regression_data(), eval_dataset=eval_data)


def flag_entries(trainer, key):
    return [(e["step"], e[key]) for e in trainer.state.log_history if key in e]


def test_keys_in_log_history_and_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model = Regressor(relu=True)
    trainer = make_trainer(tmp_path, model, max_steps=30, report_to=["tensorboard"], eval_strategy="steps",
                           eval_steps=15)
    FlagAlignmentCallback.attach(trainer, every_n_steps=10)
    trainer.train()
    kappa = flag_entries(trainer, "flag/linear_chain/commutator_ratio")
    assert [s for s, _ in kappa] == [0, 10, 15, 20, 30]  # every 10 steps, and at the evaluation of step 15
    assert [s for s, _ in flag_entries(trainer, "flag/linear_chain/imbalance_norm")] == [0, 10, 15, 20, 30]
    assert kappa[-1][1] == pytest.approx(analyze(model, cheap=True).summary["linear_chain/commutator_ratio"],
                                         rel=1e-9)
    assert [s for s, _ in flag_entries(trainer, "flag/imbalance_decay_rate")] == [15, 20, 30]
    predicted = predicted_decay_rate("SGD", LR, WD)[0]
    assert all(v == pytest.approx(predicted, rel=1e-12)
               for _, v in flag_entries(trainer, "flag/imbalance_decay_rate_predicted"))
    law = flag_entries(trainer, "flag/imbalance_decay_law")
    assert len(law) == 1 and law[0][1].startswith("exact, discrete GD (SGD")

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/flag/linear_chain/commutator_ratio" in tags and "train/flag/imbalance_decay_rate" in tags
    tb = [(e.step, e.value) for e in acc.Scalars("train/flag/linear_chain/commutator_ratio")]
    assert [s for s, _ in tb] == [s for s, _ in kappa]
    assert [v for _, v in tb] == pytest.approx([v for _, v in kappa], rel=1e-6)  # TensorBoard stores float32


@pytest.fixture(scope="module")
def linear_and_relu_runs(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: set up before the function-scoped one_thread fixture
    runs = {}
    for relu in (False, True):
        trainer = make_trainer(tmp_path_factory.mktemp(f"relu{relu}"), Regressor(relu), max_steps=200)
        FlagAlignmentCallback.attach(trainer, every_n_steps=20)
        trainer.train()
        runs[relu] = trainer
    torch.set_num_threads(before)
    return runs


def test_linear_net_imbalance_decays_at_two_lr_wd(linear_and_relu_runs):
    trainer = linear_and_relu_runs[False]
    fitted = flag_entries(trainer, "flag/imbalance_decay_rate")[-1][1]
    assert fitted == pytest.approx(2 * LR * WD, rel=0.10)
    assert fitted == pytest.approx(predicted_decay_rate("SGD", LR, WD)[0], rel=0.02)
    # the callback's fit equals an independent fit of the logged per-step means
    series = flag_entries(trainer, "flag/linear_chain/imbalance_norm")
    assert fit_decay_rate(*zip(*series))[0] == pytest.approx(fitted, rel=1e-9)


def test_relu_net_keeps_commutator_obstruction(linear_and_relu_runs):
    linear = flag_entries(linear_and_relu_runs[False], "flag/linear_chain/commutator_ratio")
    relu = flag_entries(linear_and_relu_runs[True], "flag/linear_chain/commutator_ratio")
    assert linear[0][1] == pytest.approx(relu[0][1], rel=1e-12)  # same init (MATH.md §3: 0.21 in the toy runs)
    assert linear[-1][1] < 0.1 * linear[0][1]
    assert relu[-1][1] > 0.5 * relu[0][1]
    assert relu[-1][1] > 10 * linear[-1][1]


def test_state_survives_checkpoint_resume(tmp_path):
    first = make_trainer(tmp_path, Regressor(False), max_steps=20, save_steps=10)
    cb = FlagAlignmentCallback.attach(first, every_n_steps=5)
    first.train()
    saved = json.loads((tmp_path / "out" / "checkpoint-10" / "trainer_state.json").read_text())
    entry = saved["stateful_callbacks"]["FlagAlignmentCallback"]
    assert entry["args"]["every_n_steps"] == 5
    assert [p[0] for p in entry["attributes"]["history"]["imbalance_norm"]] == [0, 5, 10]

    for restore in (False, True):
        second = make_trainer(tmp_path, Regressor(False), max_steps=20, save_steps=10,
                              restore_callback_states_from_checkpoint=restore)
        FlagAlignmentCallback.attach(second, every_n_steps=5)
        second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))
        (live,) = [c for c in second.callback_handler.callbacks if isinstance(c, FlagAlignmentCallback)]
        assert [p[0] for p in live.history["imbalance_norm"]] == [0, 5, 10, 15, 20]
        assert [v for _, v in live.history["imbalance_norm"]] == pytest.approx(
            [v for _, v in cb.history["imbalance_norm"]], rel=1e-9)
        # resumed logs go through the Trainer (so to the reporting integrations), with the fit over all 5 points
        rates = flag_entries(second, "flag/imbalance_decay_rate")  # log_history resumes with the checkpoint's
        assert [s for s, _ in rates] == [10, 15, 20]
        assert rates[-1][1] == pytest.approx(flag_entries(first, "flag/imbalance_decay_rate")[-1][1], rel=1e-9)


def test_unbound_callback_logs_to_history_and_warns(tmp_path):
    trainer = make_trainer(tmp_path, Regressor(True), max_steps=4)
    trainer.add_callback(FlagAlignmentCallback(every_n_steps=2))
    with pytest.warns(RuntimeWarning, match="not bound"):
        trainer.train()
    assert [s for s, _ in flag_entries(trainer, "flag/linear_chain/commutator_ratio")] == [0, 2, 4]


def test_sharded_models_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    _check_unsharded(SimpleNamespace(fsdp=None), model)
    with pytest.raises(ShardedModelError, match="ZeRO-3 or FSDP"):
        _check_unsharded(SimpleNamespace(fsdp="full_shard"), model)
    model[0].weight.ds_id = 3  # what DeepSpeed ZeRO-3 attaches to a partitioned parameter
    with pytest.raises(ShardedModelError):
        _check_unsharded(SimpleNamespace(fsdp=None), model)


def test_optimizer_hyperparameters():
    net = nn.Linear(3, 3)
    args = SimpleNamespace(optim="adamw_torch", learning_rate=1e-3, weight_decay=0.01)
    groups = [{"params": [net.weight], "weight_decay": 0.05}, {"params": [net.bias], "weight_decay": 0.0}]
    assert optimizer_hyperparameters(torch.optim.AdamW(groups, lr=3e-4), args) == ("AdamW", 3e-4, 0.05, 0.0)
    sgd = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    assert optimizer_hyperparameters(SimpleNamespace(optimizer=sgd), args) == ("SGD", 0.2, 1e-4, 0.9)
    assert optimizer_hyperparameters(None, args) == ("adamw_torch", 1e-3, 0.01, 0.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        FlagAlignmentCallback(every_n_steps=0)
    assert math.isclose(predicted_decay_rate("SGD", 0.2, 1e-4, 0.9)[0], 2 * 0.2 * 1e-4 / 0.1)


def test_transformer_model_keys(tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(seed=3).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 12), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
                             weight_decay=0.01, lr_scheduler_type="constant", report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    FlagAlignmentCallback.attach(trainer, every_n_steps=2)
    trainer.train()
    expected = analyze(model, cheap=True, composition="none").summary
    last = [e for e in trainer.state.log_history if "flag/mlp/commutator_ratio" in e][-1]
    assert last["step"] == 4
    for key in ("mlp/commutator_ratio", "mlp/imbalance_norm", "vo/commutator_ratio", "residual/commutator_ratio"):
        assert last[f"flag/{key}"] == pytest.approx(expected[key], rel=1e-9), key
    assert last["flag/imbalance_decay_rate_predicted"] == pytest.approx(-2 * math.log1p(-1e-3 * 0.01), rel=1e-9)
