"""hf-flag: flag-variety alignment diagnostics read straight from neural network weights."""
from hf_flag.report import Report, Row

__version__ = "0.1.0"
__all__ = ["Report", "Row", "__version__"]

# evaluate.load("flag_alignment") / ("neural_collapse") offline: a few stat() calls when current, never raises
from hf_flag.integrations.evaluate_modules import register_at_import as _register_at_import  # noqa: E402

_register_at_import()
