"""The sweep: many models through `hf_flag.analyze`, one or several processes, results as a dataset.

Usage (all three are the same program)::

    python -m hf_flag.harness.sweep [MODEL ...] [--config FILE] --out DIR [--diagnostics ...] [--composition ...]
        [--device cpu|cuda|auto] [--split-layers] [--write-model-cards] [--push-to-hub REPO_ID] [--default]
        [--checkpoint-layers N] [--lease-seconds S] [--out-shared auto|yes|no]
    accelerate launch [--multi_gpu --num_processes 2] -m hf_flag.harness.sweep ... [--device cpu]
    hf-flag sweep ...

Several CPU processes: accelerate 1.15 starts a single process for ``accelerate launch --cpu --num_processes N``
(its multi-CPU mode needs mpirun), so use ``--multi_gpu --num_processes N`` (a torchrun launch) with ``--device cpu``
(the default): every process then joins a gloo group as a CPU process.

Work is dealt by :mod:`hf_flag.harness.schedule` (largest model first, round robin over processes starting at the last
rank, so rank 0, which merges afterwards, gets the lightest share; ``--split-layers`` deals each model's layers
instead).  Every unit of work is *claimed* before it runs (:mod:`hf_flag.harness.claims`: a lease renewed while the process
lives), so processes that share ``DIR`` (the ranks of one launch, or sweeps started separately on the same folder)
never run one unit twice: a process that finishes its share takes unclaimed units from the ends of the others'
shares, and the claim of a process that died is taken over (at once on the same machine, after ``--lease-seconds``
from another).  Every process writes its results into ``DIR/runs/<slug>/`` atomically with started/done/error
markers, so a rerun skips finished models and redoes those whose process died (a failure is final for unchanged
inputs; ``--retry-failed`` reruns failures; changed weights or parameters rerun by themselves).  A large model is
analysed in layer checkpoints (``DIR/runs/<slug>/layers/<a>-<b>/``, ``--checkpoint-layers``), so a killed analysis
resumes at its first unfinished layer with rows equal to an uninterrupted run's.  The process that analysed a model
also draws its plots.  Rank 0 waits until every unit is finished (at most ``--merge-timeout``), names ranks that
stopped early, and writes (holding the folder's lock, so concurrent sweeps write one after the other):

* ``DIR/dataset``: ``datasets.Dataset.save_to_disk`` of every row of every model (``datasets.load_from_disk``);
* ``DIR/summary.csv`` and ``DIR/summary.md``: one line per model, headline metrics beside their baselines and the
  number of rows each mean is over (the rows where the value reads: :func:`headline_cells`);
* the dataset, the summaries and ``sweep.json`` cover every model of the folder: this sweep's (done, failed or
  missing) and every other model with a finished result in ``DIR/runs/<slug>/`` (earlier sweeps into the same
  ``DIR``, computed with their own parameters); cards and plots are written for this sweep's models only.  They are
  replaced only when ``DIR/sweep.json`` says hf-flag wrote them (:func:`check_outputs_ours`): a ``summary.*``,
  ``dataset/``, ``dataset.parquet``, ``plots/<slug>/`` or card (cards folder inside ``DIR``) that hf-flag did not
  write stops the sweep with one line before any work;
* ``DIR/plots/<slug>/*.png`` (:mod:`hf_flag.harness.plots`; split models are drawn here) and
  ``DIR/model_cards/<slug>/README.md``
  (:mod:`hf_flag.integrations.cards`); ``--write-model-cards`` also updates local model folders' README.md;
* ``DIR/sweep.json``: each model's status (done / failed with its one-line error / missing).

Several machines: at start rank 0 writes a probe file into ``DIR`` and every rank looks for it.  When some rank
cannot see it (``DIR`` is a local folder on each machine), each rank keeps its own ``DIR`` and sends its outcomes to
rank 0 over the launcher's key-value store, with a heartbeat; a rank whose heartbeat stands still for
``--lease-seconds`` is named and its models reported missing (no collective waits on a dead rank).

Hub ids are fetched through huggingface_hub's cache (:mod:`hf_flag.weights.hub`: only config and weights;
``--revision`` / ``--gguf-file``; ``--max-disk GB`` streams sharded checkpoints shard by shard,
:mod:`hf_flag.harness.stream`); the commit sha they were read at goes into each report, the dataset's
``weights_sha`` column and the card.

``--push-to-hub`` sets hf-flag's part of the card of each model read from its own Hub repo
(:func:`hf_flag.integrations.cards.push_card`: a commit where the token can write, else a pull request; always a
pull request with ``--create-pr``; cards computed from derived weights only with ``--allow-derived``), with its plots
beside it; ``--push-to-hub REPO_ID`` also uploads the results dataset to dataset repo ``REPO_ID``; ``--dry-run``
prints each card's diff and pushes nothing.  The token is huggingface_hub's own (``HF_TOKEN`` or the stored
login): it is never read, written or logged.
Exit status (:mod:`hf_flag.exits`, :data:`EXIT_STATUS`): 0 all models done; 1 an internal error (traceback saved
under ``DIR/errors/``, or in the ``error.json`` of a model whose analysis hit it); 2 bad input or a folder that cannot
be written (full disk, read-only: one line naming the path); 3 finished incomplete: some models failed on their
input or are missing, or the push failed (everything else is still written); 130 Ctrl-C and 143 SIGTERM (one line;
a rerun resumes).
docs/RELIABILITY.md lists these promises and the tests that show them.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from hf_flag import exits
from hf_flag.analysis.api import analyze
from hf_flag.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from hf_flag.collector import long_lived_frozen
from hf_flag.exits import EXIT_INCOMPLETE, EXIT_INTERNAL, EXIT_OK, one_line
from hf_flag.options import OneLineParser, add_model_options
from hf_flag.weights.hub import transport_errors
from hf_flag.harness import schedule
from hf_flag.harness.claims import (CLAIM, DEFAULT_LEASE_S, Claims, Owner, clear_stale, is_live, locked,
                                    read_claim)
from hf_flag.harness.config import (DEVICES, ConfigError, ModelSpec, SweepConfig, build_config, default_model_specs,
                                    load_config, parse_config, parse_model, slugs)
from hf_flag.harness.schedule import RunState
from hf_flag.report import Report, baseline_key, rows_to_dataset
from hf_flag.rows import HEADLINE_METRICS, format_value, merge_shards
from hf_flag.threads import configure_threads
from hf_flag.weights.adapters import get_adapter
from hf_flag.weights.sources import check_gguf_file, open_weights

PROG = "hf-flag sweep"
#: bookkeeping folder inside ``--out``: the outputs lock, each run's rank presence claims and sharing probe
SWEEP_DIR = ".sweep"
#: weights (bytes) analysed between two layer checkpoints by default (see :func:`layers_per_checkpoint`)
CHECKPOINT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Unit:
    """One unit of work: a whole model (``layers is None``) or one layer shard of it."""

    spec: ModelSpec
    slug: str
    run_dir: Path
    fp: str
    layers: Optional[tuple[int, ...]] = None


# ------------------------------------------------------------------------------------------------- arguments


#: ``hf-flag sweep --help``'s description (the module docstring is for developers)
DESCRIPTION = ("Analyse many models, in one process or several (accelerate launch), into DIR: a results dataset, "
               "summary.csv / summary.md, plots and model cards; a rerun resumes, a failed model is recorded and "
               "the others go on.")
#: ``hf-flag sweep --help``'s epilog: the exit codes (:mod:`hf_flag.exits`)
EXIT_STATUS = ("exit status: 0 every model done; 1 an internal error (a bug: its traceback is saved, please report "
               "it); 2 bad input or an output folder that cannot be written (one line naming it); 3 finished "
               "incomplete: some models failed on their input (unsupported or corrupt weights, a Hub id that cannot "
               "be fetched) or are missing, or the push failed; everything else is written and a rerun resumes; "
               "130 Ctrl-C, 143 SIGTERM.")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="hf-flag sweep", description=DESCRIPTION, epilog=EXIT_STATUS)
    add_model_options(p, config_file=True)
    p.add_argument("--config", help="YAML sweep config (see examples/sweep.yaml)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--device", choices=DEVICES, help="auto (the default): cuda when available, else cpu")
    p.add_argument("--split-layers", action="store_true", default=None, dest="split_layers",
                   help="split each model's layers across the processes")
    p.add_argument("--write-model-cards", action="store_true", default=None, dest="write_model_cards",
                   help="also update README.md of local model folders in place (only hf-flag's parts)")
    p.add_argument("--cards-dir", metavar="DIR", dest="cards_dir",
                   help="folder for the per-model cards <org>--<name>/README.md (default: OUT/model_cards)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", dest="push_to_hub", nargs="?", const=True,
                   help="push each card to its model's Hub repo (commit, or PR without write access); with REPO_ID "
                        "also the results dataset to that dataset repo")
    p.add_argument("--create-pr", action="store_true", default=None, dest="create_pr",
                   help="with --push-to-hub: open pull requests even where the token could commit")
    p.add_argument("--allow-derived", action="store_true", default=None, dest="allow_derived",
                   help="with --push-to-hub: also push cards computed from derived weights (GGUF, local copies)")
    p.add_argument("--dry-run", action="store_true", dest="dry_run",
                   help="with --push-to-hub: print each card's diff and what would be pushed; push nothing")
    p.add_argument("--merge-timeout", type=float, dest="merge_timeout",
                   help="seconds rank 0 waits for the other processes' results (default 86400)")
    p.add_argument("--retry-failed", action="store_true", help="rerun models that failed in an earlier run")
    p.add_argument("--checkpoint-layers", type=int, metavar="N", dest="checkpoint_layers",
                   help="save the rows of every N layers, so a killed analysis resumes there (0: whole models; "
                        f"default: every {CHECKPOINT_BYTES // 2**20} MiB of weights)")
    p.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_S, dest="lease_s", metavar="S",
                   help="a claim on a model lapses S seconds after its process on another machine stopped renewing "
                        f"it (default {DEFAULT_LEASE_S:g}; a killed process on the same machine is noticed at once)")
    p.add_argument("--out-shared", choices=("auto", "yes", "no"), default="auto", dest="out_shared",
                   help="whether all processes see the same --out (auto: probe it); if not, results travel over "
                        "torch.distributed to rank 0")
    return p


def parse_args(argv: Optional[Sequence[str]]) -> tuple[SweepConfig, argparse.Namespace]:
    """Arguments (and the config file they name) -> a validated :class:`SweepConfig`; ``ConfigError`` if bad."""
    args = build_parser().parse_args(argv)
    file_values = load_config(args.config) if args.config else {}
    cli = {k: getattr(args, k) for k in ("diagnostics", "composition", "cheap", "device", "split_layers",
                                         "write_model_cards", "cards_dir", "push_to_hub", "create_pr",
                                         "allow_derived", "max_disk", "merge_timeout")}
    cli_checked = parse_config({k: v for k, v in cli.items() if v is not None}, source="arguments")
    if args.out:
        cli_checked["out"] = Path(args.out)
    cli_checked["models"] = tuple(replace(parse_model(m, "MODEL"), revision=args.revision, gguf_file=args.gguf_file)
                                  for m in args.models)
    if args.name is not None:
        if len(args.models) != 1:
            raise ConfigError(f"--name {args.name}: names one MODEL, but {len(args.models)} were given; name several "
                              f"models in the config file (models: [{{path: ..., name: ...}}])")
        cli_checked["models"] = (replace(cli_checked["models"][0], name=args.name),)
    extra = default_model_specs() if args.default else []
    if args.checkpoint_layers is not None and args.checkpoint_layers < 0:
        raise ConfigError(f"--checkpoint-layers {args.checkpoint_layers}: give a number of layers >= 0")
    if not args.lease_s > 0:
        raise ConfigError(f"--lease-seconds {args.lease_s:g}: give a number of seconds > 0")
    cfg = build_config(file_values, cli_checked, extra)
    for spec in cfg.models:  # before any work, as analyze refuses it
        check_gguf_file(spec.path, spec.gguf_file)
    unnamed = [s.path for s in cfg.models if s.name is None and Path(s.path).expanduser().exists()]
    if cfg.push_to_hub and unnamed:  # a local copy's config names the model it came from, not a repo to push to
        raise ConfigError(f"--push-to-hub: local model {unnamed[0]!r} has no Hub repo name to push its card to; "
                          f"name it with --name org/name (or {{path: ..., name: org/name}} in the config), or "
                          f"leave it out of this sweep")
    return cfg, args


@dataclass(frozen=True)
class Options:
    """How the sweep survives kills and shares its folder (command-line only; they do not change results)."""

    checkpoint_layers: Optional[int] = None  # layers per checkpoint; None: by bytes (CHECKPOINT_BYTES); 0: none
    lease_s: float = DEFAULT_LEASE_S
    out_shared: str = "auto"  # auto | yes | no
    poll_s: float = 0.2  # how often a waiting process looks at the run folders again

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Options":
        return cls(args.checkpoint_layers, args.lease_s, args.out_shared)


@dataclass(frozen=True)
class RunContext:
    """What every step of one sweep process reads, fixed at startup (in the spirit of accelerate's
    ``PartialState``): the validated config, this process's ``rank`` among ``world`` processes, its torch
    ``device``, how it survives kills (``options``), its ``claims``, the launch's ``run_id`` (the same on every
    rank), whether every rank sees the same ``--out`` (``shared``; else results travel over the ``exchange``)."""

    config: SweepConfig
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    options: Options = Options()
    claims: Claims = field(default_factory=lambda: Claims(Owner.this_process()))
    run_id: str = "local"
    shared: bool = True
    exchange: Optional["Exchange"] = None

    @property
    def is_main_process(self) -> bool:
        """Rank 0: it merges, plots split models and writes every output."""
        return self.rank == 0

    @property
    def tag(self) -> str:
        """Unique to this process: names its temporary files."""
        owner = self.claims.owner
        return f"{owner.host}.{owner.pid}.{owner.token[:8]}"

    def presence(self, rank: int) -> Path:
        """Folder holding rank ``rank``'s presence claim (renewed while it runs) and its ``finished.json``."""
        return self.config.out / SWEEP_DIR / self.run_id / f"rank-{rank}"


@dataclass(frozen=True)
class ModelResult:
    """The outcome of one model as rank 0 records it: ``status`` ``"done"``, ``"failed"`` or ``"missing"``, the
    one-line ``error`` (empty when none) and the merged ``report`` (``None`` unless done)."""

    unit: Unit
    status: str
    error: str
    report: Optional[Report]
    plots: Optional[dict] = None  # caption -> PNG path (once drawn)

    @property
    def name(self) -> str:
        return self.unit.spec.label

    @property
    def slug(self) -> str:
        return self.unit.slug

    def manifest_entry(self) -> dict[str, str]:
        """The model's entry in ``sweep.json``."""
        return {"name": self.name, "slug": self.slug, "status": self.status, "error": self.error}


def check_out_dir(out: Path, option: str = "--out") -> None:
    """Create ``out`` and prove it writable, or ``ConfigError`` naming ``option`` (exit 2)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}-{uuid.uuid4().hex}"  # unique across machines sharing out
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{option} {out}: not a writable folder ({exc.strerror or exc}); "
                          f"choose another {option}") from None


def resolve_device(policy: str, local_rank: int) -> str:
    if policy == "cpu" or (policy == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return f"cuda:{local_rank % torch.cuda.device_count()}"


# ------------------------------------------------------------------------------------------------- the work


def open_source(spec: ModelSpec, max_disk: Optional[float] = None):
    """The model's :class:`~hf_flag.weights.weight_source.WeightSource` (a Hub id is fetched at its revision, and
    streamed within ``max_disk`` GB when given)."""
    max_disk_bytes = None if max_disk is None else int(max_disk * 1e9)
    return open_weights(spec.path, revision=spec.revision, gguf_file=spec.gguf_file, max_disk_bytes=max_disk_bytes)


def model_size(spec: ModelSpec, max_disk: Optional[float] = None) -> int:
    """Bytes of the model's stored weights from headers only (0 when it cannot be opened: it fails later)."""
    try:
        source = open_source(spec, max_disk)
    except Exception:  # the error is recorded when the model is run
        return 0
    try:
        return int(source.nbytes())
    except Exception:
        return 0
    finally:
        source.close()


def count_layers(spec: ModelSpec, max_disk: Optional[float] = None) -> int:
    """Number of transformer blocks, from the config and tensor names (no tensor data read)."""
    source = open_source(spec, max_disk)
    try:
        keys = source.keys()
        return get_adapter(source.config, keys).layout(source.config, keys).n_layers
    finally:
        source.close()


def plot_dir(cfg: SweepConfig, slug: str) -> Path:
    return cfg.out / "plots" / slug


class AnalysisFailed(Exception):
    """The analysis of a unit raised: recorded as the unit's failure (final for unchanged inputs).  Anything else
    raised while running a unit (a write that fails: full disk, read-only folder) stops the sweep instead."""

    def __init__(self, cause: Exception):
        super().__init__(one_line(cause))
        self.traceback = "".join(traceback.format_exception(cause, limit=8))
        self.internal = exits.is_internal(cause)


def analyze_layers(spec: ModelSpec, cfg: SweepConfig, device: str, layers: Optional[Sequence[int]]) -> Report:
    """``analyze`` of ``layers`` of one model (``None``: all) with the sweep's parameters; ``AnalysisFailed`` if it
    raises."""
    try:
        with open_source(spec, cfg.max_disk) as source:
            return analyze(source, device=device, diagnostics=cfg.diagnostics, layers=layers, cheap=cfg.cheap,
                           composition=cfg.composition, name=spec.label, progress=True,
                           **cfg.analyze_kwargs)  # progress: a bar per layer with its ETA
    except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the sweep
        raise AnalysisFailed(exc) from exc


def layers_per_checkpoint(n_layers: int, nbytes: int, setting: Optional[int]) -> int:
    """Layers analysed between two checkpoints: ``setting`` when given (0: the whole model at once), else enough
    layers to cover :data:`CHECKPOINT_BYTES` of weights (a model no larger than that is one checkpoint: splitting
    costs a re-read of one block and its shared SVDs per checkpoint, 5-25 % of a layer's time)."""
    if setting is not None:
        return n_layers if setting == 0 else setting
    return max(1, -(-n_layers * CHECKPOINT_BYTES // max(nbytes, 1)))


def checkpoints(unit: Unit, size: int, setting: Optional[int], max_disk: Optional[float] = None) -> list[Unit]:
    """The layer checkpoints of ``unit`` (``DIR/runs/<slug>/layers/<first>-<last>/``, each a unit of its own), or
    ``[]`` when the unit is analysed in one go.  Counting layers reads headers only."""
    if setting == 0 or (setting is None and size <= CHECKPOINT_BYTES):
        return []
    try:
        layers = list(unit.layers) if unit.layers is not None else list(range(count_layers(unit.spec, max_disk)))
    except Exception as exc:  # noqa: BLE001 - an unreadable model fails like its analysis would
        raise AnalysisFailed(exc) from exc
    step = layers_per_checkpoint(len(layers), size, setting)
    if step >= len(layers):
        return []
    groups = [tuple(layers[i:i + step]) for i in range(0, len(layers), step)]
    return [Unit(unit.spec, unit.slug, unit.run_dir / "layers" / f"{g[0]}-{g[-1]}",
                 schedule.fingerprint({"unit": unit.fp, "layers": list(g)}), g) for g in groups]


def analyze_unit(unit: Unit, cfg: SweepConfig, *, device: str, size: int, setting: Optional[int]) -> Report:
    """The unit's report, analysed checkpoint by checkpoint: finished checkpoints are read back, not redone, so a
    killed analysis resumes at its first unfinished layer; the merged rows equal one uninterrupted ``analyze``'s
    (a row belongs to the layer shard of its ``layer``)."""
    parts = checkpoints(unit, size, setting, cfg.max_disk)
    if not parts:
        return analyze_layers(unit.spec, cfg, device, unit.layers)
    reports = []
    for part in parts:
        if schedule.run_state(part.run_dir, part.fp) is RunState.DONE:
            reports.append(Report.from_json((part.run_dir / schedule.REPORT).read_text()))
            continue
        report = analyze_layers(unit.spec, cfg, device, part.layers)
        schedule.mark_done(part.run_dir, part.fp, report.to_json())
        reports.append(report)
    return merge_shards(reports)


def still_mine(ctx: RunContext, run_dir: Path) -> bool:
    """Whether this process may record an outcome in ``run_dir``: the nearest claim on it or a folder above it
    (a model's claim covers its layer checkpoints and streamed groups) is this process's, or there is none."""
    for folder in (run_dir, *run_dir.parents):
        if (folder / CLAIM).exists():
            return ctx.claims.holds(folder)
        if folder == ctx.config.out:
            break
    return True


def run_unit(ctx: RunContext, unit: Unit, *, size: int = 0) -> RunState:
    """Analyze one unit (its claim is held) and record its outcome in its run folder: a failed analysis is
    recorded, never raised; a failed write (disk full, read-only folder) raises.

    A whole model is also plotted here, before its done marker, so plotting runs in parallel across processes.
    """
    from hf_flag.harness.plots import save_plots_once

    cfg = ctx.config
    schedule.mark_started(unit.run_dir, unit.fp, ctx.rank, owner=ctx.claims.owner.label)
    try:
        report = analyze_unit(unit, cfg, device=ctx.device, size=size, setting=ctx.options.checkpoint_layers)
    except AnalysisFailed as exc:
        if still_mine(ctx, unit.run_dir):
            schedule.mark_failed(unit.run_dir, unit.fp, str(exc), model=unit.spec.label, rank=ctx.rank,
                                 traceback=exc.traceback, internal=exc.internal)
        return RunState.FAILED
    if unit.layers is None:
        try:
            save_plots_once(report, plot_dir(cfg, unit.slug), unit.fp)
        except Exception:  # noqa: BLE001 - the merging process plots again when writing cards, and records that
            pass
    if still_mine(ctx, unit.run_dir):  # a process that stalled past its lease leaves the result to the taker
        schedule.mark_done(unit.run_dir, unit.fp, report.to_json())
    return RunState.DONE


def model_units(cfg: SweepConfig) -> list[Unit]:
    out = cfg.out / "runs"
    return [Unit(spec, slug, out / slug, schedule.fingerprint(
        {**cfg.params(), "model": spec.path, "code": schedule.report_code_digest(),
         **({"revision": spec.revision} if spec.revision else {}),
         **({"gguf_file": spec.gguf_file} if spec.gguf_file else {})}, [spec.path]))
            for spec, slug in zip(cfg.models, slugs(cfg.models))]


def shard_units(model: Unit, world_size: int, max_disk: Optional[float] = None) -> list[Unit]:
    """The layer shards of ``model`` (shard ``k`` is run by rank ``k``); raises if its layers cannot be counted."""
    shards = schedule.shard_layers(count_layers(model.spec, max_disk), world_size)
    return [Unit(model.spec, model.slug, model.run_dir / "shards" / f"{k}-of-{len(shards)}",
                 schedule.fingerprint({"model": model.fp, "layers": layers}), tuple(layers))
            for k, layers in enumerate(shards)]


def _bar(total: int, rank: int, desc: str):
    return tqdm(total=total, desc=desc, unit="model", disable=rank != 0, file=sys.stderr)


def finished(state: RunState) -> bool:
    return state in (RunState.DONE, RunState.FAILED)


def preference(plan: Sequence[Sequence[Any]], rank: int) -> list[Any]:
    """The order in which process ``rank`` takes units: its own share of ``plan`` first, then the other shares'
    units from their ends (the work their owners would reach last), nearest rank first."""
    world = len(plan)
    steal = [u for k in range(1, world) for u in reversed(plan[(rank + k) % world])]
    return [*plan[rank], *steal]


def claim_and_run(ctx: RunContext, units: Sequence[Unit], run: Callable[[Unit], None], *, wait: bool,
                  on_finished: Callable[[Unit], None] = lambda unit: None) -> dict[str, RunState]:
    """Run every unfinished unit of ``units`` (in that order of preference) whose claim this process gets.

    A unit held by another live process is passed over and looked at again; when its holder dies its claim is
    taken over and the unit rerun.  ``wait``: return only when every unit is finished (or ``--merge-timeout``
    passes), else as soon as every unfinished unit is held by others.  Returns ``str(run_dir) -> state``.
    """
    pending = list(units)
    deadline = time.monotonic() + ctx.config.merge_timeout
    while pending:
        ran = False
        for unit in list(pending):
            if finished(schedule.run_state(unit.run_dir, unit.fp)):
                clear_stale(unit.run_dir)  # a holder killed after recording the outcome, before releasing
                pending.remove(unit)
                on_finished(unit)
                continue
            if ctx.claims.try_claim(unit.run_dir, rank=ctx.rank) is not None:
                continue  # another process runs it
            try:
                if not finished(schedule.run_state(unit.run_dir, unit.fp)):  # it may have finished meanwhile
                    run(unit)
            finally:
                ctx.claims.release(unit.run_dir)
            ran = True
            break  # back to the most preferred unit
        if not ran and pending:
            if not wait or time.monotonic() >= deadline:
                break
            time.sleep(ctx.options.poll_s)
    return {str(u.run_dir): schedule.run_state(u.run_dir, u.fp) for u in units}


Outcome = tuple[dict[str, RunState], dict[str, str], dict[int, str]]  # states, slug -> why missing, dead ranks


def missing_notes(dead: dict[int, str], plan: Sequence[Sequence[Unit]], ctx: RunContext) -> dict[str, str]:
    """slug -> why it is missing, for the models of ranks that died without sending results (unshared --out)."""
    if ctx.shared:
        return {}
    return {u.slug: f"{label} stopped before sending its results; rerun to resume"
            for r, label in dead.items() for u in plan[r]}


def run_model(ctx: RunContext, unit: Unit, size: int) -> RunState:
    """A whole model: streamed shard by shard under ``--max-disk`` (:mod:`hf_flag.harness.stream`), else
    :func:`run_unit` with layer checkpoints."""
    max_disk = ctx.config.max_disk
    if max_disk is not None:
        from hf_flag.harness.stream import is_streamed, run_streamed

        if is_streamed(unit.spec, max_disk):
            return run_streamed(ctx, unit)
    return run_unit(ctx, unit, size=size)


def sweep_models(ctx: RunContext, units: list[Unit]) -> Outcome:
    """Whole-model mode: take this rank's share, then others' unclaimed work (a shared folder); rank 0 waits for
    every model.  Returns (on rank 0) each model's state, notes on missing models and the ranks that died."""
    sizes = {u.slug: model_size(u.spec, ctx.config.max_disk) for u in units}
    by_slug = {u.slug: u for u in units}
    plan = [[by_slug[s] for s in share] for share in schedule.assign_models(sizes, ctx.world)]
    order = preference(plan, ctx.rank) if ctx.shared else plan[ctx.rank]
    with _bar(len(order), ctx.rank, "models") as bar:
        claim_and_run(ctx, order, lambda u: run_model(ctx, u, sizes[u.slug]), wait=ctx.is_main_process,
                      on_finished=lambda u: bar.update())
    dead = finish_rank(ctx, order)
    if ctx.rank != 0:
        return {}, {}, {}
    return {u.slug: schedule.run_state(u.run_dir, u.fp) for u in units}, missing_notes(dead, plan, ctx), dead


def merge_model(unit: Unit, parts: Sequence[Unit]) -> None:
    """Record a split model's outcome from its finished shards (under the model folder's lock, once)."""
    with locked(unit.run_dir):
        if finished(schedule.run_state(unit.run_dir, unit.fp)):
            return
        states = [schedule.run_state(s.run_dir, s.fp) for s in parts]
        failed = [s for s, st in zip(parts, states) if st is RunState.FAILED]
        if failed:
            schedule.mark_failed(unit.run_dir, unit.fp, schedule.read_error(failed[0].run_dir),
                                 model=unit.spec.label, shard=list(failed[0].layers),
                                 internal=schedule.failed_internally(failed[0].run_dir))
        elif all(st is RunState.DONE for st in states):
            reports = [Report.from_json((s.run_dir / schedule.REPORT).read_text()) for s in parts]
            schedule.mark_done(unit.run_dir, unit.fp, merge_shards(reports).to_json())


def sweep_split(ctx: RunContext, units: list[Unit]) -> Outcome:
    """Layer-split mode: rank ``k`` takes shard ``k`` of every model, then others' unclaimed shards; rank 0 waits
    for every shard and merges the shards of each model."""
    rank = ctx.rank
    sizes = {u.slug: model_size(u.spec, ctx.config.max_disk) for u in units}
    order = [u for s in schedule.largest_first(sizes) for u in units if u.slug == s]
    shards: dict[str, list[Unit]] = {}
    for unit in order:
        if finished(schedule.run_state(unit.run_dir, unit.fp)):
            continue
        try:
            shards[unit.slug] = shard_units(unit, ctx.world, ctx.config.max_disk)
        except Exception as exc:  # noqa: BLE001 - recorded as the model's failure
            if rank == 0:
                with locked(unit.run_dir):
                    schedule.mark_failed(unit.run_dir, unit.fp, one_line(exc), model=unit.spec.label,
                                         internal=exits.is_internal(exc))
    plan = [[parts[k] for parts in shards.values() if k < len(parts)] for k in range(ctx.world)]
    mine = preference(plan, rank) if ctx.shared else plan[rank]
    n_layers = {slug: sum(len(s.layers) for s in parts) for slug, parts in shards.items()}
    with _bar(len(mine), rank, "layer shards") as bar:  # a shard's share of the bytes sets its checkpoints
        claim_and_run(ctx, mine, lambda s: run_unit(ctx, s, size=sizes[s.slug] * len(s.layers) // n_layers[s.slug]),
                      wait=rank == 0,
                      on_finished=lambda s: bar.update())
    dead = finish_rank(ctx, mine)
    if rank != 0:
        return {}, {}, {}
    for slug, parts in shards.items():
        merge_model(next(u for u in units if u.slug == slug), parts)
    return {u.slug: schedule.run_state(u.run_dir, u.fp) for u in units}, missing_notes(dead, plan, ctx), dead


# ------------------------------------------------------------------------------------------------- several processes


def agree_on_run(state, cfg: SweepConfig, options: Options) -> tuple[str, bool]:
    """``(run id, shared)``, the same on every rank: rank 0's random run id, and whether every rank sees the same
    ``--out`` (``--out-shared auto``: rank 0 writes a probe file there, every rank looks for it)."""
    if state.num_processes == 1:
        return uuid.uuid4().hex, True
    from accelerate.utils import broadcast_object_list, gather_object

    ids = [uuid.uuid4().hex if state.process_index == 0 else None]
    broadcast_object_list(ids, from_process=0)
    run_id = str(ids[0])
    if options.out_shared != "auto":
        return run_id, options.out_shared == "yes"
    probe = cfg.out / SWEEP_DIR / run_id / "probe"
    if state.process_index == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(probe, run_id)
    state.wait_for_everyone()
    try:
        seen = probe.read_text() == run_id
    except OSError:
        seen = False
    return run_id, all(gather_object([seen]))


class Exchange:
    """Heartbeats and results of the ranks over the launcher's key-value store (``torch.distributed.TCPStore`` at
    ``MASTER_ADDR:MASTER_PORT``), used when ``--out`` is not shared.

    No collective: a collective cannot complete while a rank is dead, whereas rank 0 reads each rank's results
    when they arrive and names a rank whose heartbeat has stood still for a lease (``--lease-seconds``)."""

    def __init__(self, cfg: SweepConfig, options: Options, run_id: str, rank: int, world: int, label: str):
        import datetime

        import torch.distributed as dist

        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            raise ConfigError(f"--out {cfg.out} is not one folder for all processes, and MASTER_ADDR/MASTER_PORT "
                              f"are unset (launch with accelerate launch or torchrun), so results cannot reach "
                              f"rank 0; use a folder every machine sees")
        timeout = datetime.timedelta(seconds=max(60.0, options.lease_s))
        self.store = dist.PrefixStore(f"hf-flag-sweep/{run_id}/",
                                      dist.TCPStore(host, int(port), is_master=False, timeout=timeout))
        self.cfg, self.options, self.rank, self.world = cfg, options, rank, world
        self.store.set(f"who/{rank}", label)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="hf-flag-heartbeat", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.store.add(f"beat/{self.rank}", 1)
        while not self.stop.wait(self.options.lease_s / 8):
            try:
                self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the launcher's store is gone: nobody is listening any more
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def send(self, units: Sequence[Unit]) -> None:
        """This rank's outcome of ``units`` (reports and error markers), for rank 0."""
        payload = []
        for u in units:
            state = schedule.run_state(u.run_dir, u.fp)
            if finished(state):
                name = schedule.REPORT if state is RunState.DONE else schedule.ERROR
                payload.append({"dir": u.run_dir.relative_to(self.cfg.out).as_posix(), "fp": u.fp,
                                "state": state.value, "text": (u.run_dir / name).read_text(encoding="utf-8")})
        self.store.set(f"result/{self.rank}", json.dumps(payload))

    def label(self, rank: int) -> str:
        key = f"who/{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else f"rank {rank}"

    def collect(self) -> dict[int, str]:
        """Rank 0: write every other rank's outcomes into the run folders here as they arrive; returns the ranks
        that stopped without sending theirs (rank -> name)."""
        pending = set(range(1, self.world))
        seen = {r: (-1, time.monotonic()) for r in pending}
        dead: dict[int, str] = {}
        deadline = time.monotonic() + self.cfg.merge_timeout
        while pending and time.monotonic() < deadline:
            for r in sorted(pending):
                if self.store.check([f"result/{r}"]):
                    for item in json.loads(self.store.get(f"result/{r}")):
                        run_dir = self.cfg.out / item["dir"]
                        if item["state"] == RunState.DONE.value:
                            schedule.mark_done(run_dir, item["fp"], item["text"])
                        else:
                            run_dir.mkdir(parents=True, exist_ok=True)
                            atomic_write_text(run_dir / schedule.ERROR, item["text"])
                    pending.discard(r)
                    continue
                beats = self.store.add(f"beat/{r}", 0)
                if beats != seen[r][0]:
                    seen[r] = (beats, time.monotonic())
                elif time.monotonic() - seen[r][1] > self.options.lease_s:
                    dead[r] = self.label(r)
                    pending.discard(r)
            if pending:
                time.sleep(self.options.poll_s)
        return dead


FINISHED = "finished.json"


def stopped_ranks(ctx: RunContext) -> dict[int, str]:
    """Rank 0 of a shared folder, once every unit is finished: the ranks whose presence claim lapsed before they
    wrote ``finished.json`` (rank -> name); waits up to a lease for ranks still finishing."""
    pending, stopped = set(range(1, ctx.world)), {}
    deadline = time.monotonic() + ctx.options.lease_s
    while pending:
        for r in sorted(pending):
            folder = ctx.presence(r)
            claim = read_claim(folder)
            if (folder / FINISHED).is_file():
                pending.discard(r)
            elif not is_live(claim):
                stopped[r] = str(claim["owner"]) if claim else f"rank {r}"
                pending.discard(r)
        if pending:
            if time.monotonic() >= deadline:
                break
            time.sleep(ctx.options.poll_s)
    return stopped


def finish_rank(ctx: RunContext, ran: Sequence[Unit]) -> dict[int, str]:
    """After this rank's loop: ranks other than 0 report that they finished (and, when ``--out`` is not shared,
    send their outcomes); rank 0 gathers and returns the ranks that stopped early (rank -> name)."""
    if ctx.world == 1:
        return {}
    if ctx.rank != 0:
        if ctx.exchange is not None:
            ctx.exchange.send(ran)
        else:
            atomic_write_text(ctx.presence(ctx.rank) / FINISHED, json.dumps({"time": time.time()}))
        return {}
    return ctx.exchange.collect() if ctx.exchange is not None else stopped_ranks(ctx)


# ------------------------------------------------------------------------------------------------- outputs


def headline_columns(reports: Sequence[Report]) -> list[str]:
    """Headline metric keys (no baselines) present in any report, in ``HEADLINE_METRICS`` order."""
    from hf_flag.integrations.cards import headline_metrics

    present = {k for r in reports for k in headline_metrics(r)}
    return [m for m in HEADLINE_METRICS if m in present]


def headline_cells(report: Optional[Report], metrics: Sequence[str]) -> list[tuple[Optional[float],
                                                                                  Optional[float], str, str]]:
    """Per headline key of ``metrics``: ``(value, baseline, n, note)`` of ``report`` as the tables show it: means
    over the rows where the value reads (:func:`hf_flag.integrations.readings.select_read`), ``n`` those rows
    (``"20 of 29"`` where it reads on some only), ``note`` ``""``, ``"not read"``, ``"uninformative"`` or
    ``"20 of 29 read"``; ``(None, None, "", "")`` where the report has no value."""
    from hf_flag.integrations.readings import select_read

    cells = []
    for key in metrics:
        if report is None or key not in report.summary:
            cells.append((None, None, "", ""))
            continue
        selection = select_read(report, key)
        value, base = selection.means()
        n = str(selection.n) if selection.n == selection.of else f"{selection.n} of {selection.of}"
        cells.append((value, base, n, selection.note))
    return cells


def shown_cell(value: Optional[float], base: Optional[float], n: str, note: str) -> str:
    """``"0.0245 (0.0226) n=20 of 29"``, ``"not read (n=0 of 30)"`` or ``"-"``: a headline cell of the printed
    and Markdown tables."""
    if not n:
        return "-"
    if value is None:
        return f"{note} (n={n})"
    return format_value(value) + ("" if base is None else f" ({format_value(base)})") + f" n={n}"


def summary_table(results: Sequence[ModelResult]) -> tuple[str, str]:
    """``(csv, markdown)``: one line per model: where its weights came from (:func:`provenance_columns`) and each
    headline metric beside its baseline, with the number of rows it is a mean over (``_n``: the rows where it
    reads; :func:`headline_cells`) and, in ``notes``, which values are read on some rows only or on none."""
    reports = [r.report for r in results if r.report is not None]
    metrics = headline_columns(reports)
    provenance = list(provenance_columns(Report("", "")))
    header = ["model", "slug", "status", "architecture", "rows", *provenance,
              *[c for m in metrics for c in (m, baseline_key(m), m + "_n")], "notes", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    md_header = ["model", "status", "weights", "architecture", "rows",
                 *[f"{m}: mean (random) n" for m in metrics]]
    md = ["| " + " | ".join(md_header) + " |", "|" + "---|" * len(md_header)]
    for res in results:
        rep = res.report
        cells = headline_cells(rep, metrics)
        prov = provenance_columns(rep) if rep else dict.fromkeys(provenance, "")
        notes = "; ".join(f"{m}: {note}" for m, (_, _, _, note) in zip(metrics, cells) if note)
        writer.writerow([res.name, res.slug, res.status, rep.architecture if rep else "",
                         len(rep.rows) if rep else "", *prov.values(),
                         *["" if v is None else repr(float(v)) if i < 2 else v.split(" of ")[0]
                           for cell in cells for i, v in enumerate(cell[:3])], notes, res.error])
        status = res.status + (f": {res.error}" if res.error else "")
        weights = " ".join(x for x in (prov["weights_source"] + (f"@{prov['weights_sha'][:12]}" if prov["weights_sha"]
                                                                  else ""), prov["weights_format"],
                                       prov["storage_dtypes"]) if x) or "-"
        row = [res.name, status, weights, rep.architecture if rep else "-", str(len(rep.rows)) if rep else "-",
               *[shown_cell(*cell) for cell in cells]]
        md.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    return buf.getvalue(), "\n".join(md) + "\n"


def terminal_summary(results: Sequence[ModelResult]) -> str:
    """What ``hf-flag sweep`` prints at the end: one line per model, its status and each headline value beside its
    random baseline and the number of rows it is a mean over (``value (baseline) n=N``, :func:`shown_cell`; ``-``
    where the model has none), in fixed-width columns."""
    metrics = headline_columns([r.report for r in results if r.report is not None])
    rows = [["model", "status", *metrics]]
    for res in results:
        rows.append([res.name, res.status, *[shown_cell(*cell) for cell in headline_cells(res.report, metrics)]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(["headline means per model, each with its random baseline in parentheses and the rows it is a "
                      "mean over (n: those where the value reads; 'not read': kappa where its ranks do not allow "
                      "it, MATH.md §3):", *lines])


def provenance_columns(report: Report) -> dict[str, str]:
    """Where a report's weights came from, as dataset columns: Hub id (or a local model's Hub name), commit sha,
    file format, storage dtypes / quantisation, hf-flag version ("" where unknown)."""
    prov = report.params.get("provenance") or {}
    return {"weights_source": prov.get("repo_id") or prov.get("hub_name") or "", "weights_sha": prov.get("sha") or "",
            "weights_format": prov.get("format") or "",
            "storage_dtypes": ",".join(report.params.get("storage_dtypes") or []),
            "hf_flag_version": str(report.params.get("hf_flag_version") or "")}


def swap_paths(a: Path, b: Path) -> bool:
    """Exchange two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where that is not
    available (another system, a file system without it), so the caller renames twice instead."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def save_dataset(reports: Sequence[Report], path: Path, tag: str):
    """All rows of all reports as one ``datasets.Dataset``, saved to ``path`` and replaced as a whole.

    The new dataset is written to ``.<name>.<tag>.tmp`` (``tag`` unique to the process) and swapped in; readers
    see the old dataset or the new one.  The caller holds the output folder's lock (:func:`write_outputs`), so
    the temporaries of a writer that was killed are removed here.  A write error names ``path``.  Each row carries
    its weights' provenance (:func:`provenance_columns`)."""
    import datasets

    ds = rows_to_dataset([row for rep in reports for row in rep.flat_rows()])
    per_row = [provenance_columns(rep) for rep in reports for _ in rep.rows]
    for column in provenance_columns(Report("", "")):
        ds = ds.add_column(column, [p[column] for p in per_row], feature=datasets.Value("string"))
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    try:
        ds.save_to_disk(str(tmp))
        if not path.exists():
            tmp.rename(path)
        elif swap_paths(tmp, path):
            shutil.rmtree(tmp)  # now the old dataset
        else:
            old = path.with_name(f".{path.name}.{tag}.old")  # not *.tmp: never swept as a stale temporary
            path.rename(old)
            try:
                tmp.rename(path)
            except OSError:
                old.rename(path)  # the second rename failed: the old dataset goes back, nothing is lost
                raise
            shutil.rmtree(old)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ds


def card_base(spec: ModelSpec) -> Optional[str]:
    """The model's own README.md when it is a local folder that has one."""
    from hf_flag.integrations.cards import read_card

    readme = Path(spec.path) / "README.md"
    return read_card(readme) if readme.is_file() else None


def write_cards(res: ModelResult, plots: dict[str, Path], cfg: SweepConfig) -> None:
    """``CARDS_DIR/<slug>/README.md`` (default ``DIR/model_cards``) and, with ``--write-model-cards``, the local
    folder's README.md.  Each card gets its plots in ``hf-flag-plots/`` beside it and links them relatively, so the
    links work locally, in a copied folder, and on the Hub once the card is pushed with them."""
    from hf_flag.integrations.cards import PLOTS_FOLDER, card_model_name, minimal_card, write_card

    spec, report = res.unit.spec, res.report
    name = card_model_name(report, spec.name)
    targets = [cfg.cards_dir / res.slug / "README.md"]
    if cfg.write_model_cards and Path(spec.path).is_dir():
        targets.append(Path(spec.path) / "README.md")
    base = card_base(spec) or minimal_card(name)
    for target in targets:
        links = {c: f"{PLOTS_FOLDER}/{copy_plot(p, target.parent / PLOTS_FOLDER).name}" for c, p in plots.items()}
        write_card(target, report, base=base, model_name=name, plots=links)


def copy_plot(png: Path, folder: Path) -> Path:
    """Atomic copy of one plot into ``folder``; returns the copy's path."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / png.name
    atomic_write_bytes(dest, png.read_bytes())
    return dest


#: what the sweep writes into ``DIR`` and replaces as a whole on every run (:func:`check_outputs_ours`);
#: ``dataset.parquet`` only with ``--push-to-hub REPO_ID``
OUTPUTS = ("dataset", "summary.csv", "summary.md", "dataset.parquet")
#: ``DIR/sweep.json``, the manifest; its ``written_by`` marks the outputs beside it as hf-flag's
MANIFEST, WRITTEN_BY = "sweep.json", "hf-flag sweep"


def foreign_outputs(cfg: SweepConfig) -> list[Path]:
    """What the sweep of ``cfg`` would write over in ``cfg.out`` that no hf-flag ``sweep.json`` vouches for:
    :data:`OUTPUTS`, each model's ``plots/<slug>/`` (unless its run folder ``runs/<slug>/`` is there: the process
    that analysed it drew them, before any ``sweep.json`` was written) and, when the cards folder is inside
    ``cfg.out`` (its default ``DIR/model_cards`` included), each model's ``README.md`` and ``hf-flag-plots/`` there.
    Nothing is read besides whether the paths exist."""
    from hf_flag.integrations.cards import PLOTS_FOLDER

    out, names = cfg.out, slugs(cfg.models)
    paths = [out / p for p in OUTPUTS]
    paths += [plot_dir(cfg, slug) for slug in names if not (out / "runs" / slug).exists()]
    if cfg.cards_dir.resolve().is_relative_to(out.resolve()):
        paths += [cfg.cards_dir / slug / name for slug in names for name in ("README.md", PLOTS_FOLDER)]
    return [p for p in paths if p.exists()]


def check_outputs_ours(cfg: SweepConfig) -> None:
    """``ConfigError`` (exit 2, one line naming the path) when ``cfg.out`` holds a ``sweep.json`` that hf-flag did
    not write, or, without hf-flag's ``sweep.json``, anything the sweep would write over (:func:`foreign_outputs`):
    only a ``sweep.json`` with ``written_by`` (or, from hf-flag before it, a ``models`` list) vouches for the outputs
    beside it.  Nothing is written."""
    out = cfg.out
    manifest, foreign = out / MANIFEST, []
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and (data.get("written_by") == WRITTEN_BY or older_manifest(out, data)):
            return
        foreign.append(manifest)
    foreign += foreign_outputs(cfg)
    if foreign:
        raise ConfigError(f"--out {out}: {foreign[0]} exists and was not written by hf-flag sweep (no hf-flag "
                          f"{MANIFEST} beside it), and the sweep would replace it; move it away or choose another "
                          f"--out")


def older_manifest(out: Path, data: dict) -> bool:
    """Whether ``data`` is a ``sweep.json`` an hf-flag before ``written_by`` wrote: a non-empty ``models`` list of
    :meth:`ModelResult.manifest_entry` records whose run folders exist (a bare ``models`` key is not enough)."""
    models = data.get("models")
    return isinstance(models, list) and bool(models) and all(
        isinstance(m, dict) and {"name", "slug", "status"} <= m.keys() and isinstance(m["slug"], str)
        and (out / "runs" / m["slug"]).is_dir() for m in models)


def folder_results(out: Path, units: Sequence[Unit]) -> list[ModelResult]:
    """The models of ``out`` that ``units`` do not cover but that have a finished result in ``out/runs`` (earlier
    sweeps into the same folder), each labelled by its report's model name."""
    mine = {u.slug for u in units}
    results = []
    for run_dir in schedule.finished_runs(out / "runs"):
        if run_dir.name in mine:
            continue
        try:
            report = Report.from_json((run_dir / schedule.REPORT).read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:  # truncated, or written by another hf-flag
            unit = Unit(ModelSpec(run_dir.name), run_dir.name, run_dir, "")
            results.append(ModelResult(unit, "failed", f"{run_dir / schedule.REPORT} is unreadable ({one_line(exc)}); "
                                                       f"rerun that model, or delete {run_dir}", None))
            continue
        unit = Unit(ModelSpec(report.model or run_dir.name), run_dir.name, run_dir, "")
        results.append(ModelResult(unit, "done", "", report))
    return results


def write_manifest(out: Path, results: Sequence[ModelResult]) -> None:
    schedule.atomic_write_json(out / MANIFEST, {"written_by": WRITTEN_BY,
                                                "models": [r.manifest_entry() for r in results]})


def write_outputs(ctx: RunContext, units: list[Unit], states: dict[str, RunState],
                  notes: Optional[dict[str, str]] = None) -> list[ModelResult]:
    """Everything rank 0 writes after the merge, holding the output folder's lock (sweeps sharing the folder write
    one after the other); returns one result per model of ``units``.  The dataset, summaries and manifest also
    cover the folder's other finished models (module docstring).  ``notes``: slug -> why a model is missing."""
    with locked(ctx.config.out / SWEEP_DIR):
        return write_outputs_locked(ctx, units, states, notes or {})


def write_outputs_locked(ctx: RunContext, units: list[Unit], states: dict[str, RunState],
                         notes: dict[str, str]) -> list[ModelResult]:
    from hf_flag.harness.plots import save_plots_once

    cfg = ctx.config
    results = []
    for u in units:
        state = states.get(u.slug, RunState.NEW)
        status = {RunState.DONE: "done", RunState.FAILED: "failed"}.get(state, "missing")
        report = Report.from_json((u.run_dir / schedule.REPORT).read_text()) if state is RunState.DONE else None
        error = schedule.read_error(u.run_dir) if state is RunState.FAILED else "" if report else notes.get(
            u.slug, "no result before --merge-timeout (process died or still running); rerun to resume")
        results.append(ModelResult(u, status, error, report))
    check_outputs_ours(cfg)  # again under the lock: nothing appeared since the start
    folder = results + folder_results(cfg.out, units)
    write_manifest(cfg.out, folder)  # first: the outputs below are never on disk without it
    reports = [r.report for r in folder if r.report is not None]
    save_dataset(reports, cfg.out / "dataset", ctx.tag)
    csv_text, md_text = summary_table(folder)
    atomic_write_text(cfg.out / "summary.csv", csv_text)
    atomic_write_text(cfg.out / "summary.md", md_text)
    for i, res in enumerate(results):
        if res.report is None:
            continue
        try:
            results[i] = res = replace(res, plots=save_plots_once(res.report, plot_dir(cfg, res.slug), res.unit.fp))
            write_cards(res, res.plots, cfg)
        except Exception as exc:  # a card or plot problem is reported, not fatal
            results[i] = res = replace(res, error=f"card/plots: {one_line(exc)}")
            print(f"hf-flag sweep: {res.name}: {res.error}", file=sys.stderr)
    write_manifest(cfg.out, results + folder[len(results):])  # with the card errors
    return results


def dataset_card(results: Sequence[ModelResult]) -> str:
    """README.md of the results dataset repo: what it holds and where each model's weights came from."""
    from hf_flag import __version__
    from hf_flag.integrations.cards import DOCS_URL, card_model_name

    lines = ["---", "tags:", "- hf-flag", "- weight-geometry", "---", "", "# hf-flag weight-geometry results", "",
             f"One row per pair of weights (or pair of attention heads) of each model, from [hf-flag]({DOCS_URL}) "
             f"{__version__}; every value has its random baseline beside it (`<metric>_baseline`). The columns "
             "`weights_source`, `weights_sha`, `weights_format` and `storage_dtypes` say which weights each row was "
             "read from.", "", "| model | weights source | commit | format | storage |", "|---|---|---|---|---|"]
    for res in results:
        if res.report is not None:
            cols = provenance_columns(res.report)
            lines.append(f"| {card_model_name(res.report, res.unit.spec.name)} | {cols['weights_source'] or 'local'} "
                         f"| {cols['weights_sha'][:12] or '-'} | {cols['weights_format']} | {cols['storage_dtypes']} |")
    return "\n".join(lines) + "\n"


def push_failure(repo: str, exc: BaseException, out: Path) -> str:
    """The one line for a push to ``repo`` that failed with a Hub, token or connection error ``exc``: what failed
    and what to do (the results stay in ``out``; rerunning the same command pushes them)."""
    from huggingface_hub.errors import LocalTokenNotFoundError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, LocalTokenNotFoundError) or status == 401:
        todo = f"log in (hf auth login) or set HF_TOKEN to a token that can write to {repo}"
    elif status == 403:
        todo = f"the token may neither write to {repo} nor open a pull request there; use a token that can"
    elif status == 404:
        todo = f"the token can neither see {repo} nor create it; check the repo name and the token"
    elif isinstance(exc, OSError) and exc.filename:  # a local file of the push (a plot) could not be read
        todo = f"check {exc.filename}"
    else:
        todo = "the Hub did not answer; push again once it is reachable"
    return (f"--push-to-hub: {repo}: not pushed: {one_line(exc)}; {todo} (the results are in {out}; rerun the "
            f"same command to push them)")


def push_results(cfg: SweepConfig, results: list[ModelResult], *, dry_run: bool = False) -> int:
    """``--push-to-hub``: each model's card to its Hub repo (:func:`~hf_flag.integrations.cards.push_card`) and,
    with a repo id, the dataset to that dataset repo.  Returns the number of repos not pushed: derived weights
    without ``--allow-derived``, no Hub name, or a push the Hub refused or never answered (one line each,
    :func:`push_failure`; the other pushes go on).  huggingface_hub resolves the token: it passes through no code
    here.  A local write that fails (``dataset.parquet``) raises."""
    import datasets

    from hf_flag.integrations.cards import DerivedWeightsError, card_model_name, push_card, push_dataset

    hub_errors = (OSError, *transport_errors())  # huggingface_hub's errors (HTTP, token, offline) are OSErrors
    not_pushed = 0
    if isinstance(cfg.push_to_hub, str):
        if dry_run:
            print(f"hf-flag sweep: dry run: would upload the results dataset to dataset repo {cfg.push_to_hub}",
                  file=sys.stderr)
        else:
            parquet = cfg.out / "dataset.parquet"
            atomic_write(parquet, lambda p: datasets.load_from_disk(str(cfg.out / "dataset")).to_parquet(str(p)))
            try:
                url = push_dataset(cfg.push_to_hub, parquet, dataset_card(results))
                print(f"hf-flag sweep: results dataset uploaded: {url}", file=sys.stderr)
            except hub_errors as exc:
                print(f"{PROG}: error: " + push_failure(f"dataset repo {cfg.push_to_hub}", exc, cfg.out),
                      file=sys.stderr)
                not_pushed += 1
    for res in results:
        if res.report is None:
            continue
        repo_id = card_model_name(res.report, res.unit.spec.name)
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            print(f"hf-flag sweep: {res.name}: card not pushed: no Hub repo name; give the model one "
                  f"({{path: ..., name: org/name}} in the config)", file=sys.stderr)
            not_pushed += 1
            continue
        try:
            kind, text = push_card(repo_id, res.report, plots=res.plots, create_pr=cfg.create_pr, dry_run=dry_run,
                                   allow_derived=cfg.allow_derived)
        except DerivedWeightsError as exc:
            print(f"hf-flag sweep: {repo_id}: card not pushed: {exc}", file=sys.stderr)
            not_pushed += 1
            continue
        except hub_errors as exc:
            print(f"{PROG}: error: " + push_failure(repo_id, exc, cfg.out), file=sys.stderr)
            not_pushed += 1
            continue
        if kind == "dry-run":
            print(f"# hf-flag sweep: dry run: card of {repo_id}\n{text}", end="")
        else:
            print(f"hf-flag sweep: {repo_id}: card {'committed' if kind == 'commit' else 'pull request opened'}: "
                  f"{text}", file=sys.stderr)
    return not_pushed


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m hf_flag.harness.sweep`` / ``accelerate launch -m hf_flag.harness.sweep`` /
    ``hf-flag sweep``.

    Exit codes: module docstring (:data:`EXIT_STATUS`)."""
    exits.terminate_as_exception()
    try:
        cfg, args = parse_args(argv)
    except BaseException as exc:  # noqa: BLE001 - one line and an exit code
        return exits.exit_code(exc, PROG)
    try:
        return run(cfg, args)
    except BaseException as exc:  # noqa: BLE001 - one line and an exit code; the state on disk stays resumable
        return exits.exit_code(exc, PROG, traceback_dir=cfg.out / "errors",
                               resume_hint=f"finished models and layers are kept in {cfg.out}; rerun the same "
                                           f"command to resume")


def run(cfg: SweepConfig, args: argparse.Namespace) -> int:
    """The sweep of :func:`main` (exceptions propagate to it)."""
    from accelerate import PartialState

    options = Options.from_args(args)
    state = PartialState(cpu=cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()))
    rank, world = state.process_index, state.num_processes
    check_out_dir(cfg.out)  # on every rank, so all of them stop together
    check_outputs_ours(cfg)  # before any work, not after the analysis
    check_out_dir(cfg.cards_dir, "--cards-dir")  # before any work, not after the analysis
    device = resolve_device(cfg.device, state.local_process_index)
    configure_threads()  # this process's share of the cores (LOCAL_WORLD_SIZE, cores busy now)
    if world == 1 and os.environ.get("ACCELERATE_USE_CPU") == "True":
        print("hf-flag sweep: note: accelerate launch --cpu starts one process; for N CPU processes use "
              "accelerate launch --multi_gpu --num_processes N -m hf_flag.harness.sweep ... --device cpu",
              file=sys.stderr)
    units = model_units(cfg)
    run_id, shared = agree_on_run(state, cfg, options)  # startup only: every process alive
    if args.retry_failed:
        for u in units:  # every rank clears the same markers, then all agree before any work starts
            for marker in (u.run_dir / schedule.ERROR, *u.run_dir.glob(f"shards/*/{schedule.ERROR}")):
                marker.unlink(missing_ok=True)
        if world > 1:
            state.wait_for_everyone()
    if rank == 0 or not cfg.split_layers:  # this process draws plots: load matplotlib before the freeze
        importlib.import_module("hf_flag.harness.plots")
    owner = Owner.this_process()
    if world > 1:
        owner = Owner.this_process(f"rank {rank} (pid {owner.pid} on {owner.host})")
    with Claims(owner, options.lease_s) as claims:
        exchange = None if shared else Exchange(cfg, options, run_id, rank, world, owner.label)
        ctx = RunContext(cfg, rank=rank, world=world, device=device, options=options, claims=claims, run_id=run_id,
                         shared=shared, exchange=exchange)
        try:
            if shared and world > 1:
                claims.try_claim(ctx.presence(rank), rank=rank)
            sweep = sweep_split if cfg.split_layers else sweep_models
            with long_lived_frozen():
                states, notes, dead = sweep(ctx, units)
                if rank != 0:
                    return EXIT_OK
                results = write_outputs(ctx, units, states, notes)
        finally:
            if exchange is not None:
                exchange.close()
    shutil.rmtree(cfg.out / SWEEP_DIR / run_id, ignore_errors=True)
    for _, label in sorted(dead.items()):
        print(f"hf-flag sweep: {label} stopped before finishing" + (
            "; other processes took its work over" if shared else "; its models are missing, rerun to resume"),
            file=sys.stderr)
    not_pushed = push_results(cfg, results, dry_run=args.dry_run) if cfg.push_to_hub else 0
    print(terminal_summary(results), flush=True)
    bad = [r for r in results if r.status != "done"]
    for r in bad:
        print(f"hf-flag sweep: {r.name}: {r.status}: {r.error}", file=sys.stderr)
    print(f"hf-flag sweep: {len(results) - len(bad)}/{len(results)} models done; results in {cfg.out}",
          file=sys.stderr)
    internal = [r for r in bad if r.status == "failed" and schedule.failed_internally(r.unit.run_dir)]
    if internal:
        print(f"hf-flag sweep: {len(internal)} of them hit an internal error (a bug; its traceback is in "
              f"{internal[0].unit.run_dir / schedule.ERROR}, please report it)", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_INCOMPLETE if bad or not_pushed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
