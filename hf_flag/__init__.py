"""hf-flag: flag-variety alignment diagnostics read straight from neural network weights."""
from hf_flag.report import Report, Row

__version__ = "0.1.0"
__all__ = ["Report", "Row", "__version__"]
