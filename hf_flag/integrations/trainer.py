"""``FlagAlignmentCallback``: alignment diagnostics and the weight-decay law of the imbalance during training.

Every ``every_n_steps`` optimizer steps (and at each evaluation) the callback runs ``hf_flag.analyze(..., cheap=True)``
on the parameters the optimizer decays (below) and logs through ``Trainer.log`` (so to ``state.log_history`` and
every reporting integration: TensorBoard, W&B, ...), each value beside its baseline:

- ``flag/<kind>/commutator_ratio`` beside ``flag/<kind>/commutator_ratio_baseline`` (kappa's Haar RMS, MATH.md §3),
  mean over the pair rows of each kind (``mlp``, ``mlp_gate``, ``vo``, ``residual``, ``linear_chain``), with
  ``flag/<kind>/commutator_reading_holds`` (a bool, logged with every kappa): whether kappa reads as alignment for
  every pair of that kind (MATH.md §3 "When kappa reads as alignment":
  :func:`~hf_flag.geometry.pairs.commutator_reading_holds`, as the model cards read it).  Where it is ``False``
  (the MLP pairs of a transformer: both weights rank-deficient in the d_ff hidden space) kappa and its baseline
  are logged for continuity but do not measure alignment: small kappa there can mean ranges that miss each other.
  The range overlap that reads there instead (``range_overlap``, as on the cards) needs more than the callback's
  cheap analysis: ``hf-flag analyze`` (or ``hf_flag.analyze``) computes it on a saved checkpoint;
- the imbalance decay law (MATH.md §2), per pair kind and only on the pairs it governs
  (:func:`~hf_flag.geometry.dynamics.imbalance_law_scope`: ``||D||_F`` of linear pairs, ``||diag D||`` of pairs
  with the per-unit rescaling symmetry: ReLU-like and the up projection of gated MLPs; never the residual pairs,
  nor per-query-head V -> O pairs under grouped-query attention): ``flag/law/<kind>/<metric>`` beside
  ``flag/law/<kind>/<metric>_predicted`` (the law's value from the first logged one) and, for ``imbalance_norm``,
  ``flag/law/<kind>/imbalance_norm_baseline`` (its Haar RMS over rotations of the hidden basis, MATH.md §2: what
  weights of the same spectra in random relative orientation give), and from three logged points
  on ``flag/law/<kind>/<metric>_decay_rate`` (fitted, with ``_decay_rate_r2``) beside
  ``flag/law/<kind>/<metric>_decay_rate_predicted``.  The law comes from the optimizer the Trainer built
  (:func:`optimizer_hyperparameters`) and whether each step sees the whole training set: SGD with or without
  momentum has a predicted rate (exact only for full-batch GD; minibatch SGD has a gradient-noise floor); AdamW
  and every other optimizer have none, and their measured rate is logged alone.  ``flag/law`` (a string, logged
  when it changes) names the law, the hyperparameters, the pairs governed and those that are not.

Decayed parameters: the Trainer puts biases and norms in a group without weight decay
(``Trainer.get_decay_parameter_names``).  The callback reads the optimizer's groups (falling back on that list when
the optimizer holds flattened copies, as DeepSpeed's does) and analyses a view of the model without the biases the
optimizer does not decay, so ``D`` is the imbalance of the decayed weights (the bias-augmented ``D`` plateaus at
``-b b^T`` when ``b`` is not decayed).

A ``TrainerCallback`` receives no trainer; bind it once (``FlagAlignmentCallback.attach(trainer)``, or
``callback.bind(trainer)`` after ``Trainer(callbacks=[callback])``).  An unbound callback still appends its values to
``state.log_history`` but reporting integrations do not see them (a warning says so).  The binding is keyed by the
model, so the instance the Trainer re-creates when restoring a checkpoint's callback state stays bound.

Distributed: under DDP the model is unwrapped and the diagnostics run on the world-process-zero rank only, with no
collectives and without touching the Trainer's control flags (logging through ``Trainer.log`` keeps
``control.should_log``).  Sharded parameters (FSDP2 ``fully_shard``, FSDP1, DeepSpeed ZeRO-3): every rank gathers
one sharding unit's parameters at a time through the sharding library's own API (:func:`gathered_copies`), rank 0
keeps copies of one layer and the next (the residual pair reads both) and computes that layer's rows, and the
copies are freed before the next layer: the peak is two unsharded layers (the unit is what the wrapping policy made
it: a decoder layer under the Trainer's transformer auto-wrap; a plain MLP chain is gathered whole).
Anything the callback cannot measure makes it warn once and skip; it never raises into the Trainer.  The history is
saved with checkpoints through ``TrainerState.stateful_callbacks`` (``ExportableState``) and restored on
``resume_from_checkpoint``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_flag.errors import InputError
from hf_flag.geometry import stats
from hf_flag.geometry.dynamics import (GATED_LINEAR, fit_decay_rate, imbalance_law_scope, predicted_decay_curve,
                                       predicted_decay_rate)
from hf_flag.integrations.readings import KAPPA_READS, kappa_reads_in_rows
from hf_flag.report import baseline_key
from hf_flag.rows import KIND_MLP, KIND_RESIDUAL, KIND_VO, sort_rows, summarize

__all__ = ["FlagAlignmentCallback", "OptimizerLaw", "optimizer_hyperparameters", "decayed_view", "gathered_copies",
           "sharding_kind"]

LAW_KEY = "flag/law"
#: metric of the imbalance the law governs, per scope (MATH.md §2)
SCOPE_METRIC = {"full": "imbalance_norm", "diagonal": "imbalance_diagonal_norm"}
#: name parts that wrappers insert between a model's own module names (FSDP1, activation checkpointing)
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

# model -> weak reference to the Trainer bound to it (survives the Trainer re-creating the callback on resume)
_BOUND: "weakref.WeakKeyDictionary[Any, weakref.ref]" = weakref.WeakKeyDictionary()


class OptimizerLaw(NamedTuple):
    """The decayed parameter group's law inputs (MATH.md §2) and the optimizer's class name."""

    name: str
    lr: float
    weight_decay: float
    momentum: float
    dampening: float
    nesterov: bool


def innermost_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and DeepSpeed's ZeRO wrappers)."""
    seen = set()
    while getattr(optimizer, "optimizer", None) is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_hyperparameters(optimizer: Any, args: TrainingArguments) -> OptimizerLaw:
    """Law inputs of the decayed parameter group (the group with the largest weight decay: the Trainer puts biases
    and norms in a group without decay).  Without an optimizer: ``args.optim``, ``args.learning_rate`` and
    ``args.weight_decay``, no momentum."""
    opt = innermost_optimizer(optimizer)
    if opt is None or not getattr(opt, "param_groups", None):
        return OptimizerLaw(str(args.optim), float(args.learning_rate), float(args.weight_decay), 0.0, 0.0, False)
    group = max(opt.param_groups, key=lambda g: g.get("weight_decay", 0.0))
    return OptimizerLaw(type(opt).__name__, float(group["lr"]), float(group.get("weight_decay", 0.0)),
                        float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0)),
                        bool(group.get("nesterov", False)))


def clean_name(name: str) -> str:
    """A parameter name without the parts FSDP1 and activation-checkpoint wrappers insert."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def decayed_parameter_names(net: nn.Module, optimizer: Any, trainer: Any) -> frozenset[str]:
    """Clean names of the parameters the optimizer decays: from its groups (by identity) when it holds the model's
    own parameters, else the Trainer's decay list (``Trainer.get_decay_parameter_names``: no biases, no norms)."""
    from transformers import Trainer

    named = [(clean_name(n), p) for n, p in net.named_parameters()]
    opt = innermost_optimizer(optimizer)
    decay = {id(p): float(g.get("weight_decay", 0.0)) for g in getattr(opt, "param_groups", None) or []
             for p in g["params"]}
    if decay and all(id(p) in decay for _, p in named if p.requires_grad):
        return frozenset(n for n, p in named if decay.get(id(p), 0.0) > 0)
    rule = trainer.get_decay_parameter_names if trainer is not None else (
        lambda model: Trainer.get_decay_parameter_names(None, model))
    return frozenset(clean_name(n) for n in rule(net))


def decayed_view(module: nn.Module, hidden: frozenset[str], tensors: Optional[dict[str, torch.Tensor]] = None,
                 prefix: str = "") -> nn.Module:
    """A structural copy of ``module`` that shares every tensor, without the parameters named in ``hidden`` (clean
    names) and with those in ``tensors`` (clean name -> tensor: gathered copies) put in place of the module's own,
    FSDP1 / activation-checkpoint wrappers replaced by the module they wrap, and no state-dict hooks (FSDP2's
    return shards): what ``analyze`` reads.  The model itself is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    tensors = tensors or {}
    while type(module).__name__ in ("FullyShardedDataParallel", "CheckpointWrapper"):
        module = getattr(module, "_fsdp_wrapped_module", None) or module._checkpoint_wrapped_module
    # FSDP2 swaps in a subclass that also rebuilds instances through the original class: copy as that class
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    view = object.__new__(cls)
    view.__dict__.update(module.__dict__)
    view._parameters = OrderedDict((k, None if f"{prefix}{k}" in hidden else tensors.get(f"{prefix}{k}", p))
                                   for k, p in module._parameters.items())
    view._modules = OrderedDict((k, None if c is None else decayed_view(c, hidden, tensors, f"{prefix}{k}."))
                                for k, c in module._modules.items())
    view._state_dict_hooks = OrderedDict()
    view._state_dict_pre_hooks = OrderedDict()
    return view


def sharding_kind(net: nn.Module) -> Optional[str]:
    """``"fsdp2"`` (DTensor parameters of ``fully_shard``), ``"fsdp1"`` (``FullyShardedDataParallel`` units),
    ``"zero3"`` (DeepSpeed partitioned parameters) or ``None`` (whole tensors)."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in net.modules()):
        return "fsdp1"
    params = list(net.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return "zero3"
    if any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params):
        return "fsdp2"
    return None


def sharding_units(net: nn.Module, kind: str) -> dict[str, Any]:
    """Clean module prefix -> FSDP unit (FSDP2 ``FSDPModule`` / FSDP1 ``FullyShardedDataParallel``); ``""`` is the
    root when it is one."""
    if kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        return {clean_name(n): m for n, m in net.named_modules() if isinstance(m, FSDPModule)}
    units = {}
    for n, m in net.named_modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            units[clean_name(n + ".").rstrip(".")] = m
    return units


def owning_unit(name: str, units: dict[str, Any]) -> Optional[str]:
    """The deepest unit prefix that holds parameter ``name``."""
    holders = [p for p in units if p == "" or name.startswith(p + ".")]
    return max(holders, key=len) if holders else None


@contextlib.contextmanager
def unit_gathered(kind: str, unit: Any, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Every rank: one sharding unit's parameters whole inside the block, sharded again after it.  FSDP2:
    ``unit.unshard()`` / ``unit.reshard()``; FSDP1: ``summon_full_params(unit, recurse=False, writeback=False)``;
    ZeRO-3: ``deepspeed.zero.GatheredParameters(params)``; no unit: nothing to gather."""
    if kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    elif unit is None:
        yield
    elif kind == "fsdp2":
        unit.unshard()
        try:
            yield
        finally:
            unit.reshard()
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            yield


def gathered_copies(net: nn.Module, kind: str, names: Sequence[str], *, keep: bool) -> dict[str, torch.Tensor]:
    """Whole copies of the parameters ``names`` (clean) of a sharded ``net``, gathered one sharding unit at a time
    (:func:`unit_gathered`; FSDP1 clobbers sibling units summoned together) and freed before the next, kept on the
    ranks with ``keep`` (the others take part in the collectives only).  A collective: every rank calls it with the
    same names."""
    wanted = list(dict.fromkeys(names))
    named = {clean_name(n): p for n, p in net.named_parameters()}
    if kind == "zero3":
        groups = [(None, wanted)]
    else:
        units = sharding_units(net, kind)
        by_unit: dict[Optional[str], list[str]] = {}
        for name in wanted:
            by_unit.setdefault(owning_unit(name, units), []).append(name)
        groups = [(units.get(prefix) if prefix is not None else None, group) for prefix, group in by_unit.items()]
    copies: dict[str, torch.Tensor] = {}
    for unit, group in groups:
        with unit_gathered(kind, unit, [named[n] for n in group if n in named]):
            if keep:
                current = {clean_name(n): p for n, p in net.named_parameters()}
                copies.update({n: current[n].detach().clone() for n in group if n in current})
    return copies


def is_full_batch(train_dataloader: Any, args: TrainingArguments) -> Optional[bool]:
    """Whether every optimizer step sees the whole training set (``None`` when the dataset has no length)."""
    try:
        n = len(train_dataloader.dataset)
    except (AttributeError, TypeError):
        return None
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    return n <= per_step


def hidden_activation(row: Any, layout: dict) -> Optional[str]:
    """What ``W_next`` reads of ``W_l``'s output in a pair row, for :func:`imbalance_law_scope`: ``None`` for the
    residual pairs (norms, attention and the residual sum lie between) and for V -> O pairs of query heads that
    share a value projection (grouped-query attention); the gated factor for the up projection of a gated MLP."""
    if row.kind == KIND_RESIDUAL:
        return None
    if row.kind == KIND_VO:
        return "identity" if layout.get("n_kv_heads") == layout.get("n_heads") else None
    if row.kind == KIND_MLP and layout.get("gated_mlp"):
        return GATED_LINEAR
    return row.details.get("activation")


class LawSeries(NamedTuple):
    """What :func:`law_series` reads from one measurement's rows."""

    values: dict[str, float]  # "<kind>/<metric>" -> mean over the rows the law governs (MATH.md §2)
    baselines: dict[str, float]  # same keys -> mean of the metric's Haar baseline over those rows (where it has one)
    ungoverned: dict[str, str]  # kind -> why the law does not govern the other rows of that kind


def law_series(rows: Sequence[Any], layout: dict) -> LawSeries:
    """The imbalance the law governs per pair kind (MATH.md §2), each beside its Haar baseline, means over layers
    by :func:`hf_flag.geometry.stats.mean` (MATH.md §8)."""
    sums: dict[str, list[float]] = {}
    bases: dict[str, list[Optional[float]]] = {}
    ungoverned: dict[str, str] = {}
    for row in rows:
        activation = hidden_activation(row, layout)
        scope = imbalance_law_scope(activation)
        if scope is None:
            ungoverned[row.kind] = str(activation or ("grouped-query V" if row.kind == KIND_VO else "not composed"))
            continue
        value = row.values.get(SCOPE_METRIC[scope])
        if value is not None and math.isfinite(value):
            key = f"{row.kind}/{SCOPE_METRIC[scope]}"
            sums.setdefault(key, []).append(value)
            bases.setdefault(key, []).append(row.values.get(baseline_key(SCOPE_METRIC[scope])))
    baselines = {k: stats.mean(b) for k, b in bases.items() if all(x is not None and math.isfinite(x) for x in b)}
    return LawSeries({k: stats.mean(v) for k, v in sums.items()}, baselines, ungoverned)


def logged_summary(rows: Sequence[Any]) -> dict[str, Any]:
    """``flag/<kind>/commutator_ratio`` beside ``flag/<kind>/commutator_ratio_baseline`` (kinds with both), each
    with ``flag/<kind>/commutator_reading_holds`` (a bool: whether kappa reads as alignment for every pair of the
    kind, MATH.md §3; left out when the rows do not record it)."""
    summary = summarize(rows)
    out: dict[str, Any] = {}
    for key, value in summary.items():
        kind, _, metric = key.partition("/")
        base = summary.get(f"{kind}/commutator_ratio_baseline")
        if metric == "commutator_ratio" and base is not None and math.isfinite(value) and math.isfinite(base):
            out[f"flag/{key}"], out[f"flag/{key}_baseline"] = float(value), float(base)
            reads = kappa_reads_in_rows([r for r in rows if r.kind == kind])
            if reads is not None:
                out[f"flag/{kind}/{KAPPA_READS}"] = reads
    return out


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
            raise InputError(f"FlagAlignmentCallback: every_n_steps={every_n_steps!r} must be an int >= 1")
        self.every_n_steps = every_n_steps
        self.diagnostics = list(diagnostics) if diagnostics is not None else None
        self.on_evaluate_enabled = on_evaluate
        self.layers = list(layers) if layers is not None else None
        self.composition = composition
        self.history: dict[str, list[list[float]]] = {}
        self.lr_history: list[list[float]] = []
        self.last_step: Optional[int] = None
        self.last_law: Optional[str] = None
        self.full_batch: Optional[bool] = None
        self.sharding: Optional[str] = None
        self._trainer_ref: Optional[weakref.ref] = None
        self._warned: set[str] = set()
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

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

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
            self.sharding = sharding_kind(_unwrap(model))
        self.full_batch = is_full_batch(kwargs.get("train_dataloader"), args)
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
        model = kwargs.get("model")
        if not due or self.last_step == state.global_step or model is None:
            return
        if not state.is_world_process_zero and self.sharding is None:
            return  # unsharded: rank 0 measures alone, no collectives
        trainer = self._trainer(model)
        try:
            logs = self.measure(model, state.global_step, optimizer_hyperparameters(kwargs.get("optimizer"), args),
                                optimizer=kwargs.get("optimizer"), trainer=trainer,
                                compute=state.is_world_process_zero)
        except Exception as err:  # never raise into the user's training run
            self.last_step = state.global_step
            self._warn_once("measure", f"FlagAlignmentCallback could not measure at step {state.global_step} and "
                                       f"skips ({type(err).__name__}: {err}); training continues")
            return
        if state.is_world_process_zero and logs:
            self._emit(logs, state, model)

    # --- measurement -----------------------------------------------------------------------------------------------
    def rows(self, net: nn.Module, hidden: frozenset[str], compute: bool) -> tuple[list, dict]:
        """Cheap pair rows of the decayed view of ``net`` and its layout; sharded: one layer gathered at a time on
        every rank, computed on the rank with ``compute``."""
        from hf_flag.analysis.api import analyze

        options = dict(cheap=True, diagnostics=self.diagnostics, composition=self.composition, name="flag_callback")
        device = next(net.parameters()).device
        if self.sharding is None:
            report = analyze(decayed_view(net, hidden), device=device, layers=self.layers, **options)
            return report.rows, report.layout
        from hf_flag.weights.adapters import get_adapter
        from hf_flag.weights.module_source import ModuleSource

        source = ModuleSource(decayed_view(net, hidden))
        if not source.config:  # a plain chain has no layers to gather one at a time: gather it whole
            tensors = gathered_copies(net, self.sharding, source.keys(), keep=compute)
            if not compute:
                return [], {}
            report = analyze(decayed_view(net, hidden, tensors), device=device, layers=self.layers, **options)
            return report.rows, report.layout
        adapter = get_adapter(source.config, source.keys())
        layout = adapter.layout(source.config, source.keys())
        rows, facts, failure, cached = [], {}, None, {}
        for i in (self.layers if self.layers is not None else range(layout.n_layers)):
            for j in (i, i + 1):  # layer i's rows read layer i + 1 (the residual pair)
                if j < layout.n_layers and j not in cached:
                    cached[j] = gathered_copies(net, self.sharding, adapter.block_tensor_names(layout, j),
                                                keep=compute)
            tensors = {**cached.pop(i), **cached.get(i + 1, {})}
            if compute and failure is None:
                try:  # keep gathering on every rank even when this one fails: the collectives must match
                    report = analyze(decayed_view(net, hidden, tensors), device=device, layers=[i], **options)
                    rows += report.rows
                    facts = report.layout
                except Exception as err:
                    failure = err
        if failure is not None:
            raise failure
        return sort_rows(rows), facts

    def measure(self, model: Any, step: int, hyper: OptimizerLaw, *, optimizer: Any = None, trainer: Any = None,
                compute: bool = True) -> dict[str, Any]:
        """Analyse ``model`` now, extend the history and return the log entries (MATH.md §2 for the decay law)."""
        net = _unwrap(model)
        decayed = decayed_parameter_names(net, optimizer, trainer)
        hidden = frozenset(clean_name(n) for n, _ in net.named_parameters()
                           if clean_name(n).endswith("bias") and clean_name(n) not in decayed)
        rows, layout = self.rows(net, hidden, compute)
        self.last_step = step  # on every rank: an evaluation at a measured step must not gather again on one only
        if not compute:
            return {}
        logs: dict[str, Any] = logged_summary(rows)
        self.lr_history.append([step, hyper.lr])
        mean_lr = stats.mean([p[1] for p in self.lr_history])
        rate, law = predicted_decay_rate(hyper.name, mean_lr, hyper.weight_decay, hyper.momentum,
                                         dampening=hyper.dampening, nesterov=hyper.nesterov,
                                         full_batch=self.full_batch)
        values, baselines, ungoverned = law_series(rows, layout)
        for key, value in values.items():
            series = self.history.setdefault(key, [])
            series.append([step, value])
            stem = f"flag/law/{key}"
            logs[stem] = value
            if key in baselines:
                logs[baseline_key(stem)] = baselines[key]
            if rate is not None:
                logs[f"{stem}_predicted"] = predicted_decay_curve(series[0][1], [series[0][0], step], rate)[-1]
            points = [p for p in series if p[1] > 0]
            if len(points) >= 3 and len({p[0] for p in points}) >= 2:
                fitted, r2 = fit_decay_rate([p[0] for p in points], [p[1] for p in points])
                logs[f"{stem}_decay_rate"], logs[f"{stem}_decay_rate_r2"] = fitted, r2
                if rate is not None:
                    logs[f"{stem}_decay_rate_predicted"] = rate
        description = law_description(law, hyper, sorted(values), ungoverned, bool(hidden), rate is not None)
        if description != self.last_law:
            logs[LAW_KEY] = self.last_law = description
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
        self._warn_once("unbound", "FlagAlignmentCallback is not bound to a Trainer: values go to state.log_history "
                                   "only, not to TensorBoard/W&B; use FlagAlignmentCallback.attach(trainer) or "
                                   "callback.bind(trainer)")


def law_description(law: str, hyper: OptimizerLaw, governed: Sequence[str], ungoverned: dict[str, str],
                    biases_hidden: bool, governs: bool) -> str:
    """The ``flag/law`` string: law, optimizer inputs (the rate uses the mean learning rate over the measurements),
    the series it governs (``governs``: the law has a rate; else the series whose rate is only measured) and the
    pair kinds it does not."""
    parts = [f"{law}; {hyper.name} weight_decay={hyper.weight_decay:g} momentum={hyper.momentum:g} "
             f"dampening={hyper.dampening:g} nesterov={hyper.nesterov}",
             ("governs: " if governs else "measured on: ") + (", ".join(governed) or "no pair"),
             "not governed: " + (", ".join(f"{k} ({why})" for k, why in sorted(ungoverned.items())) or "none")]
    if biases_hidden:
        parts.append("biases the optimizer does not decay are left out of D")
    return " | ".join(parts)


def _unwrap(model: Any) -> Any:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)
