"""Who runs what in a sweep, and what a rerun may skip.

* Models are ordered largest first (bytes of weights) and dealt round robin to the processes, so every process
  gets a similar mix of large and small models (contiguous blocks would give rank 0 all the large ones).
* ``--split-layers`` deals one model's layers round robin to the processes instead.
* Every unit of work (a model, or one layer shard of a model) has a *run folder* holding marker files, each
  written atomically (temporary file in the same folder + ``os.replace``):

  ``started.json``  written before the work starts (rank, pid, fingerprint);
  ``report.json``   the result (a :class:`hf_flag.report.Report` as JSON);
  ``done.json``     written after ``report.json``: the unit is finished;
  ``error.json``    the unit failed: ``{"error": <one line>, ...}``.

  A unit is *done* only when ``done.json`` and ``report.json`` exist and ``done.json`` carries the current
  fingerprint (a hash of the model's files and the analysis parameters), so a rerun skips finished work, redoes a
  unit that has ``started.json`` but no ``done.json`` (its process died half way), and redoes work whose inputs or
  parameters changed.  Nothing here needs a collective: the merging process polls these files.  Only the process
  holding a unit's claim (:mod:`hf_flag.harness.claims`) writes its markers, and none is ever deleted by another process.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from hf_flag.atomic import atomic_write_text

STARTED, REPORT, DONE, ERROR = "started.json", "report.json", "done.json", "error.json"


class RunState(str, enum.Enum):
    NEW = "new"  # never started (or started for other inputs/parameters)
    STARTED = "started"  # started.json without done/error: the process running it died or is still running
    DONE = "done"
    FAILED = "failed"


def largest_first(sizes: Mapping[str, int]) -> list[str]:
    """Keys of ``sizes`` by decreasing size; ties broken by key so every process computes the same order."""
    return sorted(sizes, key=lambda k: (-int(sizes[k]), k))


def round_robin(items: Sequence[Any], world_size: int) -> list[list[Any]]:
    """``items`` dealt to ``world_size`` processes in turn: process ``r`` gets ``items[r::world_size]``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return [list(items[r::world_size]) for r in range(world_size)]


def assign_models(sizes: Mapping[str, int], world_size: int) -> list[list[str]]:
    """Largest-first round robin: ``assign_models(sizes, w)[r]`` are the models process ``r`` runs, in order.

    The deal starts at the last process, so rank 0, which merges and writes the outputs after its own models,
    gets the lightest share and its tail overlaps the others' work."""
    return round_robin(largest_first(sizes), world_size)[::-1]


def shard_layers(n_layers: int, world_size: int) -> list[list[int]]:
    """Layers ``0 .. n_layers-1`` dealt round robin; empty shards (more processes than layers) are dropped."""
    if n_layers < 0:
        raise ValueError(f"n_layers must be >= 0, got {n_layers}")
    return [s for s in round_robin(list(range(n_layers)), world_size) if s]


#: files of a model folder that enter its fingerprint (weights and configs; not README.md, which cards edit)
FINGERPRINT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".json")


#: subpackages of hf_flag whose code decides a report's values (sources, adapters, geometry, analysis, rows)
REPORT_CODE = ("hf_flag.weights", "hf_flag.geometry", "hf_flag.analysis")


@functools.lru_cache(maxsize=None)
def report_code_digest() -> str:
    """Hash of hf-flag's version and of the source of :data:`REPORT_CODE` (plus ``hf_flag/rows.py`` and
    ``hf_flag/report.py``): part of every model's fingerprint, so a sweep into a folder whose reports an earlier
    hf-flag wrote recomputes them instead of reusing values that code gave."""
    import hf_flag

    root = Path(hf_flag.__file__).resolve().parent
    files = sorted({f for sub in REPORT_CODE for f in (root / sub.split(".", 1)[1]).rglob("*.py")} |
                   {root / "rows.py", root / "report.py"})
    digest = hashlib.sha256(hf_flag.__version__.encode())
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def fingerprint(params: Mapping[str, Any], paths: Sequence[str | os.PathLike] = ()) -> str:
    """Hash of the analysis parameters and of the (size, mtime) of every file in ``paths`` (folders: their weight
    and config files, :data:`FINGERPRINT_SUFFIXES`).

    Cheap (``stat`` only) and identical on every process that sees the same files.
    """
    stats = []
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(FINGERPRINT_SUFFIXES)) \
            if p.is_dir() else [p] if p.exists() else []
        for f in files:
            st = f.stat()
            stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"params": params, "files": stats}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_state(run_dir: str | os.PathLike, fp: str) -> RunState:
    """State of the unit of work in ``run_dir`` for inputs/parameters with fingerprint ``fp``."""
    run_dir = Path(run_dir)
    done = _read_json(run_dir / DONE)
    if done is not None and done.get("fingerprint") == fp and (run_dir / REPORT).is_file():
        return RunState.DONE
    error = _read_json(run_dir / ERROR)
    if error is not None and error.get("fingerprint") == fp:
        return RunState.FAILED
    started = _read_json(run_dir / STARTED)
    if started is not None and started.get("fingerprint") == fp:
        return RunState.STARTED
    return RunState.NEW


def mark_started(run_dir: str | os.PathLike, fp: str, rank: int, owner: str = "") -> None:
    """Record that process ``rank`` (``owner``: how to name it) starts the work now.  Nothing is deleted: an
    outcome recorded for other inputs is ignored by :func:`run_state` and replaced when this run ends."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / STARTED, {"fingerprint": fp, "rank": rank, "pid": os.getpid(), "owner": owner,
                                          "time": time.time()})


def mark_done(run_dir: str | os.PathLike, fp: str, report_json: str) -> None:
    """Write the result, then the done marker (in that order, each atomically); a failure recorded earlier (a
    ``--retry-failed`` that succeeded) is then removed."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / REPORT, report_json)
    atomic_write_json(run_dir / DONE, {"fingerprint": fp})
    (run_dir / ERROR).unlink(missing_ok=True)


def mark_failed(run_dir: str | os.PathLike, fp: str, error: str, **extra: Any) -> None:
    """Record a failure as one line (the first line of ``error``); ``extra`` carries ``internal`` (an internal
    error rather than bad input: :func:`hf_flag.exits.is_internal`) and where it happened."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    line = (error.strip().splitlines() or [""])[0]
    atomic_write_json(run_dir / ERROR, {"fingerprint": fp, "error": line, **extra})


def read_error(run_dir: str | os.PathLike) -> str:
    """The one-line error recorded in ``run_dir`` ('' if none)."""
    data = _read_json(Path(run_dir) / ERROR)
    return "" if data is None else str(data.get("error", ""))


def finished_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """The model run folders ``runs_dir/<slug>`` holding a finished result (``done.json`` beside ``report.json``),
    whatever parameters it was computed with, sorted by slug."""
    return sorted(p.parent for p in Path(runs_dir).glob(f"*/{DONE}")
                  if _read_json(p) is not None and (p.parent / REPORT).is_file())


def failed_internally(run_dir: str | os.PathLike) -> bool:
    """Whether the failure recorded in ``run_dir`` is an internal error (``internal`` of :func:`mark_failed`; a
    record without it, from an older hf-flag, counts as internal)."""
    data = _read_json(Path(run_dir) / ERROR)
    return data is not None and bool(data.get("internal", True))
