"""``FlagAlignmentCallback``: alignment diagnostics and the weight-decay law of the imbalance during training.

Every ``every_n_steps`` optimizer steps (and at each evaluation) the callback runs
``hf_flag.analyze(model, cheap=True)`` on the unwrapped model, on the model's own device (weights are read
in place, never copied to the CPU as a whole), and logs ``Report.summary`` through ``Trainer.log`` under
``flag/<kind>/<metric>`` (e.g. ``flag/mlp/commutator_ratio``, ``flag/linear_chain/imbalance_norm``), so the values
reach ``state.log_history`` and every reporting integration (TensorBoard, W&B, ...).  From the logged history it fits
the exponential decay rate of the imbalance (MATH.md §2) and logs it next to the rate the optimizer predicts:

- ``flag/imbalance_decay_rate`` / ``flag/imbalance_decay_r2``: fit of the mean ``imbalance_norm`` over pair rows;
- ``flag/imbalance_diagonal_decay_rate`` / ``flag/imbalance_diagonal_decay_r2``: same for ``imbalance_diagonal_norm``;
- ``flag/imbalance_decay_rate_predicted`` and, when it changes, ``flag/imbalance_decay_law`` (a string).

A ``TrainerCallback`` receives no trainer; bind it once (``FlagAlignmentCallback.attach(trainer)``, or
``callback.bind(trainer)`` after ``Trainer(callbacks=[callback])``).  An unbound callback still appends its values to
``state.log_history`` but reporting integrations do not see them (a warning says so).  The binding is keyed by the
model, so the instance the Trainer re-creates when restoring a checkpoint's callback state stays bound.

Distributed: under DDP (accelerate) the model is unwrapped and the diagnostics run on the world-process-zero rank
only, with no collectives and without touching the Trainer's control flags (logging through ``Trainer.log`` keeps
``control.should_log``), so every rank runs the same collectives (tests/integrations/test_trainer_ddp.py).
DeepSpeed ZeRO-3 and FSDP shard the parameters: the callback refuses at ``on_train_begin`` with a ``ValueError``.
The history is saved with checkpoints through ``TrainerState.stateful_callbacks`` (``ExportableState``) and restored
on ``resume_from_checkpoint`` (by the Trainer when ``restore_callback_states_from_checkpoint=True``, else by the
callback itself at ``on_train_begin``).
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Optional, Sequence

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_flag.errors import HfFlagError
from hf_flag.geometry.dynamics import fit_decay_rate, predicted_decay_rate

__all__ = ["FlagAlignmentCallback", "ShardedModelError", "optimizer_hyperparameters"]

#: per-row values whose mean over pair rows is tracked, and the log key stem of their decay rate
TRACKED = {"imbalance_norm": "flag/imbalance_decay", "imbalance_diagonal_norm": "flag/imbalance_diagonal_decay"}
LAW_KEY = "flag/imbalance_decay_law"
PREDICTED_KEY = "flag/imbalance_decay_rate_predicted"

# model -> weak reference to the Trainer bound to it (survives the Trainer re-creating the callback on resume)
_BOUND: "weakref.WeakKeyDictionary[Any, weakref.ref]" = weakref.WeakKeyDictionary()


class ShardedModelError(HfFlagError, ValueError):
    """The model's parameters are sharded (DeepSpeed ZeRO-3, FSDP): weight geometry needs whole matrices."""


def optimizer_hyperparameters(optimizer: Any, args: TrainingArguments) -> tuple[str, float, float, float]:
    """``(name, lr, weight_decay, momentum)`` of the decayed parameter group (MATH.md §2's law inputs).

    Reads the torch optimizer (unwrapping accelerate's ``AcceleratedOptimizer``); the group with the largest weight
    decay is used (the Trainer puts biases and norms in a group without decay).  Without an optimizer, falls back to
    ``args.optim``, ``args.learning_rate`` and ``args.weight_decay``.
    """
    opt = getattr(optimizer, "optimizer", optimizer)
    if opt is None or not getattr(opt, "param_groups", None):
        return str(args.optim), float(args.learning_rate), float(args.weight_decay), 0.0
    group = max(opt.param_groups, key=lambda g: g.get("weight_decay", 0.0))
    return (type(opt).__name__, float(group["lr"]), float(group.get("weight_decay", 0.0)),
            float(group.get("momentum", 0.0)))


def _unwrap(model: Any) -> Any:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _check_unsharded(args: TrainingArguments, model: Any) -> None:
    """Raise :class:`ShardedModelError` under DeepSpeed ZeRO-3 or FSDP (parameters are shards, not matrices)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    sharded = bool(getattr(args, "fsdp", None)) or is_deepspeed_zero3_enabled() or any(
        hasattr(p, "ds_id") or type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
        for p in model.parameters())
    if sharded:
        raise ShardedModelError(
            "FlagAlignmentCallback: the model's parameters are sharded (DeepSpeed ZeRO-3 or FSDP) and weight geometry "
            "needs whole matrices; remove the callback, or use DDP / ZeRO-1/2, or run hf-flag analyze on checkpoints")


def _row_mean(report: Any, metric: str) -> Optional[float]:
    """Mean of ``metric`` over the report's rows that have a finite value of it (None when none do)."""
    vals = [r.values[metric] for r in report.rows
            if r.values.get(metric) is not None and math.isfinite(r.values[metric])]
    return sum(vals) / len(vals) if vals else None


class FlagAlignmentCallback(TrainerCallback, ExportableState):
    """Log hf-flag's weight-only alignment diagnostics and the imbalance decay law during ``Trainer.train``.

    Args:
        every_n_steps: measure when ``global_step % every_n_steps == 0`` (step 0 included).
        diagnostics: passed to ``analyze`` (default: all that apply to the architecture).
        on_evaluate: also measure at each evaluation (once per step).
        layers: block indices passed to ``analyze`` (default all).
        composition: ``analyze``'s composition mode; ``"none"`` by default (all-pairs composition is the costly part).
        trainer: the Trainer to log through (or call :meth:`bind` / :meth:`attach` later).
    """

    def __init__(self, every_n_steps: int = 50, diagnostics: Optional[Sequence[str]] = None, on_evaluate: bool = True,
                 layers: Optional[Sequence[int]] = None, composition: str = "none", trainer: Any = None) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"FlagAlignmentCallback: every_n_steps={every_n_steps!r} must be an int >= 1")
        self.every_n_steps = every_n_steps
        self.diagnostics = list(diagnostics) if diagnostics is not None else None
        self.on_evaluate_enabled = on_evaluate
        self.layers = list(layers) if layers is not None else None
        self.composition = composition
        self.history: dict[str, list[list[float]]] = {metric: [] for metric in TRACKED}
        self.lr_history: list[list[float]] = []
        self.last_step: Optional[int] = None
        self.last_law: Optional[str] = None
        self._trainer_ref: Optional[weakref.ref] = None
        self._warned_unbound = False
        if trainer is not None:
            self.bind(trainer)

    # --- binding -----------------------------------------------------------------------------------------------
    def bind(self, trainer: Any) -> "FlagAlignmentCallback":
        """Log through ``trainer.log`` from now on (also for the instance re-created on checkpoint resume)."""
        self._trainer_ref = weakref.ref(trainer)
        if trainer.model is not None:
            _BOUND[trainer.model] = self._trainer_ref
        return self

    @classmethod
    def attach(cls, trainer: Any, **kwargs: Any) -> "FlagAlignmentCallback":
        """Create a callback, add it to ``trainer`` and bind it: ``FlagAlignmentCallback.attach(trainer, ...)``."""
        callback = cls(**kwargs)
        trainer.add_callback(callback)
        return callback.bind(trainer)

    def _trainer(self, model: Any) -> Any:
        ref = self._trainer_ref or (_BOUND.get(model) if model is not None else None)
        return ref() if ref is not None else None

    # --- ExportableState -----------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "args": {"every_n_steps": self.every_n_steps, "diagnostics": self.diagnostics,
                     "on_evaluate": self.on_evaluate_enabled, "layers": self.layers, "composition": self.composition},
            "attributes": {"history": self.history, "lr_history": self.lr_history, "last_step": self.last_step,
                           "last_law": self.last_law},
        }

    # --- events --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs.get("model")
        if model is not None:
            _check_unsharded(args, _unwrap(model))
        self._restore_from(state)
        self._maybe_measure(args, state, kwargs, scheduled=True)

    def _restore_from(self, state: TrainerState) -> None:
        """On resume, take the history from the checkpoint's ``stateful_callbacks`` (when the Trainer did not:
        ``restore_callback_states_from_checkpoint`` is False by default)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step == 0 or self.last_step is not None or not saved:
            return
        saved = saved[0] if isinstance(saved, list) else saved
        for name, value in saved.get("attributes", {}).items():
            setattr(self, name, value)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._maybe_measure(args, state, kwargs, scheduled=True)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._maybe_measure(args, state, kwargs, scheduled=self.on_evaluate_enabled)

    def _maybe_measure(self, args: TrainingArguments, state: TrainerState, kwargs: dict, *, scheduled: bool) -> None:
        due = scheduled and (state.global_step % self.every_n_steps == 0 or kwargs.get("metrics") is not None)
        if not due or not state.is_world_process_zero or self.last_step == state.global_step:
            return
        model = kwargs.get("model")
        if model is None:
            return
        logs = self.measure(model, state.global_step, optimizer_hyperparameters(kwargs.get("optimizer"), args))
        self._emit(logs, state, model)

    # --- measurement -----------------------------------------------------------------------------------------------
    def measure(self, model: Any, step: int, hyper: tuple[str, float, float, float]) -> dict[str, Any]:
        """Analyse ``model`` now, extend the history and return the log entries (MATH.md §2 for the decay law)."""
        from hf_flag.analysis.api import analyze

        net = _unwrap(model)
        device = next(net.parameters()).device
        report = analyze(net, device=device, cheap=True, diagnostics=self.diagnostics, layers=self.layers,
                         composition=self.composition, name="flag_callback")
        logs: dict[str, Any] = {f"flag/{key}": float(value) for key, value in report.summary.items()
                                if isinstance(value, (int, float)) and math.isfinite(value)}
        self.last_step = step
        name, lr, weight_decay, momentum = hyper
        self.lr_history.append([step, lr])
        for metric, stem in TRACKED.items():
            value = _row_mean(report, metric)
            if value is not None:
                self.history[metric].append([step, value])
            points = [p for p in self.history[metric] if p[1] > 0]
            if len(points) >= 3 and len({p[0] for p in points}) >= 2:
                rate, r2 = fit_decay_rate([p[0] for p in points], [p[1] for p in points])
                logs[f"{stem}_rate"], logs[f"{stem}_r2"] = rate, r2
        mean_lr = sum(p[1] for p in self.lr_history) / len(self.lr_history)
        try:
            predicted, law = predicted_decay_rate(name, mean_lr, weight_decay, momentum)
        except ValueError as err:
            predicted, law = None, f"no law: {err}"
        if predicted is not None:
            logs[PREDICTED_KEY] = predicted
        if law != self.last_law:
            logs[LAW_KEY] = f"{law} ({name}, lr={mean_lr:g}, weight_decay={weight_decay:g}, momentum={momentum:g})"
            self.last_law = law
        return logs

    def _emit(self, logs: dict[str, Any], state: TrainerState, model: Any) -> None:
        trainer = self._trainer(model)
        if trainer is not None:
            # ``Trainer.log`` -> ``CallbackHandler.on_log`` clears ``control.should_log``: restore it, or the Trainer's
            # own loss log due at this step is dropped on rank 0 only, and under DDP rank 1 then waits in the loss
            # all-gather that rank 0 skipped (a collective mismatch: crash or hang)
            control = trainer.control
            should_log = control.should_log
            trainer.log(dict(logs))
            control.should_log = trainer.control.should_log = should_log
            return
        state.log_history.append({**logs, "step": state.global_step})
        if not self._warned_unbound:
            self._warned_unbound = True
            warnings.warn("FlagAlignmentCallback is not bound to a Trainer: values go to state.log_history only, not "
                          "to TensorBoard/W&B; use FlagAlignmentCallback.attach(trainer) or callback.bind(trainer)",
                          RuntimeWarning, stacklevel=2)
