"""How a headline number is read to a person: its per-layer series, its spread, and the fixed verdict rule.

Shared by the model card (:mod:`hf_flag.integrations.cards`) and the plots (``hf_flag.harness.plots``), so a card
and its figure show the same per-layer means (``summarize``'s, as in ``Report.summary``).

Verdict rule (fixed here, before any run it judges; the card states it): with ``d_l = value_l - baseline_l`` the
per-layer differences over ``L`` layers, ``z = mean(d) / (sd(d) / sqrt(L))`` (``sd`` with ``L - 1`` degrees of
freedom; computed by ``hf_flag.geometry.stats.difference_z``, MATH.md §8).  The value is *above* (*below*) random
when ``L >= MIN_LAYERS`` and ``z >= Z_THRESHOLD`` (``<= -Z_THRESHOLD``); *at the random level* when
``|z| < Z_THRESHOLD``; *undetermined* with fewer layers or no baseline.  Equal differences in every layer (``sd = 0``) give ``z = +-inf`` (or 0 when they are all 0).  This is
a rule of reading, not a significance test: layers are not independent samples.

The commutator ratio kappa reads as alignment only where the pair's ranks allow it (MATH.md §3, "When kappa reads
as alignment"; ``hf_flag.geometry.pairs.commutator_reading_holds``): rows whose ``details`` say
``commutator_reading_holds: false`` are not read, and a report whose rows do not record it is not read either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from hf_flag.geometry.stats import difference_z, sample_sd
from hf_flag.report import Report, Row, baseline_key
from hf_flag.rows import KAPPA_READS, summarize

Z_THRESHOLD = 3.0
MIN_LAYERS = 3
#: row ``details`` key, set by the analysis from ``geometry.pairs.commutator_reading_holds``
ABOVE, BELOW, RANDOM, UNDETERMINED, NOT_READ = "above", "below", "random", "undetermined", "not read"


@dataclass(frozen=True)
class Reading:
    """One headline metric of one report, read by the rule above."""

    key: str  # "kind/metric"
    value: float  # the report's summary value (mean over rows)
    baseline: Optional[float]
    layers: tuple[int, ...]
    values: tuple[float, ...]  # per-layer means
    baselines: tuple[Optional[float], ...]
    z: Optional[float]
    verdict: str  # ABOVE, BELOW, RANDOM, UNDETERMINED or NOT_READ
    why: str  # why the verdict is UNDETERMINED / NOT_READ ("" otherwise)

    @property
    def spread(self) -> Optional[tuple[float, float, float]]:
        """``(sd, min, max)`` of the per-layer means (``None`` below two layers)."""
        if len(self.values) < 2:
            return None
        return sample_sd(self.values), min(self.values), max(self.values)


def layer_series(report: Report, kind: str, metric: str) -> tuple[list[int], list[float], list[Optional[float]]]:
    """``(layers, means, baseline means)`` of ``metric`` over the ``kind`` rows of each layer (layers where the
    metric is missing are skipped); the means are ``summarize``'s, as in ``Report.summary``."""
    layers, values, baselines = [], [], []
    for layer in sorted({r.layer for r in report.select(kind=kind)}):
        means = summarize(report.select(kind=kind, layer=layer))
        if f"{kind}/{metric}" not in means:
            continue
        layers.append(layer)
        values.append(means[f"{kind}/{metric}"])
        baselines.append(means.get(f"{kind}/{baseline_key(metric)}"))
    return layers, values, baselines


def z_score(values: list[float], baselines: list[Optional[float]]) -> Optional[float]:
    """The rule's ``z`` (module docstring); ``None`` when a baseline is missing or there are fewer than 2 layers."""
    if len(values) < 2 or any(b is None for b in baselines):
        return None
    return difference_z(values, baselines)


def kappa_reads(report: Report, kind: str) -> Optional[bool]:
    """Whether every ``kind`` row records that kappa reads as alignment (``None``: the rows do not say)."""
    return kappa_reads_in_rows(report.select(kind=kind))


def kappa_reads_in_rows(rows: Sequence[Row]) -> Optional[bool]:
    """Whether every row of ``rows`` records that kappa reads as alignment (``None``: none, or one does not say)."""
    flags = [r.details.get(KAPPA_READS) for r in rows]
    if not flags or any(f is None for f in flags):
        return None
    return all(bool(f) for f in flags)


def kappa_unread_where(report: Report, kind: str) -> str:
    """``"in N of M pairs"`` where kappa does not read as alignment on only some of the ``kind`` rows (MATH.md §3),
    ``""`` where it reads on none or on all of them."""
    rows = report.select(kind=kind)
    unread = sum(r.details.get(KAPPA_READS) is False for r in rows)
    return f"in {unread} of {len(rows)} pairs" if 0 < unread < len(rows) else ""


def read_metric(report: Report, key: str) -> Reading:
    """``key`` (``"kind/metric"``, present in ``report.summary``) read by the module's rule."""
    kind, _, metric = key.partition("/")
    layers, values, baselines = layer_series(report, kind, metric)
    baseline = report.summary.get(baseline_key(key))
    z = z_score(values, baselines)
    why = ""
    if metric == "commutator_ratio" and kappa_reads(report, kind) is not True:
        verdict = NOT_READ
        why = (f"kappa does not read as alignment {kappa_unread_where(report, kind) or 'here'}: both weights have rank below the hidden "
               "dimension n (at the storage precision), so directions one writes into the other's kernel commute "
               "for free; read the range overlap instead"
               + ("" if f"{kind}/range_overlap" in report.summary else
                  " (computed by the full report: hf-flag analyze --full)")
               if kappa_reads(report, kind) is False else
               "this report does not record whether kappa reads as alignment for these pairs (it needs the "
               "weights' ranks), so it is shown, not interpreted")
    elif baseline is None or z is None:
        verdict, why = UNDETERMINED, "no random baseline" if baseline is None else "fewer than 2 layers"
    elif len(values) < MIN_LAYERS:
        verdict, why = UNDETERMINED, f"{len(values)} layers (the rule needs {MIN_LAYERS})"
    else:
        verdict = ABOVE if z >= Z_THRESHOLD else BELOW if z <= -Z_THRESHOLD else RANDOM
    return Reading(key, float(report.summary[key]), None if baseline is None else float(baseline), tuple(layers),
                   tuple(values), tuple(baselines), z, verdict, why)
