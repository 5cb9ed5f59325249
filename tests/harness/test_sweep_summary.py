"""The table ``hf-flag sweep`` prints at the end (issue #15 item 10): one line per model, its status and each
headline value beside its random baseline, as ``hf-flag analyze`` prints one per model."""
from __future__ import annotations

import re

from hf_flag import cli
from hf_flag.harness import sweep
from hf_flag.report import Report


def test_sweep_prints_a_summary_table(tiny_models, tmp_path, capsys):
    models = [str(tiny_models["gpt2"]), str(tiny_models["broken"])]
    code = sweep.main([*models, "--out", str(tmp_path / "out"), "--composition", "none"])
    out = capsys.readouterr().out
    assert code == 3  # the broken model failed; the table still lists it
    caption, header, good, bad = out.strip().splitlines()[-4:]
    assert caption.startswith("headline means per model")
    assert header.split()[:2] == ["model", "status"] and "mlp/commutator_ratio" in header.split()
    report = Report.from_json(next((tmp_path / "out").rglob("report.json")).read_text())
    for metric in ("mlp/commutator_ratio", "vo/commutator_ratio", "head_overlap_o/overlap"):
        column = header.index(metric)  # fixed-width columns: the value starts under its header
        cell = f"{cli.format_value(report.summary[metric])} ({cli.format_value(report.summary[metric + '_baseline'])})"
        assert good[column:].startswith(cell), (metric, good)
    assert re.match(rf"{re.escape(models[0])}\s+done\s", good)
    assert re.match(rf"{re.escape(models[1])}\s+failed\s+-(\s+-)*$", bad)
