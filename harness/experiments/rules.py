"""Verdict rules of ``hf-flag reproduce``, fixed in code before the runs they judge, each with a version.

A claim module lists its rules oldest first (``RULES``); the last one gives the verdict, every earlier one is still
evaluated on the same runs and its outcome is printed beside it, so a rule replaced after seeing data keeps its old
outcome in the report.  A rule's text is never edited once a report used it: a change is a new version (the test
``tests/harness/test_reproduce.py`` pins every version's text).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from hf_flag.geometry.stats import mean_and_sd

__all__ = ["Rule", "judge", "fmt_spread"]


@dataclass(frozen=True)
class Rule:
    """One version of a claim's verdict rule: ``text`` states it, ``history`` says when and why it was adopted."""

    version: int
    text: str
    history: str


def judge(rules: Sequence[Rule], decide: Mapping[int, Callable[[], tuple[bool, str]]]) -> tuple[str, list[dict]]:
    """Evaluate every rule version (``decide[version]() -> (supported, numbers)``); the verdict is the last one's.

    Returns ``(verdict, outcomes)`` with one JSON-able dict per version (``current`` marks the deciding one)."""
    versions = [r.version for r in rules]
    if not rules or versions != sorted(set(versions)) or set(decide) != set(versions):
        raise ValueError(f"judge: rule versions {versions} must be unique, ascending and each have a decision "
                         f"(got decisions for {sorted(decide)})")
    outcomes = []
    for rule in rules:
        supported, numbers = decide[rule.version]()
        outcomes.append({"version": rule.version, "text": rule.text, "history": rule.history,
                         "current": rule is rules[-1], "supported": bool(supported), "numbers": numbers})
    return ("supported" if outcomes[-1]["supported"] else "not supported"), outcomes


def fmt_spread(values: Sequence[float], unit: str = "seeds") -> str:
    """``mean ± sd (n unit)`` of the finite values (``hf_flag.geometry.stats.mean_and_sd``: NaN sd below two) with 3
    significant digits; ``n`` counts every value given."""
    from hf_flag.harness.experiments.common import fmt

    m, s = mean_and_sd(values)
    return f"{fmt(m)} ± {fmt(s)} ({len(values)} {unit})"
