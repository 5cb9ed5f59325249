"""flag_alignment: weight-only alignment geometry of a model, as an ``evaluate`` measurement (MATH.md §1-§6).

No mathematics here: every number is a value of :func:`hf_flag.analyze`'s :class:`~hf_flag.report.Report`
(headline scalars from ``Report.summary`` for the keys in ``HEADLINE_METRICS``; per-layer detail from its rows).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import datasets
import evaluate

from hf_flag.errors import InputError
from hf_flag.integrations.evaluate_modules._common import CITATION, has_pending_inputs

_DESCRIPTION = """\
Reads the alignment geometry of a network from its weights alone (no forward pass): for every pair of adjacent
weight matrices the commutator ratio kappa = ||[A, B]||_F / (||A||_F ||B||_F) of A = W_next^T W_next and
B = W_l W_l^T (0 for balanced linear nets, the paper's "commutator obstruction" otherwise), the imbalance
||W_next^T W_next - W_l W_l^T||_F, and, unless cheap=True, transport scores and flag relative positions; for
attention, the subspace overlap of heads and composition scores. Every value comes with its random baseline.
"""

_KWARGS_DESCRIPTION = """
Args:
    model_id (`str`, `os.PathLike`, or a `list` of them): local folders, `.safetensors` / `.gguf` files, or Hub ids
        (fetched through the HF cache; only the local cache with `HF_HUB_OFFLINE=1`); one string is one model, as
        in evaluate's perplexity.
    model (`torch.nn.Module`, optional, compute kwarg): an in-memory model, instead of (not with) `model_id`.
    cheap (`bool`, default False): commutator ratio (with its random baseline) and imbalance only (no SVDs: no
        range overlap, transport or flags).
    layers (`list` of `int`, optional): block indices to analyse (default all).
    diagnostics (`list` of `str`, optional): subset of "mlp", "vo", "residual", "heads", "composition".
    composition (`str`, default "all"): "all", "adjacent" or "none".
    device (`str`, optional): where to compute (default: the model's device, else CPU).
Returns:
    One model: `"<kind>/<metric>"` headline scalars (e.g. `"mlp/commutator_ratio"`, `"vo/commutator_ratio"`,
    `"head_overlap_o/overlap"`), each beside its random baseline `"<kind>/<metric>_baseline"` (None
    where the report has none), `"model"`, `"summary"` (every summary scalar),
    `"commutator_reading_holds"` (`{pair kind: bool}`: whether kappa reads as alignment on every row of that
    kind, MATH.md §3; where it is False, e.g. MLP pairs, read `"<kind>/range_overlap"` instead) and
    `"per_layer"` (`{kind: [{"layer", "target_layer", "source", "target", <metric>: value, ...,
    "commutator_reading_holds": bool}]}`).
    Several models: the same keys, each holding a list in `model_id` order.
Examples:
    >>> import evaluate
    >>> flag = evaluate.load("flag_alignment")  # doctest: +SKIP
    >>> flag.compute(model_id=["path/to/gpt2"])["mlp/commutator_ratio"]  # doctest: +SKIP
"""


ModelIds = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def model_id_list(model_id: ModelIds) -> list[str]:
    """``model_id`` as a list of strings: one ``str`` / ``os.PathLike`` is one model (evaluate's perplexity takes a
    single id), a list or tuple holds one per model; anything else is a one-line ``ValueError``."""
    items = [model_id] if isinstance(model_id, (str, os.PathLike)) else model_id
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, (str, os.PathLike)) for x in items):
        raise InputError(f"flag_alignment: model_id={model_id!r} must be a path or Hub id (str or os.PathLike) or a "
                         f"list of them")
    return [os.fspath(x) for x in items]


def headline_keys(summary: dict[str, float], headline: Sequence[str]) -> list[str]:
    """The ``headline`` keys present in ``summary``, each followed by its baseline key (present or not)."""
    from hf_flag.report import BASELINE_SUFFIX, baseline_key

    keys = [k for k in headline if k in summary and not k.endswith(BASELINE_SUFFIX)]
    return [name for k in keys for name in (k, baseline_key(k))]


def report_output(report: Any, headline: Sequence[str]) -> dict[str, Any]:
    """One report as the module's output: headline scalars flat, each beside its baseline (``None`` where the
    report has none), the full summary and per-layer rows nested."""
    from hf_flag.integrations.readings import KAPPA_READS, kappa_reads

    per_layer: dict[str, list[dict[str, Any]]] = {}
    for row in report.rows:
        reads = {KAPPA_READS: row.details[KAPPA_READS]} if KAPPA_READS in row.details else {}
        per_layer.setdefault(row.kind, []).append(
            {"layer": row.layer, "target_layer": row.target_layer, "source": row.source, "target": row.target,
             **row.values, **reads})
    out: dict[str, Any] = {key: report.summary.get(key) for key in headline_keys(report.summary, headline)}
    reading = {kind: kappa_reads(report, kind) for kind in per_layer if any(KAPPA_READS in r for r in per_layer[kind])}
    out.update({"model": report.model, "summary": dict(report.summary), KAPPA_READS: reading,
                "per_layer": per_layer})
    return out


def merge_outputs(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """One output unchanged; several as lists over the union of their keys (None where a model lacks one)."""
    if len(outputs) == 1:
        return outputs[0]
    keys = list(dict.fromkeys(k for o in outputs for k in o))
    return {k: [o.get(k) for o in outputs] for k in keys}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FlagAlignment(evaluate.Measurement):
    """Weight-only alignment diagnostics (commutator obstruction, imbalance, flags, head overlap) of a model."""

    def _info(self) -> evaluate.MeasurementInfo:
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"model_id": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/2605.09861"],
        )

    def compute(self, *, model: Any = None, **kwargs: Any) -> Optional[dict]:
        """``compute(model_id=[...])`` as every measurement, or ``compute(model=module)`` for an in-memory model."""
        if model is None:
            if kwargs.get("model_id") is not None:
                kwargs["model_id"] = model_id_list(kwargs["model_id"])
            return super().compute(**kwargs)
        if kwargs.get("model_id") is not None or has_pending_inputs(self):
            raise InputError("flag_alignment: pass either model_id=[...] or model=<nn.Module>, not both")
        return self._compute(model_id=None, model=model, **kwargs)

    def add_batch(self, **kwargs: Any) -> None:
        """``add_batch(model_id=...)`` takes what :meth:`compute` takes (a str, an os.PathLike or a list)."""
        if kwargs.get("model_id") is not None:
            kwargs["model_id"] = model_id_list(kwargs["model_id"])
        super().add_batch(**kwargs)

    def _compute(self, model_id: Optional[Sequence[str]] = None, model: Any = None, cheap: bool = False,
                 layers: Optional[Sequence[int]] = None, diagnostics: Optional[Sequence[str]] = None,
                 composition: str = "all", device: Optional[str] = None) -> dict[str, Any]:
        from hf_flag.analysis.api import analyze
        from hf_flag.rows import HEADLINE_METRICS

        targets = list(model_id or []) + ([model] if model is not None else [])
        if not targets:
            raise InputError("flag_alignment: no model given; pass model_id=['path or cached Hub id'] or model=...")
        reports = [analyze(t, device=device, cheap=cheap, layers=layers, diagnostics=diagnostics,
                           composition=composition) for t in targets]
        return merge_outputs([report_output(r, HEADLINE_METRICS) for r in reports])
