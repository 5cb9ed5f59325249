"""hf-flag's part of a model card: a Markdown section, one YAML key, and its results in the model-index.

Ownership.  In a card (README.md) hf-flag owns exactly three things; every other byte of the user's card (text,
YAML keys, their order, comments, quoting, line endings) is preserved, and writing the same report twice gives the
same file:

1. the Markdown between ``<!-- hf-flag:start -->`` and ``<!-- hf-flag:end -->`` (markers included; appended at the
   end of the card the first time);
2. the top-level YAML key ``hf_flag:`` (its line and its indented block; appended at the end of the front matter
   the first time; a front matter block is created when the card has none);
3. its results in the top-level ``model-index:``, marked the huggingface_hub way: every ``EvalResult`` hf-flag
   writes has ``source_name="hf-flag"`` and ``source_url=DOCS_URL``.  A rerun removes exactly the results with that
   source (and the comment-marked entry of hf-flag <= 0.1.0) and adds the new ones to the *first* model-index
   entry, under the user's model name; the user's results and names are never changed.  This survives any
   ``ModelCard`` load/save (which drops comments and merges entries into one under one name).  The model-index
   block is rewritten only when its content changes; it is then dumped as huggingface_hub dumps it.

Model-index convention: ``task_type="weight-geometry"`` (``task_name="Weight geometry (hf-flag)"``; a custom task
type, because these are properties of the weights, not scores on a task), ``dataset_type="hf-flag"``,
``dataset_name="weights"``, ``dataset_revision`` = the commit the weights were read at (when known),
``metric_type`` = the report's summary key, e.g. ``"mlp/commutator_ratio"``, and its random baseline as a metric of
its own, ``"mlp/commutator_ratio_baseline"``; ``metric_name`` is a readable label.  Metrics come from
``hf_flag.rows.HEADLINE_METRICS`` (those present in the report).

The section opens with where the numbers come from (:func:`provenance_sentence`: a card computed from anything
other than the named repo's own weights says so in its first sentence), states the reading rule
(:mod:`hf_flag.integrations.readings`), then one plain paragraph per diagnostic with a link to its definition and
each number beside its random baseline and its spread over layers.  Local models are named by ``--name`` (an
embedded default model by its Hub id), else by their folder's or file's name, never by a path and never by their
config's ``_name_or_path`` (which names the model a copy was loaded or fine-tuned from).

Integrations do no math: everything here formats an :class:`hf_flag.report.Report`.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import yaml
from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from hf_flag.errors import InputError
from hf_flag.integrations import readings
from hf_flag.report import BASELINE_SUFFIX, Report
from hf_flag.rows import HEADLINE_METRICS, KIND_LABELS

SECTION_START = "<!-- hf-flag:start -->"
SECTION_END = "<!-- hf-flag:end -->"
YAML_KEY = "hf_flag"
LEGACY_INDEX_START = "# hf-flag:model-index:start"  # hf-flag <= 0.1.0 marked its entry with YAML comments
LEGACY_INDEX_END = "# hf-flag:model-index:end"
TASK_TYPE = "weight-geometry"
TASK_NAME = "Weight geometry (hf-flag)"
DATASET_TYPE = "hf-flag"
DATASET_NAME = "weights"
SOURCE_NAME = "hf-flag"
#: where hf-flag's documentation lives: the model-index source URL, and the base of the definitions' links
DOCS_URL = "https://github.com/hf-flag/hf-flag"
MATH_URL = DOCS_URL + "/blob/main/docs/MATH.md"
#: folder beside a card that holds its plots (pushed with the card, so the links work on the Hub and locally)
PLOTS_FOLDER = "hf-flag-plots"

#: metric -> (title, plain paragraph, MATH.md anchor)
DEFINITIONS = {
    "commutator_ratio": (
        "Commutator ratio (kappa)",
        "Two weights that meet in a shared hidden space (one writes into it, the next reads from it) each pick "
        "principal directions there. The commutator ratio measures how far they are from sharing one set of "
        "directions: 0 when they share it, larger when they disagree. The random baseline is the value the same "
        "weights would give with the hidden space randomly rotated. It reads as alignment only when one of the two "
        "weights has full rank in that space; otherwise the range overlap is read.",
        "3-commutator-obstruction"),
    "range_overlap": (
        "Range overlap",
        "How much of the space one weight writes lies inside the space the next weight reads (1: the same "
        "subspace; random baseline: two random subspaces of the same dimensions).",
        "3-commutator-obstruction"),
    "subspace_score": (
        "Subspace score",
        "The share of the first weight's top output directions that fall inside the next weight's top input "
        "directions (1: the same subspace; random baseline: random subspaces of the same size).",
        "4-flags-intersection-dimension-relative-position"),
    "basis_score": (
        "Basis score",
        "Like the subspace score, but direction by direction: whether the i-th output direction of one weight is "
        "the i-th input direction of the next.",
        "4-flags-intersection-dimension-relative-position"),
    "intersection_dim": (
        "Intersection dimension",
        "How many directions the nested top-k subspaces (flags) of the two weights share beyond what subspaces in "
        "general position share; subspaces are cut only at clear gaps of the singular values.",
        "4-flags-intersection-dimension-relative-position"),
    "overlap": (
        "Head subspace overlap",
        "How much the subspaces two attention heads read from or write to overlap (1: the same subspace; random "
        "baseline: random subspaces of the same dimensions). Above random suggests redundant heads, below it "
        "heads that specialise.",
        "6-attention-heads-weight-only"),
    "score": (
        "Composition score",
        "How strongly a head's output can feed the query, key or value of a head in a later layer (Elhage et "
        "al. 2021); the random baseline is that of random matrices of the same shapes.",
        "6-attention-heads-weight-only"),
}
VERDICT_TEXT = {readings.ABOVE: "above random", readings.BELOW: "below random",
                readings.RANDOM: "not distinguishable from random at this spread"}
#: verdicts under which a value is shown in the card's text but not published as a number (YAML, model-index)
UNREAD_VERDICTS = frozenset({readings.NOT_READ, readings.UNINFORMATIVE})


class CardFormatError(InputError):
    """A card cannot be edited safely (e.g. a flow-style ``model-index: [...]``); the message says what to change."""


class DerivedWeightsError(InputError):
    """A card computed from derived weights would be pushed to the original repo without ``allow_derived``."""


# ---------------------------------------------------------------------------------------------------------------
# what we write


def headline_metrics(report: Report, metrics: Optional[Sequence[str]] = None) -> list[str]:
    """Non-baseline headline keys present in ``report.summary`` with a finite value (default order:
    ``hf_flag.rows.HEADLINE_METRICS``)."""
    if metrics is None:
        metrics = HEADLINE_METRICS
    return [m for m in metrics if not m.endswith(BASELINE_SUFFIX) and _finite(report.summary.get(m))]


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def metric_label(key: str) -> str:
    """``"mlp/commutator_ratio"`` -> ``"Commutator ratio (kappa), MLP (in -> out)"``."""
    kind, _, metric = key.partition("/")
    title = DEFINITIONS.get(metric, (metric.replace("_", " "),))[0]
    return f"{title}, {KIND_LABELS.get(kind, kind.replace('_', ' '))}"


def provenance(report: Report) -> dict:
    return dict(report.params.get("provenance") or {})


def storage_text(report: Report) -> str:
    """``"GGUF, quantised Q4_1 (some tensors F32)"`` / ``"safetensors, bfloat16"``: format and storage dtypes."""
    fmt = provenance(report).get("format") or "unknown format"
    dtypes = list(report.params.get("storage_dtypes") or [])
    quantised = [d for d in dtypes if not d[:1].islower()]  # GGUF quantisation names are upper case (Q4_1, F16)
    shown = "GGUF" if fmt == "gguf" else fmt
    if quantised:
        return f"{shown}, stored as {'/'.join(quantised)}" + (
            f" (some tensors {'/'.join(d for d in dtypes if d not in quantised)})" if len(quantised) < len(dtypes)
            else "")
    return f"{shown}, {'/'.join(dtypes)}" if dtypes else shown


def is_derived(report: Report, model_name: str) -> bool:
    """True unless the report was computed from ``model_name``'s own files fetched from the Hub at a known commit."""
    prov = provenance(report)
    return not (prov.get("source") == "hub" and prov.get("repo_id") == model_name and prov.get("sha"))


def card_model_name(report: Report, name: Optional[str] = None) -> str:
    """The name a card and its model-index give the model: ``name`` (``--name``), else the Hub id the weights were
    fetched from, else an embedded default model's Hub id (provenance ``hub_name``), else the report's label when it
    is no path,
    else the last component of that path (never an absolute path)."""
    prov = provenance(report)
    for candidate in (name, prov.get("repo_id"), prov.get("hub_name")):
        if candidate:
            return candidate
    label = report.model
    if os.path.isabs(label) or label.startswith((".", "~")) or label.count("/") > 1 or "\\" in label:
        return Path(label.rstrip("/\\")).name or "model"
    return label


def provenance_sentence(report: Report, model_name: str) -> str:
    """The section's first sentence: where the numbers come from.  Anything but ``model_name``'s own files fetched
    from the Hub at a known commit (:func:`is_derived`) says so first, as a copy hf-flag did not verify: a local
    file may or may not be byte-identical to the Hub's (nothing compares them), so it is never called derived."""
    from hf_flag import __version__

    prov = provenance(report)
    version = report.params.get("hf_flag_version") or __version__
    storage = storage_text(report)
    if not is_derived(report, model_name):
        return (f"Read by hf-flag {version} from this repository's own weights at commit `{prov['sha'][:12]}` "
                f"({storage}), without running the model.")
    if prov.get("source") == "hub":
        where = f"the Hub repository `{prov.get('repo_id')}` at commit `{str(prov.get('sha'))[:12]}`"
    elif prov.get("source") == "module":
        where = f"an unverified in-memory `{prov.get('class', 'model')}`"
    elif prov.get("source") == "local":
        files = prov.get("files") or []
        where = "an unverified local copy" + (f" ({', '.join(f'`{f}`' for f in files)})" if files else "")
    else:
        where = "weights whose origin this report does not record"
    return (f"**Computed from {where}, not from `{model_name}`'s own files at a known commit:** {storage}, read by "
            f"hf-flag {version}; hf-flag did not compare these weights with that repository's, so the numbers "
            f"describe this copy.")


def published_values(report: Report, metrics: Optional[Sequence[str]] = None
                     ) -> dict[str, tuple[float, Optional[float], int]]:
    """Headline key -> ``(value, baseline, pairs)`` as the card reads it (:func:`readings.read_metric`: means over
    the pairs where the value reads); keys read on no pair (kappa where it does not read as alignment, an
    uninformative range overlap) are left out."""
    out = {}
    for key in headline_metrics(report, metrics):
        reading = readings.read_metric(report, key)
        if reading.verdict not in UNREAD_VERDICTS:
            out[key] = (reading.value, reading.baseline, reading.pairs)
    return out


def eval_results(report: Report, metrics: Optional[Sequence[str]] = None) -> list[EvalResult]:
    """Headline scalars (and their baselines) as ``EvalResult`` s, marked with hf-flag as their source: the card's
    values (:func:`published_values`), so a value the rows say cannot be read (kappa of pairs where it does not
    read as alignment) is left out of the model-index and a partly read one is its mean over the pairs read."""
    sha = provenance(report).get("sha")
    out = []
    for key, (value, base, _) in published_values(report, metrics).items():
        base_key = key + BASELINE_SUFFIX
        for k, v in ((key, value), (base_key, base)) if base is not None else ((key, value),):
            out.append(EvalResult(task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=DATASET_TYPE,
                                  dataset_name=DATASET_NAME, dataset_revision=sha, metric_type=k,
                                  metric_value=_round(v),
                                  metric_name=metric_label(k.removesuffix(BASELINE_SUFFIX))
                                  + (" (random baseline)" if k == base_key else ""),
                                  source_name=SOURCE_NAME, source_url=DOCS_URL))
    return out


def number_line(reading: readings.Reading) -> str:
    """``"- MLP: 0.31 vs random 0.05 (6 pairs in 6 layers; sd 0.02, 0.28 to 0.34; z = 30): above random."``;
    a value read on some pairs only says so first (``"kappa reads in 20 of 29 pairs: ..."``) and why not on the
    others last."""
    kind = reading.key.partition("/")[0]
    metric = reading.key.partition("/")[2]
    text = f"- {KIND_LABELS.get(kind, kind)}: "
    if reading.unread:
        what = "kappa" if metric == "commutator_ratio" else DEFINITIONS.get(metric, (metric,))[0].lower()
        text += f"{what} reads in {reading.pairs} of {reading.of} pairs: "
    text += _fmt(reading.value)
    text += f" vs random {_fmt(reading.baseline)}" if reading.baseline is not None else " (no random baseline)"
    spread = reading.spread
    n = len(reading.layers)
    detail = [f"{reading.pairs} pair{'s' if reading.pairs != 1 else ''} in {n} layer{'s' if n != 1 else ''}"]
    if spread is not None:
        detail.append(f"sd {_fmt(spread[0])}, {_fmt(spread[1])} to {_fmt(spread[2])}")
    if reading.z is not None and reading.verdict not in UNREAD_VERDICTS:
        detail.append(f"z = {_fmt(reading.z)}" if math.isfinite(reading.z) else "the same difference in every layer")
    text += f" ({'; '.join(detail)})"
    verdict = VERDICT_TEXT.get(reading.verdict) or f"{reading.verdict}: {reading.why}"
    return f"{text}: {verdict}." + (f" Not read on the others: {reading.unread}." if reading.unread else "")


def render_section(report: Report, *, model_name: Optional[str] = None, plots: Optional[Mapping[str, str]] = None,
                   metrics: Optional[Sequence[str]] = None, nl: str = "\n") -> str:
    """The Markdown section, markers included. ``plots``: caption -> link (relative to the card)."""
    name = card_model_name(report, model_name)
    lines = [SECTION_START, "## Weight geometry (hf-flag)", "", provenance_sentence(report, name), "",
             f"**How to read these numbers.** Each value is a mean over the pairs (of weights or of heads) where it "
             f"reads, with their number and the number of layers they lie in, shown beside the mean of their random "
             f"baselines (what weights of the same shapes and spectra give in random relative orientation) and the "
             f"spread of its per-layer means (standard deviation, lowest to highest layer). A value is called above "
             f"or below random only when, over at least {readings.MIN_LAYERS} layers, the per-layer differences from "
             f"the "
             f"baseline have a mean at least {readings.Z_THRESHOLD:g} standard errors from zero (z = mean difference "
             f"/ (sd / sqrt(layers)), |z| >= {readings.Z_THRESHOLD:g}); otherwise the card says it is not "
             f"distinguishable from random. Layers are not independent samples, so this is a reading rule, not a "
             f"significance test.", ""]
    keys = headline_metrics(report, metrics)
    by_metric: dict[str, list[str]] = {}
    for key in keys:
        by_metric.setdefault(key.partition("/")[2], []).append(key)
    for metric, group in by_metric.items():
        title, paragraph, anchor = DEFINITIONS.get(metric, (metric.replace("_", " "), "", ""))
        link = f" [Definition]({MATH_URL}#{anchor})." if anchor else ""
        lines += [f"### {title}", "", paragraph + link, ""]
        lines += [number_line(readings.read_metric(report, k)) for k in group]
        lines.append("")
    if not keys:
        lines += ["No headline metric was computed for this model.", ""]
    for caption, link in (plots or {}).items():
        lines += [f"![{caption}]({link})", ""]
    left_out = readings.intersection_at_baseline(report) if plots else ""
    if left_out:  # the plots leave it out too (hf_flag.harness.plots.save_plots)
        lines += [f"The intersection-dimension plot is left out: {left_out}.", ""]
    lines += [f"Architecture `{report.architecture}`; {len(report.rows)} rows of kinds "
              f"{', '.join(report.kinds()) or 'none'}; the full per-layer values are in hf-flag's report and "
              f"dataset. [About hf-flag]({DOCS_URL}).",
              SECTION_END]
    return nl.join(lines) + nl


def render_yaml_key(report: Report, metrics: Optional[Sequence[str]] = None, nl: str = "\n") -> str:
    """Our top-level YAML key ``hf_flag:``: version, provenance, the headline scalars the card reads with their
    baselines (:func:`published_values`: a value read on no pair is left out) and the number of pairs each is a
    mean over (``pairs``)."""
    from hf_flag import __version__

    values, pairs = {}, {}
    for key, (value, base, n) in published_values(report, metrics).items():
        values[key] = _round(value)
        if base is not None:
            values[key + BASELINE_SUFFIX] = _round(base)
        pairs[key] = n
    prov = provenance(report)
    source = {k: prov[k] for k in ("source", "repo_id", "revision", "sha", "hub_name", "format") if prov.get(k)}
    source["storage_dtypes"] = list(report.params.get("storage_dtypes") or [])
    payload = {YAML_KEY: {"version": report.params.get("hf_flag_version") or __version__,
                          "architecture": report.architecture, "weights": source, "metrics": values,
                          "pairs": pairs}}
    text = yaml.safe_dump(payload, sort_keys=False, default_flow_style=False, allow_unicode=True, width=10_000)
    return text.replace("\n", nl)


def is_ours(result: object) -> bool:
    """Whether a model-index result (a dict) was written by hf-flag (its source, or the 0.1.0 dataset type)."""
    if not isinstance(result, dict):
        return False
    source = result.get("source") if isinstance(result.get("source"), dict) else {}
    dataset = result.get("dataset") if isinstance(result.get("dataset"), dict) else {}
    return source.get("name") == SOURCE_NAME or dataset.get("type") == DATASET_TYPE


def merged_model_index(existing: Optional[list], model_name: str, ours: list[EvalResult]) -> Optional[list]:
    """``existing`` model-index without hf-flag's results, with ``ours`` added to its first entry (under the user's
    name); entries that held only hf-flag results are dropped.  ``None`` when nothing is left."""
    entries = []
    for entry in copy.deepcopy(existing or []):
        results = entry.get("results") or []
        kept = [r for r in results if not is_ours(r)]
        if results and not kept:
            continue  # an entry hf-flag made
        entry["results"] = kept
        entries.append(entry)
    if ours:
        ours_dicts = eval_results_to_model_index(model_name, ours)
        if entries:
            entries[0]["results"] = entries[0]["results"] + ours_dicts[0]["results"]
        else:
            entries = ours_dicts
    return entries or None


# ---------------------------------------------------------------------------------------------------------------
# textual editing


def _split_front_matter(text: str) -> tuple[str, Optional[list[str]], str, str]:
    """``(prefix, yaml_lines, closing, body)``; ``yaml_lines`` is None when there is no front matter.

    ``prefix`` is a byte-order mark and the opening ``---`` line; lines keep their line endings.
    """
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    rest = text[len(bom):]
    lines = rest.splitlines(keepends=True)
    if not lines or lines[0].rstrip("\r\n").rstrip() != "---":
        return bom, None, "", rest
    for i in range(1, len(lines)):
        if lines[i].rstrip("\r\n").rstrip() == "---":
            return bom + lines[0], lines[1:i], lines[i], "".join(lines[i + 1:])
    return bom, None, "", rest  # an unterminated '---' is text, not front matter


def _line_ending(text: str) -> str:
    match = re.search(r"\r\n|\n|\r", text)
    return match.group(0) if match else "\n"


def _is_top_key(line: str, key: str) -> bool:
    return re.match(rf"{re.escape(key)}\s*:(\s|$)", line) is not None


def _top_block(lines: list[str], key: str) -> Optional[tuple[int, int]]:
    """``(start, end)`` of the top-level ``key:`` and its block: indented lines, ``- `` items at column 0, blanks
    and comments in between; trailing blank and column-0 comment lines belong to whatever follows."""
    start = next((i for i, line in enumerate(lines) if _is_top_key(line, key)), None)
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and (lines[end][:1] in (" ", "\t", "-", "#") or not lines[end].strip()):
        if lines[end].startswith(("---", "...")):
            break
        end += 1
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1
    return start, end


def _set_top_key(lines: list[str], key: str, block: str) -> list[str]:
    """Replace (or append) the top-level ``key`` with ``block`` (full text of the key, ending in a newline)."""
    span = _top_block(lines, key)
    new = block.splitlines(keepends=True)
    if span is None:
        return _append(lines, new)
    return lines[:span[0]] + new + lines[span[1]:]


def _append(lines: list[str], new: list[str]) -> list[str]:
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines = lines[:-1] + [lines[-1] + _line_ending("".join(new))]
    return lines + new


def _drop_legacy_entry(lines: list[str]) -> list[str]:
    """``lines`` without hf-flag 0.1.0's comment-marked model-index entry (markers included), if there is one."""
    stripped = [line.strip() for line in lines]
    if LEGACY_INDEX_START not in stripped:
        return lines
    a = stripped.index(LEGACY_INDEX_START)
    if LEGACY_INDEX_END not in stripped[a:]:
        raise CardFormatError(f"card YAML: '{LEGACY_INDEX_START}' without '{LEGACY_INDEX_END}'; delete the broken "
                              "entry")
    b = a + stripped[a:].index(LEGACY_INDEX_END) + 1
    return lines[:a] + lines[b:]


def _set_model_index(lines: list[str], model_name: str, ours: list[EvalResult], nl: str) -> list[str]:
    """The front matter ``lines`` with hf-flag's model-index results replaced by ``ours`` (see the module
    docstring); the block's bytes are kept when its content does not change."""
    lines = _drop_legacy_entry(lines)
    span = _top_block(lines, "model-index")
    existing = None
    if span is not None:
        inline = lines[span[0]].split(":", 1)[1].split("#", 1)[0].strip()
        if inline:
            raise CardFormatError(f"card YAML: 'model-index: {inline[:30]}' is inline; write it as a block list "
                                  "('model-index:' then '- name: ...' lines) so hf-flag can add its results")
        try:
            existing = yaml.safe_load("".join(lines[span[0]:span[1]])).get("model-index")
        except (yaml.YAMLError, AttributeError) as exc:
            raise CardFormatError(f"card YAML: the model-index block does not parse ({str(exc).splitlines()[0]}); "
                                  "repair it") from None
        if existing is not None and not (isinstance(existing, list) and all(isinstance(e, dict) for e in existing)):
            raise CardFormatError("card YAML: model-index is not a list of entries ('- name: ...'); repair it")
    merged = merged_model_index(existing, model_name, ours)
    if merged == existing:
        return lines
    block = [] if merged is None else yaml.safe_dump({"model-index": merged}, sort_keys=False, allow_unicode=True,
                                                     width=10_000).replace("\n", nl).splitlines(keepends=True)
    if span is None:
        return _append(lines, block)
    return lines[:span[0]] + block + lines[span[1]:]


def _set_section(body: str, section: str, nl: str) -> str:
    a = body.find(SECTION_START)
    if a >= 0:
        b = body.find(SECTION_END, a)
        if b < 0:
            raise CardFormatError(f"card text: '{SECTION_START}' without '{SECTION_END}'; restore or delete it")
        b += len(SECTION_END)
        if body.startswith(nl, b):
            b += len(nl)
        return body[:a] + section + body[b:]
    if not body:
        return section
    sep = "" if body.endswith(nl + nl) else nl if body.endswith(nl) else nl + nl
    return body + sep + section


def update_card_text(text: str, report: Report, *, model_name: Optional[str] = None,
                     plots: Optional[Mapping[str, str]] = None, metrics: Optional[Sequence[str]] = None) -> str:
    """The card ``text`` with hf-flag's section, YAML key and model-index results set to ``report``'s.

    Idempotent; every byte outside the owned parts is preserved (see the module docstring).  Raises
    :class:`CardFormatError` when the card cannot be edited safely, and checks that the result parses and that
    huggingface_hub reads its model-index.
    """
    nl = _line_ending(text)
    name = card_model_name(report, model_name)
    prefix, yaml_lines, closing, body = _split_front_matter(text)
    if yaml_lines is None:
        prefix, yaml_lines, closing = prefix + "---" + nl, [], "---" + nl
    elif not closing.endswith(("\n", "\r")):  # '---' as the card's last line, without a line ending
        closing += nl
    yaml_lines = _set_top_key(yaml_lines, YAML_KEY, render_yaml_key(report, metrics, nl))
    yaml_lines = _set_model_index(yaml_lines, name, eval_results(report, metrics), nl)
    section = render_section(report, model_name=name, plots=plots, metrics=metrics, nl=nl)
    result = prefix + "".join(yaml_lines) + closing + _set_section(body, section, nl)
    _check_card(result)
    return result


def _check_card(text: str) -> None:
    _, yaml_lines, _, _ = _split_front_matter(text)
    try:
        data = yaml.safe_load("".join(yaml_lines or []))
    except yaml.YAMLError as exc:
        raise CardFormatError(f"card YAML would not parse after hf-flag's edit ({str(exc).splitlines()[0]}); "
                              "check the front matter's indentation") from None
    if not isinstance(data, dict) or YAML_KEY not in data:
        raise CardFormatError("card YAML is not a mapping after hf-flag's edit; check the front matter")
    if data.get("model-index"):
        model_index_to_eval_results(data["model-index"])


def minimal_card(model_name: str) -> str:
    """A small card for a model that has none: name, a note, and a front matter hf-flag then fills."""
    data = ModelCardData(model_name=model_name)
    return (f"---\n{data.to_yaml()}\n---\n\n# {model_name}\n\n"
            "This model had no model card; this one holds hf-flag's weight-geometry reading only.\n")


# ---------------------------------------------------------------------------------------------------------------
# files and the Hub


def read_card(path: str | os.PathLike) -> str:
    """A card file's text exactly as stored (line endings kept)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def write_card(path: str | os.PathLike, report: Report, *, base: Optional[str] = None,
               model_name: Optional[str] = None, plots: Optional[Mapping[str, str]] = None,
               metrics: Optional[Sequence[str]] = None) -> str:
    """Write ``path`` atomically: ``base`` (a card's text; default: the file at ``path`` if it exists, else a minimal
    card) updated with ``report``. Keeps the file's permission bits. Returns the text written."""
    from hf_flag.atomic import atomic_write_text

    path = Path(path)
    name = card_model_name(report, model_name)
    if base is None:
        base = read_card(path) if path.is_file() else minimal_card(name)
    text = update_card_text(base, report, model_name=name, plots=plots, metrics=metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    if not path.exists() or read_card(path) != text:
        atomic_write_text(path, text, mode=mode)
    return text


def card_diff(old: str, new: str, name: str = "README.md") -> str:
    """Unified diff of a card (what ``--dry-run`` prints)."""
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))


def remote_card(repo_id: str, *, repo_type: str = "model") -> Optional[str]:
    """The repo's README.md exactly as stored, or ``None`` when it has none or the repo does not exist (to the
    token: the Hub answers a private repo the token cannot read the same way).  Any other failure (gated repo, Hub
    error, unreachable Hub) raises huggingface_hub's own error (an ``OSError``) or the HTTP client's transport
    error, never the ``ValueError`` a forced download wraps it in."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    from hf_flag.weights.hub import offline

    try:
        # online: the card as stored now, never a stale cached copy; offline (HF_HUB_OFFLINE): the cached copy
        path = hf_hub_download(repo_id, "README.md", repo_type=repo_type, force_download=not offline())
    except EntryNotFoundError:
        return None
    except (RepositoryNotFoundError, ValueError) as exc:  # ValueError "Force download failed": its cause failed
        cause = exc.__cause__ if isinstance(exc, ValueError) else exc
        if isinstance(cause, RepositoryNotFoundError) and not isinstance(cause, GatedRepoError):
            return None
        if cause is None or cause is exc:
            raise
        raise cause from None
    return read_card(path)


def push_card(repo_id: str, report: Report, *, plots: Optional[Mapping[str, Path]] = None,
              metrics: Optional[Sequence[str]] = None, create_pr: bool = False, dry_run: bool = False,
              allow_derived: bool = False) -> tuple[str, str]:
    """Set hf-flag's parts of model repo ``repo_id``'s card, with its plots in ``hf-flag-plots/`` beside it.

    A commit on the default branch when the token can write there, else (HTTP 403) or with ``create_pr`` a pull
    request; a repo that does not exist yet is created first (``create_repo(exist_ok=True)``, under the token's
    account or organisation, public or private by the Hub's default); ``dry_run`` pushes nothing.  Returns
    ``(kind, text)``: ``("commit", url)``, ``("pr", url)`` or ``("dry-run", unified diff)``.  Raises
    :class:`DerivedWeightsError` (one line) when the report was not computed from the repo's own weights
    (:func:`is_derived`) and ``allow_derived`` is not set.  The token is huggingface_hub's (``HF_TOKEN`` or the
    stored login); it passes through no hf-flag code.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if is_derived(report, repo_id) and not allow_derived:
        raise DerivedWeightsError(
            f"the card for {repo_id!r} was computed from weights hf-flag did not verify as its own "
            f"({storage_text(report)}, "
            f"{provenance(report).get('source', 'unknown source')}), not from the repo's own weights; analyse the "
            f"Hub id {repo_id} itself, or pass --allow-derived to push it anyway (its first sentence says so)")
    plots = dict(plots or {})
    links = {caption: f"{PLOTS_FOLDER}/{Path(png).name}" for caption, png in plots.items()}
    base = remote_card(repo_id)
    old = base if base is not None else ""
    new = update_card_text(base if base is not None else minimal_card(repo_id), report, model_name=repo_id,
                           plots=links, metrics=metrics)
    if dry_run:
        files = "".join(f"+ {link}\n" for link in links.values())
        return "dry-run", card_diff(old, new) + files
    operations = [CommitOperationAdd("README.md", new.encode("utf-8"))]
    operations += [CommitOperationAdd(links[c], Path(png).read_bytes()) for c, png in plots.items()]
    message = "hf-flag: weight-geometry section of the model card"
    description = ("Written by hf-flag; only the section between the hf-flag markers, the hf_flag YAML key, "
                   "hf-flag's model-index results and the plots in hf-flag-plots/ change.")
    api = HfApi()
    if base is None:  # a new repo (the token's own, as huggingface_hub creates it); an existing one is left as is
        api.create_repo(repo_id, exist_ok=True)
    if not create_pr:
        try:
            info = api.create_commit(repo_id, operations, commit_message=message, commit_description=description)
            return "commit", str(info.commit_url)
        except HfHubHTTPError as exc:
            if getattr(exc.response, "status_code", None) != 403:
                raise
    info = api.create_commit(repo_id, operations, commit_message=message, commit_description=description,
                             create_pr=True)
    return "pr", str(info.pr_url)


def push_dataset(repo_id: str, parquet: Path, readme: str) -> str:
    """Upload the results dataset (one parquet file and its card) to dataset repo ``repo_id`` (created, private
    to the token's owner by the Hub's default, when absent) in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    info = api.create_commit(repo_id, [CommitOperationAdd("README.md", readme.encode("utf-8")),
                                       CommitOperationAdd("data/train-00000-of-00001.parquet", parquet.read_bytes())],
                             repo_type="dataset", commit_message="hf-flag: weight-geometry results")
    return str(info.commit_url)
