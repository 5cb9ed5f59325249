"""The exception types of hf-flag.

Every error a user can cause (a bad path, an unreadable checkpoint, an architecture no adapter knows) is an
:class:`HfFlagError`.  The concrete types also subclass :class:`ValueError`, so callers that only know the
standard library still catch them.  Messages are one line: the input that was wrong, and what to do about it.
"""
from __future__ import annotations

__all__ = ["HfFlagError", "WeightSourceError", "UnsupportedArchitectureError", "NonFiniteWeightsError"]


class HfFlagError(Exception):
    """Base class of every error raised deliberately by hf-flag."""


class WeightSourceError(HfFlagError, ValueError):
    """A model path, Hub id, checkpoint file or in-memory model could not be opened or read as weights."""


class UnsupportedArchitectureError(HfFlagError, ValueError):
    """No adapter knows how to read this model's architecture (names the architecture and how to add one)."""


class NonFiniteWeightsError(HfFlagError, ValueError):
    """A weight tensor holds NaN or Inf (the one-line message names the tensor and the layer)."""
