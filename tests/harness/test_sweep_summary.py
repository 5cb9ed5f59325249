"""The table ``hf-flag sweep`` prints at the end (issue #15 item 10): one line per model, its status and each
headline value beside its random baseline and the rows it is a mean over, as ``hf-flag analyze`` prints one per
model; summary.csv / summary.md say the same (review s5 items 4, 8, 13)."""
from __future__ import annotations

import csv
import io
import re

from hf_flag.harness import sweep
from hf_flag.integrations.readings import select_read
from hf_flag.report import Report
from hf_flag.rows import format_value


def test_sweep_prints_a_summary_table(tiny_models, tmp_path, capsys):
    models = [str(tiny_models["gpt2"]), str(tiny_models["broken"])]
    code = sweep.main([*models, "--out", str(tmp_path / "out"), "--composition", "none"])
    out = capsys.readouterr().out
    assert code == 3  # the broken model failed; the table still lists it
    caption, header, good, bad = out.strip().splitlines()[-4:]
    assert caption.startswith("headline means per model")
    assert header.split()[:2] == ["model", "status"] and "mlp/commutator_ratio" in header.split()
    report = Report.from_json(next((tmp_path / "out").rglob("report.json")).read_text())
    # the tiny GPT-2's MLP kappa does not read as alignment (ranks below n): marked, not shown
    assert select_read(report, "mlp/commutator_ratio").n == 0
    n_mlp = len(report.select(kind="mlp"))
    assert good[header.index("mlp/commutator_ratio"):].startswith(f"not read (n=0 of {n_mlp})  ")
    for metric in ("vo/commutator_ratio", "head_overlap_o/overlap"):
        column = header.index(metric)  # fixed-width columns: the value starts under its header
        n = len(report.select(kind=metric.split("/")[0]))
        cell = (f"{format_value(report.summary[metric])} ({format_value(report.summary[metric + '_baseline'])}) "
                f"n={n}")
        assert good[column:].startswith(cell), (metric, good)
    assert re.match(rf"{re.escape(models[0])}\s+done\s", good)
    assert re.match(rf"{re.escape(models[1])}\s+failed\s+-(\s+-)*$", bad)
    summary = list(csv.DictReader(io.StringIO((tmp_path / "out" / "summary.csv").read_text())))
    gpt2 = next(r for r in summary if r["status"] == "done")
    assert (gpt2["mlp/commutator_ratio"], gpt2["mlp/commutator_ratio_n"]) == ("", "0")
    assert "mlp/commutator_ratio: not read" in gpt2["notes"]
    assert float(gpt2["vo/commutator_ratio"]) == report.summary["vo/commutator_ratio"]
    assert int(gpt2["vo/commutator_ratio_n"]) == len(report.select(kind="vo"))


def markdown_cells(md: str) -> list[list[str]]:
    """Each line of a Markdown table as its cells (the pipes at both ends required)."""
    lines = md.strip("\n").split("\n")
    assert all(line.startswith("| ") or line.startswith("|-") for line in lines), md
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_summary_md_is_a_well_formed_table_when_no_model_has_metrics(tmp_path):
    """Review s5 item 13: a sweep whose only model failed wrote a header of 6 cells over a delimiter of 5."""
    assert sweep.main([str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out")]) != 0
    cells = markdown_cells((tmp_path / "out" / "summary.md").read_text())
    assert cells[0] == ["model", "status", "weights", "architecture", "rows"]
    assert cells[1] == ["---"] * 5 and len(cells) == 3 and len(cells[2]) == 5
    assert cells[2][1].startswith("failed")
