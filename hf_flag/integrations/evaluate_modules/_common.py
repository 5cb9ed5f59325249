"""Shared by the evaluate modules (no mathematics here: they call hf-flag and format its results)."""
from __future__ import annotations

from typing import Any

CITATION = """\
@article{ruan2026flag,
  title         = {Flag Varieties: A Geometric Framework for Deep Network Alignment},
  author        = {Ruan, Cihan and Xiao, Jingchuan and Sui, Xinyi},
  year          = {2026},
  eprint        = {2605.09861},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG},
}
"""


def has_pending_inputs(module: Any) -> bool:
    """True when ``add``/``add_batch`` stored inputs that ``EvaluationModule.compute`` would read.

    Used to route a call with no feature inputs (an in-memory model, a classifier alone) straight to ``_compute``:
    evaluate's own ``compute`` cannot finalise an empty cache.
    """
    return module.writer is not None
