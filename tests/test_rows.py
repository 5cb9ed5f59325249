"""hf_flag.rows: the summary of a report is the correctly rounded mean of each metric over its kind's rows."""
from __future__ import annotations

import math
from fractions import Fraction

from hf_flag.report import Row
from hf_flag.rows import summarize


def test_summary_means_are_correctly_rounded_and_skip_missing_values():
    """Independent reference: the exact rational mean of the floats, rounded once; a naive running sum of these
    values (1e16, 1, -1e16, 1 ...) loses the ones and would give 0."""
    values = [1e16, 1.0, -1e16, 1.0, 0.1, 0.2, 0.3]
    rows = [Row("m", "mlp", i, i + 1, "a", "b", {"commutator_ratio": v, "range_overlap": None}, {})
            for i, v in enumerate(values)]
    rows.append(Row("m", "mlp", 9, 10, "a", "b", {"commutator_ratio": math.nan}, {}))
    exact = float(sum(Fraction(v) for v in values) / len(values))
    summary = summarize(rows)
    assert summary == {"mlp/commutator_ratio": exact}
    assert exact != 0.0 and sum(values) / len(values) != exact
