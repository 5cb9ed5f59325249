"""The exception types of hf-flag.

Every error a user can cause (a bad option or argument, a bad config key, a bad path, an unreadable checkpoint, an
architecture no adapter knows) is an :class:`HfFlagError`; the command lines turn exactly these (and an ``OSError``
that names a path) into exit code 2 with their one-line message (:mod:`hf_flag.exits`).  A plain ``ValueError`` is
not a user error there: raised inside the computation (a geometry invariant, a shape that cannot occur for checked
input) it is a bug and keeps its traceback.  The concrete types also subclass :class:`ValueError`, so callers that
only know the standard library still catch them.  Messages are one line: the input that was wrong, and what to do
about it.
"""
from __future__ import annotations

__all__ = ["HfFlagError", "InputError", "MissingFolderError", "WeightSourceError", "UnsupportedArchitectureError",
           "NonFiniteWeightsError"]


class HfFlagError(Exception):
    """Base class of every error raised deliberately by hf-flag."""


class InputError(HfFlagError, ValueError):
    """A value the user gave is invalid: a command-line option, a config key, an argument of a public function
    (``analyze``'s ``layers``/``device``/``dtype``, an adapter spec); the message names it and what to give."""


class MissingFolderError(HfFlagError, FileNotFoundError):
    """The folder a file is to be written into does not exist (nothing is created); the message names both."""


class WeightSourceError(HfFlagError, ValueError):
    """A model path, Hub id, checkpoint file or in-memory model could not be opened or read as weights."""


class UnsupportedArchitectureError(HfFlagError, ValueError):
    """No adapter knows how to read this model's architecture (names the architecture and how to add one)."""


class NonFiniteWeightsError(HfFlagError, ValueError):
    """A weight tensor holds NaN or Inf (the one-line message names the tensor and the layer)."""
