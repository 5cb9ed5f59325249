"""FlagAlignmentCallback in real transformers Trainer runs: log_history, TensorBoard, the decay law from the optimizer
the Trainer built (closed forms and measured rates), decayed parameters only, checkpoint resume, never raising."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_flag.analysis.api import analyze  # noqa: E402
from hf_flag.geometry.dynamics import fit_decay_rate, predicted_decay_rate  # noqa: E402
from hf_flag.geometry.pairs import commutator_baseline, commutator_reading_holds  # noqa: E402
from hf_flag.integrations import readings  # noqa: E402
from hf_flag.integrations.trainer import (  # noqa: E402
    FlagAlignmentCallback, OptimizerLaw, decayed_view, optimizer_hyperparameters, sharding_kind)


class Regressor(nn.Sequential):
    """Three Linear layers (8 -> 16 -> 16 -> 4), ReLU between them or none, biases or none; MSE loss.  A Sequential,
    so the chain's activations are known (inside a custom module two adjacent Linear layers read "unknown")."""

    def __init__(self, relu: bool, bias: bool = False):
        torch.manual_seed(1)
        act = [nn.ReLU()] if relu else []
        super().__init__(nn.Linear(8, 16, bias=bias), *act, nn.Linear(16, 16, bias=bias), *act,
                         nn.Linear(16, 4, bias=bias))

    def forward(self, x, labels=None):
        out = super().forward(x)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}

    def linears(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]


def regression_data(n: int = 256):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 8, generator=g)
    Y = torch.tanh(X @ torch.randn(8, 4, generator=g))
    return datasets.Dataset.from_dict({"x": X.tolist(), "labels": Y.tolist()})


LR, WD, N_TRAIN = 0.1, 0.1, 256
SGD_RATE = -2 * math.log1p(-LR * WD)  # MATH.md §2: (1 - lr wd)^2 per step


def make_trainer(tmp_path, model, *, max_steps, report_to="none", save_steps=None, batch=N_TRAIN, optim="sgd",
                 optimizers=(None, None), **extra):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=batch, learning_rate=LR,
        weight_decay=WD, optim=optim, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10,
        report_to=report_to, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0, **extra)
    eval_data = regression_data(64) if extra.get("eval_strategy") else None
    return Trainer(model=model, args=args, train_dataset=regression_data(N_TRAIN), eval_dataset=eval_data,
                   optimizers=optimizers)


def flag_entries(trainer, key):
    return [(e["step"], e[key]) for e in trainer.state.log_history if key in e]


def law_text(trainer) -> str:
    (law,) = [v for _, v in flag_entries(trainer, "flag/law")]
    return law


def dense_imbalance(W_l: torch.Tensor, W_next: torch.Tensor, diagonal: bool = False) -> float:
    """||W_next^T W_next - W_l W_l^T|| formed directly (MATH.md §2), or the norm of its diagonal."""
    D = W_next.double().T @ W_next.double() - W_l.double() @ W_l.double().T
    return float(torch.linalg.vector_norm(torch.diagonal(D)) if diagonal else torch.linalg.matrix_norm(D))


def dense_imbalance_haar_rms(W_l: torch.Tensor, W_next: torch.Tensor) -> float:
    """sqrt(||A||^2 + ||B||^2 - 2 tr A tr B / n) from the n x n matrices (MATH.md §2 Haar baseline)."""
    A, B = W_next.double().T @ W_next.double(), W_l.double() @ W_l.double().T
    return math.sqrt(float(A.square().sum() + B.square().sum() - 2 * A.trace() * B.trace() / A.shape[0]))


def test_law_series_means_are_the_stats_means_with_baselines():
    """law_series averages through hf_flag.geometry.stats (MATH.md §8): the correctly rounded mean, equal to
    fsum / len up to that one rounding; each governed imbalance beside the mean of its rows' baselines."""
    from hf_flag.geometry import stats
    from hf_flag.integrations.trainer import law_series

    values = [0.1, 0.2, 0.7, 1e-3, 3.3]
    rows = [SimpleNamespace(kind="linear_chain", details={"activation": "identity"},
                            values={"imbalance_norm": v, "imbalance_norm_baseline": 2 * v + 1})
            for v in values]
    rows.append(SimpleNamespace(kind="linear_chain", details={"activation": "gelu"}, values={"imbalance_norm": 9.0}))
    series = law_series(rows, {})
    assert series.values == {"linear_chain/imbalance_norm": stats.mean(values)}
    assert series.values["linear_chain/imbalance_norm"] == pytest.approx(math.fsum(values) / len(values), rel=2 ** -52)
    assert series.baselines == {"linear_chain/imbalance_norm": stats.mean([2 * v + 1 for v in values])}
    assert series.ungoverned == {"linear_chain": "gelu"}
    rows[0].values["imbalance_norm_baseline"] = None  # a row without a baseline: no mean baseline for the kind
    assert law_series(rows, {}).baselines == {}


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
    assert kappa[-1][1] == pytest.approx(analyze(model, cheap=True).summary["linear_chain/commutator_ratio"],
                                         rel=1e-9)
    # every logged value beside its baseline: kappa's Haar RMS, computed here from the weights (MATH.md §3)
    W = [m.weight.detach() for m in model.linears()]
    expected = float(sum(commutator_baseline(a, b) for a, b in zip(W, W[1:]))) / 2
    assert flag_entries(trainer, "flag/linear_chain/commutator_ratio_baseline")[-1][1] == pytest.approx(expected,
                                                                                                       rel=1e-9)
    # 8 -> 16 -> 16 -> 4: each pair has a full-rank factor in its hidden space, so kappa reads (MATH.md §3)
    assert [v for _, v in flag_entries(trainer, "flag/linear_chain/commutator_reading_holds")] == [True] * 5
    series = "flag/law/linear_chain/imbalance_diagonal_norm"  # ReLU: the law governs diag D only
    assert [s for s, _ in flag_entries(trainer, series)] == [0, 10, 15, 20, 30]
    assert [s for s, _ in flag_entries(trainer, f"{series}_predicted")] == [0, 10, 15, 20, 30]
    assert [s for s, _ in flag_entries(trainer, f"{series}_decay_rate")] == [15, 20, 30]
    assert all(v == pytest.approx(SGD_RATE, rel=1e-12)
               for _, v in flag_entries(trainer, f"{series}_decay_rate_predicted"))
    assert not flag_entries(trainer, "flag/law/linear_chain/imbalance_norm")  # full D: not governed under ReLU
    assert law_text(trainer).startswith("SGD: (1 - lr wd)^2 per step (full-batch GD")
    assert not any(isinstance(v, float) and k.startswith("flag/") and not _has_baseline(k, e)
                   for e in trainer.state.log_history for k, v in e.items())

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/flag/linear_chain/commutator_ratio" in tags and f"train/{series}_decay_rate" in tags
    tb = [(e.step, e.value) for e in acc.Scalars("train/flag/linear_chain/commutator_ratio")]
    assert [s for s, _ in tb] == [s for s, _ in kappa]
    assert [v for _, v in tb] == pytest.approx([v for _, v in kappa], rel=1e-6)  # TensorBoard stores float32


def _has_baseline(key: str, entry: dict) -> bool:
    """A logged number's baseline sits in the same entry: ``_baseline``, the law's ``_predicted`` value or rate
    (``_r2`` is the fit's own quality)."""
    if key.endswith(("_baseline", "_predicted", "_r2")):
        return True
    return f"{key}_baseline" in entry or f"{key}_predicted" in entry


@pytest.fixture(scope="module")
def full_batch_runs(tmp_path_factory):
    """Full-batch SGD (one batch = the whole training set), 200 steps: linear, ReLU, linear with biases."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: set up before the function-scoped one_thread fixture
    runs = {}
    for name, relu, bias in (("linear", False, False), ("relu", True, False), ("bias", False, True)):
        model = Regressor(relu, bias)
        trainer = make_trainer(tmp_path_factory.mktemp(name), model, max_steps=200)
        recorder = AugmentedImbalance(model) if bias else None
        if recorder is not None:
            trainer.add_callback(recorder)
        FlagAlignmentCallback.attach(trainer, every_n_steps=20)
        trainer.train()
        runs[name] = (trainer, model, recorder)
    torch.set_num_threads(before)
    return runs


class AugmentedImbalance(TrainerCallback):
    """Mean over pairs of the bias-augmented ||D|| ([W_l | b_l], formed directly) every 20 steps."""

    def __init__(self, model: Regressor):
        self.layers, self.series = model.linears(), []

    def record(self, step: int) -> None:
        if step % 20 == 0:
            aug = [torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1) for m in self.layers]
            self.series.append((step, sum(dense_imbalance(a, b.weight.detach()) for a, b in
                                          zip(aug, self.layers[1:])) / 2))

    def on_train_begin(self, args, state, control, **kwargs):
        self.record(0)

    def on_step_end(self, args, state, control, **kwargs):
        self.record(state.global_step)


def test_linear_net_full_batch_sgd_imbalance_decays_at_two_lr_wd(full_batch_runs):
    trainer, model, _ = full_batch_runs["linear"]
    stem = "flag/law/linear_chain/imbalance_norm"
    fitted = flag_entries(trainer, f"{stem}_decay_rate")[-1][1]
    assert fitted == pytest.approx(2 * LR * WD, rel=0.02)
    assert fitted == pytest.approx(SGD_RATE, rel=0.01)
    assert flag_entries(trainer, f"{stem}_decay_rate_predicted")[-1][1] == pytest.approx(SGD_RATE, rel=1e-12)
    assert "full-batch GD: exact" in law_text(trainer) and "governs: linear_chain/imbalance_norm" in law_text(trainer)
    # the callback's fit equals an independent fit of the logged means; the last mean is the dense ||D|| of the weights
    series = flag_entries(trainer, stem)
    assert fit_decay_rate(*zip(*series))[0] == pytest.approx(fitted, rel=1e-9)
    W = [m.weight.detach() for m in model.linears()]
    assert series[-1][1] == pytest.approx((dense_imbalance(W[0], W[1]) + dense_imbalance(W[1], W[2])) / 2, rel=1e-9)
    # beside it, the Haar RMS of ||D|| over rotations of the hidden basis (MATH.md §2), from the dense n x n matrices
    baseline = flag_entries(trainer, f"{stem}_baseline")
    assert [step for step, _ in baseline] == [step for step, _ in series]
    assert baseline[-1][1] == pytest.approx(
        (dense_imbalance_haar_rms(W[0], W[1]) + dense_imbalance_haar_rms(W[1], W[2])) / 2, rel=1e-9)
    # the predicted value beside it: the first value carried by the law
    predicted = flag_entries(trainer, f"{stem}_predicted")[-1][1]
    assert predicted == pytest.approx(series[0][1] * math.exp(-SGD_RATE * 200), rel=1e-12)
    assert series[-1][1] == pytest.approx(predicted, rel=0.03)


def test_relu_net_diagonal_follows_the_law(full_batch_runs):
    trainer, model, _ = full_batch_runs["relu"]
    stem = "flag/law/linear_chain/imbalance_diagonal_norm"
    assert flag_entries(trainer, f"{stem}_decay_rate")[-1][1] == pytest.approx(SGD_RATE, rel=0.01)
    W = [m.weight.detach() for m in model.linears()]
    assert flag_entries(trainer, stem)[-1][1] == pytest.approx(
        (dense_imbalance(W[0], W[1], True) + dense_imbalance(W[1], W[2], True)) / 2, rel=1e-9)


def test_relu_net_keeps_commutator_obstruction(full_batch_runs):
    linear = flag_entries(full_batch_runs["linear"][0], "flag/linear_chain/commutator_ratio")
    relu = flag_entries(full_batch_runs["relu"][0], "flag/linear_chain/commutator_ratio")
    assert linear[0][1] == pytest.approx(relu[0][1], rel=1e-12)  # same init (MATH.md §3: 0.21 in the toy runs)
    assert linear[-1][1] < 0.1 * linear[0][1]
    assert relu[-1][1] > 0.5 * relu[0][1]
    assert relu[-1][1] > 10 * linear[-1][1]


def test_biases_not_decayed_weights_alone_follow_the_law(full_batch_runs):
    """The Trainer does not decay biases: D of the weights alone decays at the law's rate, the bias-augmented D
    (what analyze reports) does not (it tends to -b b^T)."""
    trainer, model, recorder = full_batch_runs["bias"]
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decays[id(m.bias)] == 0 and decays[id(m.weight)] == WD for m in model.linears())
    stem = "flag/law/linear_chain/imbalance_norm"
    assert flag_entries(trainer, f"{stem}_decay_rate")[-1][1] == pytest.approx(SGD_RATE, rel=0.02)
    W = [m.weight.detach() for m in model.linears()]
    assert flag_entries(trainer, stem)[-1][1] == pytest.approx(
        (dense_imbalance(W[0], W[1]) + dense_imbalance(W[1], W[2])) / 2, rel=1e-9)
    augmented = fit_decay_rate(*zip(*recorder.series[len(recorder.series) // 2:]))[0]
    assert abs(augmented - SGD_RATE) > 0.25 * SGD_RATE
    assert "biases the optimizer does not decay are left out of D" in law_text(trainer)


def test_minibatch_sgd_law_states_the_floor(tmp_path):
    trainer = make_trainer(tmp_path, Regressor(False), max_steps=40, batch=16)
    FlagAlignmentCallback.attach(trainer, every_n_steps=10)
    trainer.train()
    law = law_text(trainer)
    assert "minibatch SGD" in law and "floor" in law and "exact" not in law
    assert flag_entries(trainer, "flag/law/linear_chain/imbalance_norm_decay_rate_predicted")[-1][1] == \
        pytest.approx(SGD_RATE, rel=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_sgd_rate_from_the_built_optimizer(tmp_path, nesterov):
    beta, lr = 0.5, 0.05
    model = Regressor(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta, weight_decay=WD, nesterov=nesterov)
    trainer = make_trainer(tmp_path, model, max_steps=300, optimizers=(optimizer, None))
    FlagAlignmentCallback.attach(trainer, every_n_steps=20)
    trainer.train()
    stem = "flag/law/linear_chain/imbalance_norm_decay_rate"
    predicted = flag_entries(trainer, f"{stem}_predicted")[-1][1]
    # closed form: the slow root of the heavy-ball (Nesterov) recursion on the decay term, ~ 2 lr wd / (1 - beta)
    b, c = (1 + beta - lr * WD * (1 + beta), beta * (1 - lr * WD)) if nesterov else (1 + beta - lr * WD, beta)
    assert predicted == pytest.approx(-2 * math.log((b + math.sqrt(b * b - 4 * c)) / 2), rel=1e-12)
    assert predicted == pytest.approx(2 * lr * WD / (1 - beta), rel=0.02)
    assert flag_entries(trainer, stem)[-1][1] == pytest.approx(predicted, rel=0.02)
    assert law_text(trainer).startswith("SGD momentum") and f"nesterov={nesterov}" in law_text(trainer)


def test_adamw_logs_no_prediction(tmp_path):
    trainer = make_trainer(tmp_path, Regressor(False), max_steps=60, optim="adamw_torch")
    FlagAlignmentCallback.attach(trainer, every_n_steps=20)
    trainer.train()
    keys = {k for e in trainer.state.log_history for k in e if k.startswith("flag/")}
    assert not {k for k in keys if k.endswith("_predicted")}
    assert "flag/law/linear_chain/imbalance_norm_decay_rate" in keys  # the measured rate, alone
    assert law_text(trainer).startswith("no closed-form law (AdamW") and "measured on:" in law_text(trainer)
    assert predicted_decay_rate("AdamW", LR, WD)[0] is None


def test_state_survives_checkpoint_resume(tmp_path):
    first = make_trainer(tmp_path, Regressor(False), max_steps=20, save_steps=10)
    cb = FlagAlignmentCallback.attach(first, every_n_steps=5)
    first.train()
    key = "linear_chain/imbalance_norm"
    saved = json.loads((tmp_path / "out" / "checkpoint-10" / "trainer_state.json").read_text())
    entry = saved["stateful_callbacks"]["FlagAlignmentCallback"]
    assert entry["args"]["every_n_steps"] == 5
    assert [p[0] for p in entry["attributes"]["history"][key]] == [0, 5, 10]

    for restore in (False, True):
        second = make_trainer(tmp_path, Regressor(False), max_steps=20, save_steps=10,
                              restore_callback_states_from_checkpoint=restore)
        FlagAlignmentCallback.attach(second, every_n_steps=5)
        second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))
        (live,) = [c for c in second.callback_handler.callbacks if isinstance(c, FlagAlignmentCallback)]
        assert [p[0] for p in live.history[key]] == [0, 5, 10, 15, 20]
        assert [v for _, v in live.history[key]] == pytest.approx([v for _, v in cb.history[key]], rel=1e-9)
        # resumed logs go through the Trainer (so to the reporting integrations), with the fit over all 5 points
        rates = flag_entries(second, f"flag/law/{key}_decay_rate")  # log_history resumes with the checkpoint's
        assert [s for s, _ in rates] == [10, 15, 20]
        assert rates[-1][1] == pytest.approx(flag_entries(first, f"flag/law/{key}_decay_rate")[-1][1], rel=1e-9)


def test_unbound_callback_logs_to_history_and_warns(tmp_path):
    trainer = make_trainer(tmp_path, Regressor(True), max_steps=4)
    trainer.add_callback(FlagAlignmentCallback(every_n_steps=2))
    with pytest.warns(RuntimeWarning, match="not bound"):
        trainer.train()
    assert [s for s, _ in flag_entries(trainer, "flag/linear_chain/commutator_ratio")] == [0, 2, 4]


class OneLayer(nn.Module):
    """A single Linear layer: no pair of layers to measure (analyze raises ValueError on it)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x, labels=None):
        out = self.linear(x)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


def test_a_model_it_cannot_measure_warns_once_and_training_continues(tmp_path):
    trainer = make_trainer(tmp_path, OneLayer(), max_steps=20, save_steps=10)
    FlagAlignmentCallback.attach(trainer, every_n_steps=5)
    with pytest.warns(RuntimeWarning, match="could not measure at step 0 and skips") as caught:
        trainer.train()
    assert len([w for w in caught if "could not measure" in str(w.message)]) == 1
    assert "1 nn.Linear layer" in str([w for w in caught if "could not measure" in str(w.message)][0].message)
    assert trainer.state.global_step == 20
    assert [s for s, _ in flag_entries(trainer, "loss")] == [10, 20]
    assert not [k for e in trainer.state.log_history for k in e if k.startswith("flag/")]
    assert (tmp_path / "out" / "checkpoint-20" / "trainer_state.json").is_file()


def test_sharding_detection_and_decayed_view():
    model = Regressor(False, bias=True)
    assert sharding_kind(model) is None
    view = decayed_view(model, frozenset({"0.bias", "2.bias"}))
    assert view[0].bias is None and view[2].bias is None and view[1].bias is model[1].bias
    assert view[0].weight is model[0].weight and model[0].bias is not None  # shares tensors, leaves the model
    assert "0.bias" not in view.state_dict() and "0.bias" in model.state_dict()
    model[0].weight.ds_id = 3  # what DeepSpeed ZeRO-3 attaches to a partitioned parameter
    assert sharding_kind(model) == "zero3"


def test_decayed_parameters_from_the_optimizer_or_the_trainers_rule():
    from hf_flag.integrations.trainer import decayed_parameter_names, is_full_batch

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = [{"params": [model[0].weight, model[0].bias], "weight_decay": 0.1},
              {"params": [model[1].weight, model[1].bias, model[2].weight, model[2].bias], "weight_decay": 0.0}]
    # the optimizer holds the model's own parameters: its groups decide (here a bias is decayed, a weight is not)
    assert decayed_parameter_names(model, torch.optim.SGD(groups, lr=0.1), None) == {"0.weight", "0.bias"}
    # flattened copies (as DeepSpeed's optimizer holds): the Trainer's rule, no biases, no norms
    flat = torch.optim.SGD([torch.zeros(10, requires_grad=True)], lr=0.1, weight_decay=0.1)
    assert decayed_parameter_names(model, flat, None) == {"0.weight", "2.weight"}
    args = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=2, world_size=2)
    assert [is_full_batch(SimpleNamespace(dataset=range(n)), args) for n in (32, 33)] == [True, False]
    assert is_full_batch(SimpleNamespace(dataset=iter(range(3))), args) is None  # no length: unknown


def test_optimizer_hyperparameters():
    net = nn.Linear(3, 3)
    args = SimpleNamespace(optim="adamw_torch", learning_rate=1e-3, weight_decay=0.01)
    groups = [{"params": [net.weight], "weight_decay": 0.05}, {"params": [net.bias], "weight_decay": 0.0}]
    assert optimizer_hyperparameters(torch.optim.AdamW(groups, lr=3e-4), args) == OptimizerLaw(
        "AdamW", 3e-4, 0.05, 0.0, 0.0, False)
    sgd = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, dampening=0.1, weight_decay=1e-4)
    assert optimizer_hyperparameters(SimpleNamespace(optimizer=sgd), args) == OptimizerLaw(
        "SGD", 0.2, 1e-4, 0.9, 0.1, False)
    assert optimizer_hyperparameters(None, args) == OptimizerLaw("adamw_torch", 1e-3, 0.01, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="every_n_steps"):
        FlagAlignmentCallback(every_n_steps=0)


def test_transformer_model_keys(tmp_path):
    """Tiny Llama (SwiGLU, grouped-query attention), AdamW (the Trainer's default): kappa beside its baseline for every
    pair kind; the law's series only on the up -> down pairs (diag D; the gate pair is SiLU, V -> O shares V across
    query heads, the residual pairs are not composed), with no predicted number under AdamW."""
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
    for kind in ("mlp", "mlp_gate", "vo", "residual"):
        for key in (f"{kind}/commutator_ratio", f"{kind}/commutator_ratio_baseline"):
            assert last[f"flag/{key}"] == pytest.approx(expected[key], rel=1e-9), key
    # whether kappa reads there (MATH.md §3), logged beside it: from the ranks (n = d_ff with ranks d: no; n =
    # head_dim or d with a full-rank factor: yes), and as the card reads it
    layout = analyze(model, cheap=True, composition="none").layout
    ranks = {"mlp": (layout["d_model"], layout["d_model"], layout["d_ff"]),
             "mlp_gate": (layout["d_model"], layout["d_model"], layout["d_ff"]),
             "vo": (layout["head_dim"], layout["head_dim"], layout["head_dim"]),
             "residual": (layout["d_model"], layout["d_model"], layout["d_model"])}
    for kind, (rank_a, rank_b, n) in ranks.items():
        flag = last[f"flag/{kind}/commutator_reading_holds"]
        assert flag is commutator_reading_holds(min(rank_a, n), min(rank_b, n), n), kind
        assert flag is readings.kappa_reads(analyze(model, cheap=True, composition="none"), kind), kind
    assert [last[f"flag/{k}/commutator_reading_holds"] for k in ("mlp", "mlp_gate", "vo", "residual")] == \
           [False, False, True, True]
    assert last["flag/law/mlp/imbalance_diagonal_norm"] == pytest.approx(expected["mlp/imbalance_diagonal_norm"],
                                                                        rel=1e-9)  # Llama has no biases
    stem = "flag/law/mlp/imbalance_diagonal_norm"
    assert {k for k in last if k.startswith("flag/law/")} == {stem, f"{stem}_decay_rate", f"{stem}_decay_rate_r2"}
    law = law_text(trainer)
    assert law.startswith("no closed-form law (AdamW") and "residual (not composed)" in law
    assert "mlp_gate (silu)" in law and "vo (grouped-query V)" in law
