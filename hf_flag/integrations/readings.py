"""How a headline number is read to a person: its per-layer series, its spread, and the fixed verdict rule.

Shared by the model card (:mod:`hf_flag.integrations.cards`) and the plots (``hf_flag.harness.plots``), so a card
and its figure show the same per-layer means (``summarize``'s, as in ``Report.summary``).

Verdict rule (fixed here, before any run it judges; the card states it): with ``d_l = value_l - baseline_l`` the
per-layer differences over ``L`` layers, ``z = mean(d) / (sd(d) / sqrt(L))`` (``sd`` with ``L - 1`` degrees of
freedom; computed by ``hf_flag.geometry.stats.difference_z``, MATH.md §8).  The value is *above* (*below*) random
when ``L >= MIN_LAYERS`` and ``z >= Z_THRESHOLD`` (``<= -Z_THRESHOLD``); *at the random level* when
``|z| < Z_THRESHOLD``; *undetermined* with fewer layers or no baseline.  Equal differences in every layer (``sd = 0``) give ``z = +-inf`` (or 0 when they are all 0).  This is
a rule of reading, not a significance test: layers are not independent samples.

What is read (:func:`select_read`, one rule for cards, plots and tables).  The commutator ratio kappa reads as
alignment only where the pair's ranks allow it (MATH.md §3, "When kappa reads as alignment";
``hf_flag.geometry.pairs.commutator_reading_holds``): rows whose ``details`` say ``commutator_reading_holds: false``
are not read, nor rows that do not record it.  The range overlap is not read where both chance and the value are at
least ``RANGE_FILL_LIMIT``: the larger range fills nearly the whole hidden space (``max(r_l, r_next) / n``, the row's
``range_overlap_baseline``) and the overlap sits up there with it, at the floor ``max(0, r_l + r_next - n) /
min(r_l, r_next)`` that two subspaces of these dimensions cannot go below or near it, so it cannot tell alignment from
chance (MATH.md §3).  A value below the limit is read even where chance is above it (it lies far below chance: a
small range placed in the other's complement).  A value is read on the rows where it reads, with their count (kappa of 20 of 29 residual pairs); where it
reads on none, it is shown and called not read (uninformative), never given a verdict.  A reading's value is the mean
over those rows (``summarize``), its ``z`` is taken over the per-layer means of the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from hf_flag.geometry.stats import difference_z, finite, sample_sd
from hf_flag.report import Report, Row, baseline_key
from hf_flag.rows import KAPPA_READS, summarize

Z_THRESHOLD = 3.0
MIN_LAYERS = 3
#: the range overlap is not read on pairs where both its chance value ``max(r_l, r_next) / n`` (the row's
#: ``range_overlap_baseline``) and the value itself are at least this (MATH.md §3)
RANGE_FILL_LIMIT = 0.99
ABOVE, BELOW, RANDOM, UNDETERMINED, NOT_READ = "above", "below", "random", "undetermined", "not read"
UNINFORMATIVE = "uninformative"


@dataclass(frozen=True)
class Reading:
    """One headline metric of one report, read by the rule above."""

    key: str  # "kind/metric"
    value: float  # mean over the rows read (all rows with a value where none is read)
    baseline: Optional[float]
    layers: tuple[int, ...]
    values: tuple[float, ...]  # per-layer means over the same rows
    baselines: tuple[Optional[float], ...]
    z: Optional[float]
    verdict: str  # ABOVE, BELOW, RANDOM, UNDETERMINED, NOT_READ or UNINFORMATIVE
    why: str  # why the verdict is UNDETERMINED / NOT_READ / UNINFORMATIVE ("" otherwise)
    pairs: int  # rows the value is a mean over
    of: int  # rows of the kind with a value of the metric
    unread: str  # why the other ``of - pairs`` rows are not read ("" when every row is read)

    @property
    def spread(self) -> Optional[tuple[float, float, float]]:
        """``(sd, min, max)`` of the per-layer means (``None`` below two layers)."""
        if len(self.values) < 2:
            return None
        return sample_sd(self.values), min(self.values), max(self.values)


def layer_series(report: Report, kind: str, metric: str) -> tuple[list[int], list[float], list[Optional[float]]]:
    """``(layers, means, baseline means)`` of ``metric`` over the ``kind`` rows of each layer (layers where the
    metric is missing are skipped); the means are ``summarize``'s, as in ``Report.summary``."""
    return rows_series(report.select(kind=kind), kind, metric)


def rows_series(rows: Sequence[Row], kind: str, metric: str
                ) -> tuple[list[int], list[float], list[Optional[float]]]:
    """:func:`layer_series` of the ``kind`` rows among ``rows``."""
    by_layer: dict[int, list[Row]] = {}
    for r in rows:
        if r.kind == kind:
            by_layer.setdefault(r.layer, []).append(r)
    layers, values, baselines = [], [], []
    for layer in sorted(by_layer):
        means = summarize(by_layer[layer])
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


def row_reads(row: Row, metric: str) -> Optional[bool]:
    """Whether ``metric`` of ``row`` reads as what it measures (module docstring): kappa where the row records that
    it does (``None``: not recorded), the range overlap where ``range_overlap_baseline < RANGE_FILL_LIMIT``
    (``None``: no baseline); every other metric reads."""
    if metric == "commutator_ratio":
        flag = row.details.get(KAPPA_READS)
        return None if flag is None else bool(flag)
    if metric == "range_overlap":
        base, value = row.values.get(baseline_key(metric)), row.values.get(metric)
        return None if base is None or value is None else min(base, value) < RANGE_FILL_LIMIT
    return True


@dataclass(frozen=True)
class Selection:
    """The rows of one ``kind/metric`` on which the metric reads (:func:`select_read`)."""

    key: str
    rows: tuple[Row, ...]  # rows with a finite value that reads
    valued: tuple[Row, ...]  # rows of the kind with a finite value
    verdict: str  # "" when some row reads, else NOT_READ (kappa) or UNINFORMATIVE (range overlap)
    why: str  # why the other rows are not read ("" when every row reads)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def of(self) -> int:
        return len(self.valued)

    def means(self) -> tuple[Optional[float], Optional[float]]:
        """``(value, baseline)``: means over the rows read (``summarize``), ``None`` where there is none."""
        means = summarize(self.rows)
        return means.get(self.key), means.get(baseline_key(self.key))

    @property
    def note(self) -> str:
        """A table's short note: ``""`` (every row reads), ``"not read"`` / ``"uninformative"`` (none does) or
        ``"20 of 29 read"``."""
        return "" if self.n == self.of else self.verdict if not self.rows else f"{self.n} of {self.of} read"


def select_read(report: Report, key: str) -> Selection:
    """The ``kind`` rows with a finite value of ``metric`` (``key = "kind/metric"``) and those on which it reads
    (:func:`row_reads`), with why the others are not read."""
    kind, _, metric = key.partition("/")
    valued = tuple(r for r in report.select(kind=kind) if finite([r.values.get(metric)]))
    flags = [row_reads(r, metric) for r in valued]
    rows = tuple(r for r, f in zip(valued, flags) if f)
    unread, unknown = flags.count(False), flags.count(None)
    whys = []
    if metric == "commutator_ratio":
        if unread:
            whys.append(
                f"kappa does not read as alignment on {unread} of {len(valued)} pairs: both weights have rank below "
                "the hidden dimension n (at the storage precision), so directions one writes into the other's "
                "kernel commute for free; read the range overlap there"
                + ("" if f"{kind}/range_overlap" in report.summary else
                   " (computed by the full report: hf-flag analyze --full)"))
        if unknown:
            whys.append(f"this report does not record whether kappa reads as alignment on {unknown} of "
                        f"{len(valued)} pairs (it needs the weights' ranks), so they are shown, not interpreted")
    else:
        if unread:
            whys.append(f"on {unread} of {len(valued)} pairs the larger range fills at least {RANGE_FILL_LIMIT:.0%} "
                        f"of the hidden space (max rank / n >= {RANGE_FILL_LIMIT:g}) and the overlap is at least "
                        f"{RANGE_FILL_LIMIT:g} too, where chance is: it cannot tell alignment from chance there")
        if unknown:
            whys.append(f"{unknown} of {len(valued)} pairs have no baseline, so their fill is unknown")
    verdict = "" if rows else NOT_READ if metric == "commutator_ratio" else UNINFORMATIVE
    return Selection(key, rows, valued, verdict, "; ".join(whys))


def read_metric(report: Report, key: str) -> Reading:
    """``key`` (``"kind/metric"``, present in ``report.summary``) read by the module's rule, on the rows where it
    reads (:func:`select_read`); where it reads on none, the mean over every row is shown with why it is not read."""
    kind, _, metric = key.partition("/")
    selection = select_read(report, key)
    rows = selection.rows or selection.valued
    layers, values, baselines = rows_series(rows, kind, metric)
    means = summarize(rows)
    baseline = means.get(baseline_key(key))
    z = z_score(values, baselines)
    why = ""
    if not selection.rows:
        verdict, why = selection.verdict, selection.why
    elif baseline is None or z is None:
        verdict, why = UNDETERMINED, "no random baseline" if baseline is None else "fewer than 2 layers"
    elif len(values) < MIN_LAYERS:
        verdict, why = UNDETERMINED, f"{len(values)} layers (the rule needs {MIN_LAYERS})"
    else:
        verdict = ABOVE if z >= Z_THRESHOLD else BELOW if z <= -Z_THRESHOLD else RANDOM
    return Reading(key, float(means[key]), None if baseline is None else float(baseline), tuple(layers),
                   tuple(values), tuple(baselines), z, verdict, why, len(rows), selection.of,
                   selection.why if selection.rows else "")


def intersection_at_baseline(report: Report) -> str:
    """Why the intersection dimension is not worth a plot, ``""`` when it is: every pair row with a value equals its
    general-position baseline ``max(0, 2c - n)`` at the cut ``c`` where it is taken (MATH.md §4), so a plot would
    show the baseline alone.  The reason names the cuts."""
    rows = [r for r in report.rows if finite([r.values.get("intersection_dim")])]
    if not rows or any(r.values.get("intersection_dim") != r.values.get(baseline_key("intersection_dim"))
                       for r in rows):
        return ""
    cuts = sorted({c for r in rows if (c := r.details.get("intersection_cut")) is not None})
    at = ("" if not cuts else f" (c = {cuts[0]})" if len(cuts) == 1 else f" (c = {cuts[0]} to {cuts[-1]})")
    return (f"on every one of its {len(rows)} pairs the intersection dimension equals its general-position "
            f"baseline max(0, 2c - n) at the cut c where it is taken{at}")
