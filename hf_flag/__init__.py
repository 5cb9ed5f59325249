"""hf-flag: flag-variety alignment diagnostics read straight from neural network weights.

``hf_flag.analyze(model_or_path, ...)`` returns a :class:`Report`; the geometry core is :mod:`hf_flag.geometry`.
The function lives in :mod:`hf_flag.analysis.api`; row names in :mod:`hf_flag.rows`, shared defaults in
:mod:`hf_flag.defaults`.

``import hf_flag`` stays light (no torch, datasets, matplotlib or evaluate; ``benchmarks/bench_import.py``):
``analyze`` is imported on first use (PEP 562 module ``__getattr__``), with torch behind it.
"""
from __future__ import annotations

import importlib
from typing import Any

from hf_flag.report import Report, Row

__version__ = "0.1.0"

__all__ = ["analyze", "Report", "Row", "__version__"]

#: public names imported on first access: name -> the module that defines it
LAZY_NAMES = {"analyze": "hf_flag.analysis.api"}


def __getattr__(name: str) -> Any:
    if name not in LAZY_NAMES:
        raise AttributeError(f"module 'hf_flag' has no attribute {name!r}")
    value = getattr(importlib.import_module(LAZY_NAMES[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *LAZY_NAMES})


# evaluate.load("flag_alignment") / ("neural_collapse") offline: a few stat() calls when current, never raises
from hf_flag.integrations.evaluate_modules import register_at_import  # noqa: E402

register_at_import()
del register_at_import
