"""One typed result that flows everywhere: CLI table, JSON, ``datasets`` rows, evaluate outputs, cards, plots.

A :class:`Report` holds one :class:`Row` per (model, layer, pair) or (model, layer pair, head pair).  Each row's
``values`` maps a metric name to its value; the random baseline of metric ``m`` is stored under ``m + "_baseline"``
so a number keeps one name from end to end; non-scalar facts (a recovered permutation, a rank matrix) go in
``details``.  ``summary`` holds the headline scalars (means over rows, each with
its baseline) and ``params`` the parameters that produced the numbers (tolerances, dtype, rank cuts, versions).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Optional

BASELINE_SUFFIX = "_baseline"


def baseline_key(metric: str) -> str:
    """Name under which the random baseline of ``metric`` is stored."""
    return metric + BASELINE_SUFFIX


@dataclass
class Row:
    """One pair (or head pair) of one model.

    kind: what the pair is; the kinds are named in :mod:`hf_flag.rows` (``ROW_KINDS``), their values documented in
    :mod:`hf_flag.analysis.api`:
    pair kinds ``"mlp"``, ``"mlp_gate"``, ``"vo"``, ``"residual"``, ``"linear_chain"``; head-overlap kinds
    ``"head_overlap_{q,k,v,o}"`` and ``"cross_layer_overlap_{q,k,v}"``; ``"composition_{q,k,v}"``.
    layer / target_layer: block indices of the two sides (equal for within-layer pairs).
    source / target: what each side is, e.g. ``"mlp.in"``/``"mlp.out"`` or ``"head 3"``/``"head 7"``.
    """

    model: str
    kind: str
    layer: int
    target_layer: int
    source: str
    target: str
    values: dict[str, Optional[float]] = field(default_factory=dict)  # scalars only
    details: dict[str, Any] = field(default_factory=dict)  # non-scalar facts (permutation, rank matrix, cuts)

    def as_dict(self) -> dict[str, Any]:
        """The row's fields as a dict, ``values`` and ``details`` as they are (no copy: ``dataclasses.asdict``
        deep-copies every nested dict, 70% of writing a 13 661-row report)."""
        return {f.name: getattr(self, f.name) for f in ROW_FIELDS}

    def flat(self) -> dict[str, Any]:
        out = {k: v for k, v in self.as_dict().items() if k not in ("values", "details")}
        out.update(self.values)
        out["details"] = json.dumps(to_jsonable(self.details), sort_keys=True)
        return out


ROW_FIELDS = fields(Row)


def to_jsonable(x: Any) -> Any:
    """JSON-safe: NaN/Inf become None, tensors and numpy scalars become Python numbers."""
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    return x


@dataclass
class Report:
    model: str
    architecture: str
    layout: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Optional[float]] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def select(self, kind: Optional[str] = None, layer: Optional[int] = None) -> list[Row]:
        return [r for r in self.rows if (kind is None or r.kind == kind) and (layer is None or r.layer == layer)]

    def kinds(self) -> list[str]:
        return sorted({r.kind for r in self.rows})

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "model": self.model,
                "architecture": self.architecture,
                "layout": self.layout,
                "params": self.params,
                "summary": self.summary,
                "rows": [r.as_dict() for r in self.rows],
            }
        )

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        rows = [Row(**r) for r in data.get("rows", [])]
        return cls(
            model=data["model"],
            architecture=data["architecture"],
            layout=dict(data.get("layout", {})),
            params=dict(data.get("params", {})),
            summary=dict(data.get("summary", {})),
            rows=rows,
        )

    @classmethod
    def from_json(cls, text: str) -> "Report":
        return cls.from_dict(json.loads(text))

    def flat_rows(self) -> list[dict[str, Any]]:
        """Rows as flat dicts over the union of all metric columns (missing -> None)."""
        flat = [to_jsonable(r.flat()) for r in self.rows]
        columns = union_columns(flat)
        return [{c: f.get(c) for c in columns} for f in flat]

    def to_dataset(self):
        """A ``datasets.Dataset`` with one row per pair / head pair."""
        return rows_to_dataset(self.flat_rows())


def union_columns(flat_rows: Iterable[dict[str, Any]]) -> list[str]:
    """Every key of ``flat_rows``, in order of first appearance."""
    return list(dict.fromkeys(k for f in flat_rows for k in f))


def rows_to_dataset(flat_rows: Iterable[dict[str, Any]]):
    """Build a ``datasets.Dataset`` from flat rows, with float64 metric columns (None allowed)."""
    import datasets

    flat_rows = list(flat_rows)
    columns = union_columns(flat_rows)
    ident = {"model": datasets.Value("string"), "kind": datasets.Value("string"),
             "layer": datasets.Value("int64"), "target_layer": datasets.Value("int64"),
             "source": datasets.Value("string"), "target": datasets.Value("string"),
             "details": datasets.Value("string")}
    features = datasets.Features({c: ident.get(c, datasets.Value("float64")) for c in columns})
    data = {c: [f.get(c) for f in flat_rows] for c in columns}
    return datasets.Dataset.from_dict(data, features=features)
