"""hf-flag's part of a model card: a Markdown section, one YAML key, and one model-index entry.

Ownership.  In a card (README.md) hf-flag owns exactly three things and edits them *textually*, so every other byte
of the user's card (text, YAML keys, their order, comments, quoting, line endings) is preserved, and writing the
same report twice gives the same file:

1. the Markdown between ``<!-- hf-flag:start -->`` and ``<!-- hf-flag:end -->`` (markers included; appended at the
   end of the card the first time);
2. the top-level YAML key ``hf_flag:`` (its line and its indented block; appended at the end of the front matter
   the first time; a front matter block is created when the card has none);
3. one entry of the top-level ``model-index:`` list, between the YAML comments ``# hf-flag:model-index:start`` and
   ``# hf-flag:model-index:end``.  An existing model-index is merged with, never clobbered: the user's entries stay
   byte for byte and ours is appended as a further list item (``model-index:`` is created when absent).

Model-index convention (how hf-flag's headline scalars appear as ``huggingface_hub.EvalResult`` s):
``task_type="weight-geometry"`` (``task_name="Weight geometry (hf-flag)"``; a custom task type, because these are
properties of the weights, not scores on a task), ``dataset_type="hf-flag"``, ``dataset_name="weights"``,
``metric_type`` = the report's summary key, e.g. ``"mlp/commutator_ratio"``, and its random baseline as a metric of
its own, ``"mlp/commutator_ratio_baseline"``; ``metric_name`` is a readable label.  Metrics come from
``hf_flag.rows.HEADLINE_METRICS`` (those present in the report).

The section shows the plots (relative links) and one plain-language line per headline metric, e.g. "MLP commutator
ratio 0.31 vs 0.05 random: further from a shared eigenbasis than a random orientation of the same spectra".

Integrations do no math: everything here formats an :class:`hf_flag.report.Report`.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from hf_flag import __version__
from hf_flag.report import BASELINE_SUFFIX, Report
from hf_flag.rows import HEADLINE_METRICS, KIND_LABELS

SECTION_START = "<!-- hf-flag:start -->"
SECTION_END = "<!-- hf-flag:end -->"
YAML_KEY = "hf_flag"
INDEX_START = "# hf-flag:model-index:start"
INDEX_END = "# hf-flag:model-index:end"
TASK_TYPE = "weight-geometry"
TASK_NAME = "Weight geometry (hf-flag)"
DATASET_TYPE = "hf-flag"
DATASET_NAME = "weights"
#: relative difference to the random baseline below which a value reads as "random-like"
NEAR_BASELINE = 0.1

METRIC_LABELS = {"commutator_ratio": "commutator ratio", "subspace_score": "subspace score",
                 "basis_score": "basis score", "intersection_dim": "intersection dimension", "overlap": "",
                 "score": "score"}
#: metric -> (reading above the baseline, below it, near it)
READINGS = {
    "commutator_ratio": ("further from a shared eigenbasis than a random orientation of the same spectra",
                         "closer to a shared eigenbasis than random: partial basis alignment",
                         "no closer to a shared eigenbasis than a random orientation"),
    "subspace_score": ("top singular subspaces aligned beyond chance", "top singular subspaces avoid each other",
                       "top singular subspaces in random relative position"),
    "basis_score": ("singular bases aligned beyond chance", "singular bases less aligned than random",
                    "singular bases in random relative position"),
    "intersection_dim": ("the singular flags share more directions than generic position (alignment)",
                         "the singular flags share fewer directions than generic position",
                         "generic position: no shared directions beyond chance"),
    "overlap": ("subspaces share more directions than random ones (redundancy)",
                "subspaces more separated than random ones (specialisation)",
                "indistinguishable from random subspaces"),
    "score": ("heads compose more strongly than random matrices", "heads compose less than random matrices",
              "composition at the random level"),
}


class CardFormatError(ValueError):
    """A card cannot be edited safely (e.g. a flow-style ``model-index: [...]``); the message says what to change."""


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
    """``"mlp/commutator_ratio"`` -> ``"MLP commutator ratio"``."""
    kind, _, metric = key.partition("/")
    label = METRIC_LABELS.get(metric, metric.replace("_", " "))
    return f"{KIND_LABELS.get(kind, kind.replace('_', ' '))} {label}".strip()


def reading(key: str, value: float, baseline: Optional[float]) -> str:
    """One plain-language line: value, random baseline, and what their relation means."""
    label = metric_label(key)
    if not _finite(baseline):
        return f"{label} {_fmt(value)} (no random baseline computed)"
    above, below, near = READINGS.get(key.partition("/")[2], ("above its random baseline",
                                                               "below its random baseline",
                                                               "at its random baseline"))
    rel = (value - baseline) / abs(baseline) if baseline else (math.inf if value > 0 else -math.inf if value < 0
                                                               else 0.0)
    text = above if rel > NEAR_BASELINE else below if rel < -NEAR_BASELINE else near
    return f"{label} {_fmt(value)} vs {_fmt(baseline)} random: {text}"


def eval_results(report: Report, metrics: Optional[Sequence[str]] = None) -> list[EvalResult]:
    """Headline scalars (and their baselines) as ``EvalResult`` s, with the module's documented convention."""
    out = []
    for key in headline_metrics(report, metrics):
        base_key = key + BASELINE_SUFFIX
        for k in (key, base_key) if _finite(report.summary.get(base_key)) else (key,):
            out.append(EvalResult(task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=DATASET_TYPE,
                                  dataset_name=DATASET_NAME, metric_type=k, metric_value=_round(report.summary[k]),
                                  metric_name=metric_label(k.removesuffix(BASELINE_SUFFIX))
                                  + (" (random baseline)" if k == base_key else "")))
    return out


def render_section(report: Report, *, plots: Optional[Mapping[str, str]] = None,
                   metrics: Optional[Sequence[str]] = None, nl: str = "\n") -> str:
    """The Markdown section, markers included. ``plots``: caption -> link (relative to the card)."""
    lines = [SECTION_START, "## Weight geometry (hf-flag)", "",
             f"Read from the weights alone (no forward pass) by hf-flag {__version__}: flag-variety alignment "
             "diagnostics, each next to its random baseline.", ""]
    keys = headline_metrics(report, metrics)
    lines += [f"- {reading(k, float(report.summary[k]), report.summary.get(k + BASELINE_SUFFIX))}" for k in keys]
    if not keys:
        lines.append("- No headline metric was computed for this model.")
    for caption, link in (plots or {}).items():
        lines += ["", f"![{caption}]({link})"]
    lines += ["", f"Architecture `{report.architecture}`; {len(report.rows)} rows of kinds "
                  f"{', '.join(report.kinds()) or 'none'}. Baselines: Haar-random subspaces / rotations of the same "
                  "shapes.",
              SECTION_END]
    return nl.join(lines) + nl


def render_yaml_key(report: Report, metrics: Optional[Sequence[str]] = None, nl: str = "\n") -> str:
    """Our top-level YAML key ``hf_flag:`` with the headline scalars and baselines."""
    values = {}
    for key in headline_metrics(report, metrics):
        for k in (key, key + BASELINE_SUFFIX):
            if _finite(report.summary.get(k)):
                values[k] = _round(report.summary[k])
    payload = {YAML_KEY: {"version": __version__, "architecture": report.architecture, "metrics": values}}
    text = yaml.safe_dump(payload, sort_keys=False, default_flow_style=False, allow_unicode=True, width=10_000)
    return text.replace("\n", nl)


def render_index_entry(report: Report, model_name: str, metrics: Optional[Sequence[str]] = None,
                       indent: str = "", nl: str = "\n") -> str:
    """Our model-index list item, between its marker comments, indented as the user's list items."""
    entry = eval_results_to_model_index(model_name, eval_results(report, metrics))
    body = yaml.safe_dump(entry, sort_keys=False, default_flow_style=False, allow_unicode=True, width=10_000)
    lines = [INDEX_START, *body.splitlines(), INDEX_END]
    return "".join(indent + line + nl for line in lines)


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


def _drop_index_entry(lines: list[str]) -> list[str]:
    """``lines`` without our model-index entry (markers included), if there is one."""
    stripped = [line.strip() for line in lines]
    if INDEX_START not in stripped:
        return lines
    a = stripped.index(INDEX_START)
    if INDEX_END not in stripped[a:]:
        raise CardFormatError(f"card YAML: '{INDEX_START}' without '{INDEX_END}'; delete the broken entry")
    b = a + stripped[a:].index(INDEX_END) + 1
    return lines[:a] + lines[b:]


def _merge_model_index(lines: list[str], entry_for_indent, nl: str) -> list[str]:
    """Drop our previous model-index entry and append the new one (``entry_for_indent(indent) -> str``)."""
    lines = _drop_index_entry(lines)
    span = _top_block(lines, "model-index")
    if span is None:
        return _append(lines, [f"model-index:{nl}", *entry_for_indent("").splitlines(keepends=True)])
    start, end = span
    inline = lines[start].split(":", 1)[1].split("#", 1)[0].strip()
    if inline:
        raise CardFormatError(f"card YAML: 'model-index: {inline[:30]}' is inline; write it as a block list "
                              "('model-index:' then '- name: ...' lines) so hf-flag can add its entry")
    items = [re.match(r"([ \t]*)- ", line) for line in lines[start + 1:end]]
    indent = next((m.group(1) for m in items if m), "")
    return lines[:end] + entry_for_indent(indent).splitlines(keepends=True) + lines[end:]


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
    """The card ``text`` with hf-flag's section, YAML key and model-index entry set to ``report``'s.

    Idempotent, and every byte outside the three owned parts is preserved (see the module docstring).
    Raises :class:`CardFormatError` when the card cannot be edited safely, and checks that the result parses.
    """
    nl = _line_ending(text)
    name = model_name or report.model
    prefix, yaml_lines, closing, body = _split_front_matter(text)
    if yaml_lines is None:
        prefix, yaml_lines, closing = prefix + "---" + nl, [], "---" + nl
    yaml_lines = _set_top_key(yaml_lines, YAML_KEY, render_yaml_key(report, metrics, nl))
    if eval_results(report, metrics):
        yaml_lines = _merge_model_index(
            yaml_lines, lambda indent: render_index_entry(report, name, metrics, indent, nl), nl)
    else:  # nothing to index: an entry from an earlier report would keep stale numbers
        yaml_lines = _drop_index_entry(yaml_lines)
    result = prefix + "".join(yaml_lines) + closing + _set_section(body, render_section(report, plots=plots,
                                                                                        metrics=metrics, nl=nl), nl)
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
    name = model_name or report.model
    if base is None:
        base = read_card(path) if path.is_file() else minimal_card(name)
    text = update_card_text(base, report, model_name=name, plots=plots, metrics=metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    if not path.exists() or read_card(path) != text:
        atomic_write_text(path, text, mode=mode)
    return text


class VerbatimModelCard(ModelCard):
    """A ``ModelCard`` whose ``content`` (what ``push_to_hub`` uploads) is the text it was given, byte for byte.

    ``ModelCard.content`` re-dumps the YAML front matter, which drops the user's comments and formatting.
    """

    @property
    def content(self) -> str:
        return self._content

    @content.setter
    def content(self, content: str) -> None:
        ModelCard.content.fset(self, content)


def push_card_pr(repo_id: str, report: Report, *, token: Optional[str] = None,
                 metrics: Optional[Sequence[str]] = None) -> str:
    """Open a pull request on model repo ``repo_id`` that sets hf-flag's section of its card.

    The card is the repo's README.md (a minimal one when it has none). ``token`` is passed to huggingface_hub only
    (``None``: its stored login); it is never written or logged. Plots are not uploaded (links would dangle), so
    the pushed section has none. Returns the pull request's URL.
    """
    from huggingface_hub.errors import EntryNotFoundError

    try:
        base = VerbatimModelCard.load(repo_id, token=token).content
    except EntryNotFoundError:
        base = minimal_card(repo_id)
    card = VerbatimModelCard(update_card_text(base, report, model_name=repo_id, metrics=metrics))
    return str(card.push_to_hub(repo_id, token=token, create_pr=True,
                                commit_message="Add hf-flag weight-geometry section",
                                commit_description="Written by hf-flag; only the section between the hf-flag "
                                                   "markers, the hf_flag YAML key and one model-index entry change."))
