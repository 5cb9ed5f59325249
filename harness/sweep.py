"""The sweep: many models through :func:`hf_flag.analyze`, one or several processes, results as a dataset.

Usage (all three are the same program)::

    python -m hf_flag.harness.sweep [MODEL ...] [--config FILE] --out DIR [--diagnostics ...] [--composition ...]
        [--device cpu|cuda|auto] [--split-layers] [--write-model-cards] [--push-to-hub REPO_ID] [--default]
    accelerate launch [--multi_gpu --num_processes 2] -m hf_flag.harness.sweep ... [--device cpu]
    hf-flag sweep ...

Several CPU processes: accelerate 1.15 starts a single process for ``accelerate launch --cpu --num_processes N``
(its multi-CPU mode needs mpirun), so use ``--multi_gpu --num_processes N`` (a torchrun launch) with ``--device cpu``
(the default): every process then joins a gloo group as a CPU process.

Work is dealt by :mod:`hf_flag.harness.schedule` (largest model first, round robin over processes starting at the last
rank, so rank 0, which merges afterwards, gets the lightest share; ``--split-layers``
deals each model's layers instead).  Every process writes its results into ``DIR/runs/<slug>/`` atomically with
started/done/error markers, so a rerun skips finished models and redoes those whose process died (a failure is final
for unchanged inputs; ``--retry-failed`` reruns failures; changed weights or parameters rerun by themselves).  The
process that analysed a model also draws its plots.  Rank 0 then
polls the filesystem for the others' markers (no collective that can time out; ``--merge-timeout``), merges what is
complete, names what is missing, and writes:

* ``DIR/dataset``: ``datasets.Dataset.save_to_disk`` of every row of every model (``datasets.load_from_disk``);
* ``DIR/summary.csv`` and ``DIR/summary.md``: one line per model, headline metrics beside their baselines;
* ``DIR/plots/<slug>/*.png`` (:mod:`hf_flag.harness.plots`; split models are drawn here) and
  ``DIR/model_cards/<slug>/README.md``
  (:mod:`hf_flag.integrations.cards`); ``--write-model-cards`` also updates local model folders' README.md;
* ``DIR/sweep.json``: each model's status (done / failed with its one-line error / missing).

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
Exit status: 0 all models done, 1 some failed or missing (everything else is still written), 2 bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib
import io
import os
import re
import shutil
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from hf_flag.analysis.api import analyze
from hf_flag.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from hf_flag.threads import configure_threads
from hf_flag.defaults import COMPOSITION_MODES, DIAGNOSTIC_NAMES
from hf_flag.harness import schedule
from hf_flag.harness.config import (DEVICES, ConfigError, ModelSpec, SweepConfig, build_config, default_model_specs,
                                    load_config, parse_config, parse_model, slugs)
from hf_flag.harness.schedule import RunState
from hf_flag.report import Report, baseline_key, rows_to_dataset
from hf_flag.rows import HEADLINE_METRICS, merge_shards
from hf_flag.weights.adapters import get_adapter
from hf_flag.weights.sources import open_weights

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Unit:
    """One unit of work: a whole model (``layers is None``) or one layer shard of it."""

    spec: ModelSpec
    slug: str
    run_dir: Path
    fp: str
    layers: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class RunContext:
    """What every step of one sweep process reads, fixed at startup (in the spirit of accelerate's
    ``PartialState``): the validated config, this process's ``rank`` among ``world`` processes, and its torch
    ``device``."""

    config: SweepConfig
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def is_main_process(self) -> bool:
        """Rank 0: it merges, plots split models and writes every output."""
        return self.rank == 0


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


# ------------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-flag sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="Hub ids (fetched through the HF cache) or local folders/files")
    p.add_argument("--config", help="YAML sweep config (see harness/config.py)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--diagnostics", nargs="+", help=f"subset of {' '.join(DIAGNOSTIC_NAMES)} (default: all)")
    p.add_argument("--composition", choices=COMPOSITION_MODES)
    p.add_argument("--cheap", action="store_true", default=None, help="pair rows' cheap values only")
    p.add_argument("--device", choices=DEVICES, help="default cpu; auto = cuda when available")
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
    p.add_argument("--max-disk", type=float, metavar="GB", dest="max_disk",
                   help="stream sharded Hub checkpoints shard by shard, holding at most GB of shards on disk")
    p.add_argument("--revision", help="branch, tag or commit sha of the MODEL Hub ids (default: main)")
    p.add_argument("--gguf-file", dest="gguf_file", help="which .gguf of a GGUF Hub repo (default: the finest "
                                                          "storage, see hf_flag.weights.hub)")
    p.add_argument("--default", action="store_true", help="add the embedded default models (MiniLM, SmolLM2)")
    p.add_argument("--merge-timeout", type=float, dest="merge_timeout",
                   help="seconds rank 0 waits for the other processes' results (default 86400)")
    p.add_argument("--retry-failed", action="store_true", help="rerun models that failed in an earlier run")
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
    extra = default_model_specs() if args.default else []
    return build_config(file_values, cli_checked, extra), args


def check_out_dir(out: Path, option: str = "--out") -> None:
    """Create ``out`` and prove it writable, or ``ConfigError`` naming ``option`` (exit 2)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
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


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def plot_dir(cfg: SweepConfig, slug: str) -> Path:
    return cfg.out / "plots" / slug


def run_unit(ctx: RunContext, unit: Unit) -> RunState:
    """Analyze one unit and record its outcome in its run folder (a failure is recorded, never raised).

    A whole model is also plotted here, before its done marker, so plotting runs in parallel across processes.
    """
    from hf_flag.harness.plots import save_plots_once

    cfg, rank = ctx.config, ctx.rank
    schedule.mark_started(unit.run_dir, unit.fp, rank)
    try:
        with open_source(unit.spec, cfg.max_disk) as source:
            report = analyze(source, device=ctx.device, diagnostics=cfg.diagnostics, layers=unit.layers,
                             cheap=cfg.cheap, composition=cfg.composition, name=unit.spec.label,
                             progress=True, **cfg.analyze_kwargs)  # progress: a bar per layer with its ETA
        if unit.layers is None:
            try:
                save_plots_once(report, plot_dir(cfg, unit.slug), unit.fp)
            except Exception:  # noqa: BLE001 - rank 0 plots again when merging, and records that error
                pass
        schedule.mark_done(unit.run_dir, unit.fp, report.to_json())
        return RunState.DONE
    except Exception as exc:  # one model's failure must not stop the sweep
        schedule.mark_failed(unit.run_dir, unit.fp, one_line(exc), model=unit.spec.label, rank=rank,
                             traceback=traceback.format_exc(limit=8))
        return RunState.FAILED


def model_units(cfg: SweepConfig) -> list[Unit]:
    out = cfg.out / "runs"
    return [Unit(spec, slug, out / slug, schedule.fingerprint(
        {**cfg.params(), "model": spec.path, **({"revision": spec.revision} if spec.revision else {}),
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


def sweep_models(ctx: RunContext, units: list[Unit]) -> dict[str, RunState]:
    """Whole-model mode: run this rank's share; rank 0 then waits for everyone's. Returns slug -> state (rank 0)."""
    cfg, rank, world = ctx.config, ctx.rank, ctx.world
    by_slug = {u.slug: u for u in units}
    sizes = {u.slug: model_size(u.spec, cfg.max_disk) for u in units}
    mine = schedule.assign_models(sizes, world)[rank]
    with _bar(len(units), rank, "models") as bar:
        for slug in mine:
            unit = by_slug[slug]
            if schedule.run_state(unit.run_dir, unit.fp) not in (RunState.DONE, RunState.FAILED):
                run = run_unit
                if cfg.max_disk is not None:
                    from hf_flag.harness.stream import is_streamed, run_streamed

                    run = run_streamed if is_streamed(unit.spec, cfg.max_disk) else run_unit
                run(ctx, unit)
            bar.update()
        if rank != 0:
            return {}
        others = {s: (u.run_dir, u.fp) for s, u in by_slug.items() if s not in mine}
        states = schedule.wait_for(others, timeout=cfg.merge_timeout, on_finished=lambda *_: bar.update())
    states.update({s: schedule.run_state(by_slug[s].run_dir, by_slug[s].fp) for s in mine})
    return states


def sweep_split(ctx: RunContext, units: list[Unit]) -> dict[str, RunState]:
    """Layer-split mode: every rank runs its shard of every model; rank 0 merges the shards of each model."""
    cfg, rank, world = ctx.config, ctx.rank, ctx.world
    sizes = {u.slug: model_size(u.spec, cfg.max_disk) for u in units}
    order = [u for s in schedule.largest_first(sizes) for u in units if u.slug == s]
    shards: dict[str, list[Unit]] = {}
    with _bar(len(order), rank, "models (layer shards)") as bar:
        for unit in order:
            if schedule.run_state(unit.run_dir, unit.fp) in (RunState.DONE, RunState.FAILED):
                bar.update()
                continue
            try:
                shards[unit.slug] = shard_units(unit, world, cfg.max_disk)
            except Exception as exc:
                if rank == 0:
                    schedule.mark_failed(unit.run_dir, unit.fp, one_line(exc), model=unit.spec.label)
                bar.update()
                continue
            if rank < len(shards[unit.slug]):
                shard = shards[unit.slug][rank]
                if schedule.run_state(shard.run_dir, shard.fp) not in (RunState.DONE, RunState.FAILED):
                    run_unit(ctx, shard)
            bar.update()
    if rank != 0:
        return {}
    wanted = {str(s.run_dir): (s.run_dir, s.fp) for parts in shards.values() for s in parts}
    shard_states = schedule.wait_for(wanted, timeout=cfg.merge_timeout)
    for slug, parts in shards.items():
        unit = next(u for u in units if u.slug == slug)
        states = [shard_states[str(s.run_dir)] for s in parts]
        failed = [s for s, st in zip(parts, states) if st is RunState.FAILED]
        if failed:
            schedule.mark_failed(unit.run_dir, unit.fp, schedule.read_error(failed[0].run_dir),
                                 model=unit.spec.label, shard=list(failed[0].layers))
        elif all(st is RunState.DONE for st in states):
            reports = [Report.from_json((s.run_dir / schedule.REPORT).read_text()) for s in parts]
            schedule.mark_done(unit.run_dir, unit.fp, merge_shards(reports).to_json())
    return {u.slug: schedule.run_state(u.run_dir, u.fp) for u in units}


# ------------------------------------------------------------------------------------------------- outputs


def headline_columns(reports: Sequence[Report]) -> list[str]:
    """Headline metric keys (no baselines) present in any report, in ``HEADLINE_METRICS`` order."""
    from hf_flag.integrations.cards import headline_metrics

    present = {k for r in reports for k in headline_metrics(r)}
    return [m for m in HEADLINE_METRICS if m in present]


def summary_table(results: Sequence[ModelResult]) -> tuple[str, str]:
    """``(csv, markdown)``: one line per model: where its weights came from (:func:`provenance_columns`) and each
    headline metric beside its baseline."""
    reports = [r.report for r in results if r.report is not None]
    metrics = headline_columns(reports)
    provenance = list(provenance_columns(Report("", "")))
    header = ["model", "slug", "status", "architecture", "rows", *provenance,
              *[c for m in metrics for c in (m, baseline_key(m))], "error"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    md = ["| model | status | weights | architecture | rows | " + " | ".join(f"{m} (random)" for m in metrics) + " |",
          "|" + "---|" * (5 + len(metrics))]
    for res in results:
        rep = res.report
        vals = [rep.summary.get(k) if rep else None for m in metrics for k in (m, baseline_key(m))]
        prov = provenance_columns(rep) if rep else dict.fromkeys(provenance, "")
        writer.writerow([res.name, res.slug, res.status, rep.architecture if rep else "",
                         len(rep.rows) if rep else "", *prov.values(),
                         *["" if v is None else repr(float(v)) for v in vals], res.error])
        cells = [f"{a:.3g} ({b:.3g})" if a is not None and b is not None else f"{a:.3g}" if a is not None else "-"
                 for a, b in zip(vals[::2], vals[1::2])]
        status = res.status + (f": {res.error}" if res.error else "")
        weights = " ".join(x for x in (prov["weights_source"] + (f"@{prov['weights_sha'][:12]}" if prov["weights_sha"]
                                                                  else ""), prov["weights_format"],
                                       prov["storage_dtypes"]) if x) or "-"
        md.append(f"| {res.name} | {status.replace('|', '/')} | {weights} | {rep.architecture if rep else '-'} | "
                  f"{len(rep.rows) if rep else '-'} | " + " | ".join(cells) + " |")
    return buf.getvalue(), "\n".join(md) + "\n"


def provenance_columns(report: Report) -> dict[str, str]:
    """Where a report's weights came from, as dataset columns: Hub id (or a local model's Hub name), commit sha,
    file format, storage dtypes / quantisation, hf-flag version ("" where unknown)."""
    prov = report.params.get("provenance") or {}
    return {"weights_source": prov.get("repo_id") or prov.get("hub_name") or "", "weights_sha": prov.get("sha") or "",
            "weights_format": prov.get("format") or "",
            "storage_dtypes": ",".join(report.params.get("storage_dtypes") or []),
            "hf_flag_version": str(report.params.get("hf_flag_version") or "")}


def save_dataset(reports: Sequence[Report], path: Path):
    """All rows of all reports as one ``datasets.Dataset``, saved to ``path`` (replaced as a whole), each row with
    its weights' provenance (:func:`provenance_columns`)."""
    import datasets

    ds = rows_to_dataset([row for rep in reports for row in rep.flat_rows()])
    per_row = [provenance_columns(rep) for rep in reports for _ in rep.rows]
    for column in provenance_columns(Report("", "")):
        ds = ds.add_column(column, [p[column] for p in per_row], feature=datasets.Value("string"))
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
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


def write_outputs(ctx: RunContext, units: list[Unit], states: dict[str, RunState]) -> list[ModelResult]:
    """Everything rank 0 writes after the merge; returns one result per model."""
    from hf_flag.harness.plots import save_plots_once

    cfg = ctx.config
    results = []
    for u in units:
        state = states.get(u.slug, RunState.NEW)
        status = {RunState.DONE: "done", RunState.FAILED: "failed"}.get(state, "missing")
        report = Report.from_json((u.run_dir / schedule.REPORT).read_text()) if state is RunState.DONE else None
        error = schedule.read_error(u.run_dir) if state is RunState.FAILED else (
            "" if report else "no result before --merge-timeout (process died or still running); rerun to resume")
        results.append(ModelResult(u, status, error, report))
    reports = [r.report for r in results if r.report is not None]
    save_dataset(reports, cfg.out / "dataset")
    csv_text, md_text = summary_table(results)
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
    manifest = {"models": [r.manifest_entry() for r in results]}
    schedule.atomic_write_json(cfg.out / "sweep.json", manifest)
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


def push_results(cfg: SweepConfig, results: list[ModelResult], *, dry_run: bool = False) -> int:
    """``--push-to-hub``: each model's card to its Hub repo (:func:`~hf_flag.integrations.cards.push_card`) and,
    with a repo id, the dataset to that dataset repo.  Returns the number of cards not pushed (derived weights
    without ``--allow-derived``, no Hub name).  huggingface_hub resolves the token: it passes through no code here."""
    import datasets

    from hf_flag.integrations.cards import DerivedWeightsError, card_model_name, push_card, push_dataset

    if isinstance(cfg.push_to_hub, str):
        if dry_run:
            print(f"hf-flag sweep: dry run: would upload the results dataset to dataset repo {cfg.push_to_hub}",
                  file=sys.stderr)
        else:
            parquet = cfg.out / "dataset.parquet"
            atomic_write(parquet, lambda p: datasets.load_from_disk(str(cfg.out / "dataset")).to_parquet(str(p)))
            url = push_dataset(cfg.push_to_hub, parquet, dataset_card(results))
            print(f"hf-flag sweep: results dataset uploaded: {url}", file=sys.stderr)
    not_pushed = 0
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
        if kind == "dry-run":
            print(f"# hf-flag sweep: dry run: card of {repo_id}\n{text}", end="")
        else:
            print(f"hf-flag sweep: {repo_id}: card {'committed' if kind == 'commit' else 'pull request opened'}: "
                  f"{text}", file=sys.stderr)
    return not_pushed


@contextlib.contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Keep every object alive now (the imported libraries: torch, matplotlib, accelerate) out of the garbage
    collector's passes while the block runs; they are handed back at the end.

    Each figure the sweep draws is cyclic garbage, so a sweep triggers full collections, and each full collection
    traverses every object of the imported libraries (0.1-0.2 s with torch and matplotlib loaded; two or three in a
    sweep of six small models).  ``gc.freeze`` moves them to CPython's permanent generation, which no collection
    visits.  Does nothing when objects are frozen already (the caller manages the collector).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m hf_flag.harness.sweep`` / ``accelerate launch -m hf_flag.harness.sweep`` /
    ``hf-flag sweep``."""
    try:
        cfg, args = parse_args(argv)
        from accelerate import PartialState

        state = PartialState(cpu=cfg.device == "cpu")
        check_out_dir(cfg.out)  # on every rank, so all of them stop together
        check_out_dir(cfg.cards_dir, "--cards-dir")  # before any work, not after the analysis
        ctx = RunContext(cfg, rank=state.process_index, world=state.num_processes,
                         device=resolve_device(cfg.device, state.local_process_index))
        rank, world = ctx.rank, ctx.world
        configure_threads()  # this process's share of the cores (LOCAL_WORLD_SIZE, load)
        if world == 1 and os.environ.get("ACCELERATE_USE_CPU") == "True":
            print("hf-flag sweep: note: accelerate launch --cpu starts one process; for N CPU processes use "
                  "accelerate launch --multi_gpu --num_processes N -m hf_flag.harness.sweep ... --device cpu",
                  file=sys.stderr)
    except ConfigError as exc:
        print(f"hf-flag sweep: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    units = model_units(cfg)
    if world > 1:
        state.wait_for_everyone()  # startup only: out dir exists, every process alive
    if args.retry_failed:
        for u in units:  # every rank clears the same markers, then all agree before any work starts
            for marker in (u.run_dir / schedule.ERROR, *u.run_dir.glob(f"shards/*/{schedule.ERROR}")):
                marker.unlink(missing_ok=True)
        if world > 1:
            state.wait_for_everyone()
    if rank == 0 or not cfg.split_layers:  # this process draws plots: load matplotlib before the freeze
        importlib.import_module("hf_flag.harness.plots")
    sweep = sweep_split if cfg.split_layers else sweep_models
    with long_lived_frozen():
        states = sweep(ctx, units)
        if not ctx.is_main_process:
            return EXIT_OK
        results = write_outputs(ctx, units, states)
    if cfg.push_to_hub:
        target = cfg.push_to_hub if isinstance(cfg.push_to_hub, str) else ""
        try:
            if push_results(cfg, results, dry_run=args.dry_run):
                return EXIT_INCOMPLETE
        except Exception as exc:  # noqa: BLE001 - network / token / permission: one line, results stay on disk
            print(f"hf-flag sweep: error: --push-to-hub {target}".rstrip() + f": {one_line(exc)}; the results are "
                  f"in {cfg.out} (push them again with the same command once the Hub is reachable)", file=sys.stderr)
            return EXIT_INCOMPLETE
    bad = [r for r in results if r.status != "done"]
    for r in bad:
        print(f"hf-flag sweep: {r.name}: {r.status}: {r.error}", file=sys.stderr)
    print(f"hf-flag sweep: {len(results) - len(bad)}/{len(results)} models done; results in {cfg.out}",
          file=sys.stderr)
    return EXIT_INCOMPLETE if bad else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
