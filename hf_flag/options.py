"""Command-line options that ``hf-flag analyze`` and ``hf-flag sweep`` share, defined once with one help text each.

Ground floor (imports only :mod:`hf_flag.defaults`): the CLI (:mod:`hf_flag.cli`) and the sweep
(``hf_flag.harness.sweep``) both call :func:`add_model_options`, so the two commands cannot drift apart in what these
options mean.  The sweep merges its arguments with a config file, so there every option defaults to ``None`` (not
given: the config file or the config default decides); ``analyze`` has no config file and gets the defaults here.
"""
from __future__ import annotations

import argparse
import math

from hf_flag.defaults import COMPOSITION_MODES, DIAGNOSTIC_NAMES
from hf_flag.errors import InputError

__all__ = ["OneLineParser", "add_model_options", "positive_gb"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :attr:`error_type` (one line, exit 2 through
    :func:`hf_flag.exits.exit_code`) instead of printing the usage and exiting."""

    error_type: type[InputError] = InputError

    def error(self, message: str):
        raise self.error_type(f"{message} (see {self.prog} --help)")


def valid_gb(value: object) -> bool:
    """Whether ``value`` is a usable ``--max-disk`` / ``max_disk``: a finite number of GB of at least one byte (the
    one rule the option and the sweep config key share)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value * 1e9 >= 1)


def positive_gb(text: str) -> float:
    """``--max-disk``'s value: :func:`valid_gb` (argparse keeps the ``ArgumentTypeError`` message)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not valid_gb(value):
        raise argparse.ArgumentTypeError(f"got {text!r}; give a positive number of GB of checkpoint shards to hold "
                                         f"on disk (e.g. --max-disk 20), or omit it to download whole checkpoints")
    return value


def add_model_options(parser: argparse.ArgumentParser, *, config_file: bool = False) -> None:
    """Add ``MODEL ...``, ``--default``, ``--name``, ``--revision``, ``--gguf-file``, ``--max-disk``,
    ``--diagnostics``, ``--composition`` and ``--cheap`` to ``parser``.

    ``config_file``: the command also reads a config file, so ``--composition`` and ``--cheap`` default to ``None``
    (not given) instead of ``"auto"`` / ``False``.
    """
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="local folders, .safetensors or .gguf files, or Hub ids (read from the Hugging Face "
                             "cache, downloaded into it when missing unless HF_HUB_OFFLINE=1)")
    parser.add_argument("--default", action="store_true",
                        help="add the embedded default models (all-MiniLM-L6-v2 and SmolLM2-135M-Instruct)")
    parser.add_argument("--name", metavar="ORG/NAME",
                        help="the Hub name of the one MODEL given, for labels and output folders (and, in a "
                             "sweep, its model card and --push-to-hub target; default: its Hub id, or a local "
                             "folder's or file's own name; a sweep pushes no local model's card without it)")
    parser.add_argument("--revision", help="branch, tag or commit sha of the MODEL Hub ids (default: main)")
    parser.add_argument("--gguf-file", dest="gguf_file", metavar="FILE",
                        help="which .gguf of a GGUF Hub repo (default: the one with the finest storage); Hub ids "
                             "only: for a local .gguf pass its path as MODEL")
    parser.add_argument("--max-disk", type=positive_gb, metavar="GB", dest="max_disk",
                        help="stream sharded Hub checkpoints shard by shard, holding at most GB (> 0) of shards on "
                             "disk")
    parser.add_argument("--diagnostics", nargs="+", metavar="NAME",
                        help=f"which diagnostics to compute (default: all): any of {', '.join(DIAGNOSTIC_NAMES)}, "
                             f"separated by commas or spaces")
    parser.add_argument("--composition", choices=COMPOSITION_MODES,
                        default=None if config_file else "auto",
                        help="Q/K/V composition scores of each head with the heads of every later layer (all), of "
                             "the next layer only (adjacent, much faster on deep models), or none; auto (the "
                             "default): all where the printed cost estimate is small, else adjacent")
    parser.add_argument("--cheap", action="store_true", default=None if config_file else False,
                        help="commutator ratio (with its baseline) and imbalance only: fast; no flags, transport or "
                             "head overlaps")
