"""The ``hf-flag`` command line: ``analyze`` here, ``sweep`` / ``reproduce`` / ``register`` dispatched lazily.

``hf-flag analyze MODEL [MODEL ...]`` prints, per model, a table of every row kind's headline mean beside its
random baseline (``hf_flag.rows.table_metrics``); ``--json`` prints each report as one line of JSON instead (JSON
Lines: one line per model); ``--out DIR`` writes ``DIR/<model-slug>/report.json`` and
``DIR/<model-slug>/rows.parquet`` atomically (temporary file + rename) and refuses, before any analysis, to
overwrite a file that is not an hf-flag output or to give two models one folder.  User errors (a bad path, an
unreadable checkpoint, an unknown architecture, bad arguments, a bad device) print one line ``hf-flag: error: ...``
on stderr and exit with code 2; internal errors exit 1 with one line naming the file their traceback was saved to;
Ctrl-C exits 130 (:mod:`hf_flag.exits`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from hf_flag.analysis.api import analyze
from hf_flag import exits
from hf_flag.atomic import atomic_write
from hf_flag.collector import long_lived_frozen
from hf_flag.defaults import default_hub_id, default_named_paths, model_slug, parse_diagnostics
from hf_flag.errors import InputError
from hf_flag.options import OneLineParser, add_model_options
from hf_flag.integrations.readings import select_read
from hf_flag.rows import format_value, table_metrics
from hf_flag.weights.sources import open_weights

REPORT_FILE = "report.json"
ROWS_FILE = "rows.parquet"

# subcommand -> (module, function) of the dispatched entry points, imported only when called
DISPATCH = {
    "sweep": ("hf_flag.harness.sweep", "main"),
    "reproduce": ("hf_flag.harness.experiments.reproduce", "main"),
    "register": ("hf_flag.integrations.evaluate_modules", "register_main"),
}


class CliError(InputError):
    """A user error found by the command line itself (bad argument, missing default model, unsafe overwrite)."""


class Parser(OneLineParser):
    """An ``ArgumentParser`` whose errors are :class:`CliError` (one line, exit 2) instead of usage + exit."""

    error_type = CliError


def parse_layers(text: str) -> list[int]:
    """``"0,1,5-7"`` -> ``[0, 1, 5, 6, 7]`` (sorted, unique)."""
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise CliError(f"cannot read {part!r}; use indices and ranges like 0,1,5-7")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise CliError(f"range {part!r} is descending; write it as {hi}-{lo}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def layers_argument(text: str) -> list[int]:
    """:func:`parse_layers` for argparse, which keeps the message of an ``ArgumentTypeError`` only."""
    try:
        return parse_layers(text)
    except CliError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def format_table(report) -> str:
    """Readable summary: per row kind, its metrics' means beside their random baselines, each over the ``n`` rows
    where it reads (:func:`hf_flag.integrations.readings.select_read`: kappa where its reading as alignment holds,
    MATH.md §3; the range overlap where it is informative); a value read on no row is marked, not shown, and a note
    below the table says why each value not read on every row is not."""
    layout = report.layout or {}
    head = f"{report.model}  [{report.architecture}"
    if layout.get("n_layers"):
        head += f", {layout['n_layers']} layers, d_model {layout.get('d_model')}"
    head += f"]  {len(report.rows)} rows"
    elapsed = report.params.get("elapsed_s")
    if elapsed is not None:
        head += f", {elapsed:.1f} s"
    prov = report.params.get("provenance") or {}
    source = prov.get("repo_id") or prov.get("hub_name") or prov.get("source") or "unrecorded"
    sha = f" at {prov['sha'][:12]}" if prov.get("sha") else ""
    storage = "/".join(report.params.get("storage_dtypes") or []) or "-"
    lines = [head, f"  weights: {source}{sha}, {prov.get('format', '-')}, stored as {storage}; hf-flag "
                   f"{report.params.get('hf_flag_version', '-')}",
             f"  {'kind':<24}{'rows':>7}  {'metric':<22}{'mean':>14}{'baseline':>11}{'n':>11}"]
    notes = []
    for kind in report.kinds():
        n_rows = len(report.select(kind=kind))
        for i, metric in enumerate(table_metrics(kind)):
            key = f"{kind}/{metric}"
            if key not in report.summary:
                continue
            selection = select_read(report, key)
            value, base = selection.means()
            n = str(selection.n) if selection.n == selection.of else f"{selection.n} of {selection.of}"
            lines.append(
                f"  {kind if i == 0 else '':<24}{n_rows if i == 0 else '':>7}  {metric:<22}"
                f"{selection.verdict if not selection.rows else format_value(value):>14}{format_value(base):>11}"
                f"{n:>11}"
            )
            if selection.why:
                notes.append(f"  {key}: {selection.why}.")
    if notes:
        lines += ["  n: rows each mean is over (those where the value reads); not read on the others:", *notes]
    return "\n".join(lines)


def is_hf_flag_output(path: Path) -> bool:
    """True when ``path`` was written by hf-flag (a report JSON, or a rows file beside one)."""
    if path.name == REPORT_FILE:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and "hf_flag_version" in data.get("params", {})
    return is_hf_flag_output(path.parent / REPORT_FILE)


def check_out(out_dir: Path, models: Mapping[str, str]) -> None:
    """Before any analysis: ``--out`` is (or can become) a folder hf-flag can write, each model (path -> its
    ``<slug>`` folder name) gets its own folder, and no file there would replace one hf-flag did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--out {out_dir} is a file, not a folder; choose a folder")
    existing = out_dir.absolute()  # a folder that cannot be made or written fails now, not after the analysis
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not writable" if existing.is_dir() else "not a folder"
        raise CliError(f"--out {out_dir} cannot be written ({existing} is {why}); choose a folder you can write")
    seen: dict[str, str] = {}
    for model, slug in models.items():
        if slug in seen:
            raise CliError(f"models {seen[slug]!r} and {model!r} would both write {out_dir / slug}; "
                           f"analyse them with separate --out folders")
        seen[slug] = model
        for file in (REPORT_FILE, ROWS_FILE):
            check_overwrite(out_dir / slug / file)


def check_overwrite(path: Path) -> None:
    """CliError unless ``path`` is absent or was written by hf-flag."""
    if path.exists() and not is_hf_flag_output(path):
        raise CliError(f"{path} exists and was not written by hf-flag; choose another --out folder")


def write_outputs(report, out_dir: Path, slug: str) -> Path:
    """``out_dir/<slug>/report.json``, then ``rows.parquet``, each atomically (the report marks the folder as
    hf-flag's, so an interrupted run can be repeated); refuses to replace a file hf-flag did not write."""
    folder = out_dir / slug
    for file in (REPORT_FILE, ROWS_FILE):  # refuse before writing anything (checked again: the analysis took time)
        check_overwrite(folder / file)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / REPORT_FILE, lambda p: p.write_text(report.to_json()))
    atomic_write(folder / ROWS_FILE, lambda p: report.to_dataset().to_parquet(str(p)))
    return folder


#: one line of ``hf-flag --help`` per dispatched subcommand
SUBCOMMAND_HELP = {
    "sweep": "analyse many models, in one or several processes, into a results dataset, summaries, plots and "
             "model cards (hf-flag sweep --help)",
    "reproduce": "rerun the experiments behind the paper's claims and write a reproduction report "
                 "(hf-flag reproduce --help)",
    "register": "make evaluate.load('flag_alignment') and evaluate.load('neural_collapse') work offline",
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hf-flag", description="Flag-variety alignment diagnostics read from a model's weights: "
                                                "every value beside its random baseline.")
    sub = parser.add_subparsers(dest="command", required=True)
    an = sub.add_parser("analyze", help="analyse checkpoints and print a summary table per model",
                        description="Analyse checkpoints: per model, a table of each diagnostic's mean beside its "
                                    "random baseline (or, with --json, the full report).")
    add_model_options(an)
    an.add_argument("--out", type=Path, metavar="DIR", help="also write DIR/<model>/report.json and rows.parquet")
    an.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)")
    an.add_argument("--dtype", choices=("float64", "float32"),
                    help="precision of the analysis (default: float32 for weights stored in float32 or coarser, "
                         "float64 for float64 weights; --full computes in float64 and refuses float32)")
    an.add_argument("--full", action="store_true",
                    help="every singular vector of every weight (the all-vectors analysis) instead of the leading "
                         "subspaces the storage precision determines (the default)")
    an.add_argument("--layers", type=layers_argument, help="block indices to analyse, e.g. 0,1,5-7 (default: all)")
    an.add_argument("--allow-pickle", action="store_true",
                    help="allow .bin/.pt checkpoints (read with torch.load(weights_only=True)); only for files you "
                         "trust")
    an.add_argument("--json", action="store_true",
                    help="print each model's full report as one line of JSON (JSON Lines) instead of the table")
    for command in DISPATCH:  # listed for --help; main() hands their arguments over verbatim
        sub.add_parser(command, help=SUBCOMMAND_HELP[command])
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    from hf_flag.threads import configure_threads

    configure_threads()
    with long_lived_frozen():  # the imports' objects out of the collector's passes, handed back after
        return analyze_models(args)


def analyze_models(args: argparse.Namespace) -> int:
    """The body of :func:`run_analyze`: analyse every MODEL of ``args`` and write or print the reports."""
    named = list(default_named_paths()) if args.default else []
    models = list(args.models) + [path for path, _ in named]
    if not models:
        raise CliError("analyze: give at least one MODEL, or --default")
    hub_ids = dict(named)  # default models are named (and their folders named) by their Hub ids
    if args.name is not None:
        if len(models) != 1:
            raise CliError(f"--name {args.name}: names one model, but {len(models)} were given; name several "
                           f"models in a sweep config (models: [{{path: ..., name: ...}}])")
        hub_ids[models[0]] = args.name
    slugs = {model: model_slug(model, hub_ids.get(model) or default_hub_id(model)) for model in models}
    if args.out is not None:
        check_out(args.out, slugs)
    diagnostics = None
    if args.diagnostics:
        try:
            diagnostics = set(parse_diagnostics(args.diagnostics))
        except ValueError as exc:
            raise CliError(f"--diagnostics: {exc}") from None
    for model in models:
        with open_weights(model, allow_pickle=args.allow_pickle, revision=args.revision, gguf_file=args.gguf_file,
                          max_disk_bytes=None if args.max_disk is None else int(args.max_disk * 1e9)) as source:
            # labelled by --name or an embedded default model's Hub id, else by its folder or file name
            name = hub_ids.get(model) or (getattr(source, "provenance", None) or {}).get("hub_name")
            report = analyze(
                source, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                full=args.full, diagnostics=diagnostics,
                layers=args.layers, cheap=args.cheap, composition=args.composition, progress=True, name=name,
            )
        print(report.to_json(indent=None) if args.json else format_table(report), flush=True)
        if args.out is not None:
            folder = write_outputs(report, args.out, slugs[model])
            print(f"hf-flag: wrote {folder}", file=sys.stderr)
    return 0


def run_dispatch(command: str, argv: Sequence[str]) -> int:
    module_name, func_name = DISPATCH[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CliError(f"{command}: {module_name} is not available ({exc}); install the full hf-flag") from exc
    func = getattr(module, func_name, None)
    if func is None:
        raise CliError(f"{command}: {module_name} has no {func_name}(); install the full hf-flag")
    result = func(list(argv))
    return int(result or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hf-flag``; returns the exit code (:mod:`hf_flag.exits`: 0 success, 1 internal error with
    its traceback saved, 2 user error, 130 Ctrl-C), printing one line on stderr for anything but success."""
    argv = list(sys.argv[1:] if argv is None else argv)
    exits.terminate_as_exception()
    try:
        if argv and argv[0] in DISPATCH:
            return run_dispatch(argv[0], argv[1:])
        return run_analyze(build_parser().parse_args(argv))
    except BaseException as exc:  # noqa: BLE001 - every outcome becomes one line and an exit code
        return exits.exit_code(exc, "hf-flag")


if __name__ == "__main__":
    sys.exit(main())
