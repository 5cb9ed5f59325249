"""hf-flag: flag-variety alignment diagnostics read straight from neural network weights.

``hf_flag.analyze(model_or_path, ...)`` returns a :class:`Report`; the geometry core is :mod:`hf_flag.geometry`.
The function lives in :mod:`hf_flag.analysis.api`; row names in :mod:`hf_flag.rows`, shared defaults in
:mod:`hf_flag.defaults`.
"""
from hf_flag.report import Report, Row

__version__ = "0.1.0"

from hf_flag.analysis.api import analyze  # noqa: E402  (needs __version__ bound first)

__all__ = ["analyze", "Report", "Row", "__version__"]

# evaluate.load("flag_alignment") / ("neural_collapse") offline: a few stat() calls when current, never raises
from hf_flag.integrations.evaluate_modules import register_at_import as _register_at_import  # noqa: E402

_register_at_import()
