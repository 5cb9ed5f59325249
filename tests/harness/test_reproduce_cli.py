"""Where ``hf-flag reproduce`` writes (issue #15 item 5): a new folder by default, never the committed docs/; an
existing report is replaced only with --overwrite (the maintainer's command), refused before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_flag.harness.experiments import reproduce, writer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_experiments(monkeypatch):
    """The claims' experiments replaced by nothing (they are tested in test_reproduce.py); records the calls."""
    calls: list[dict] = []

    def run_claims(keys, **kwargs):
        calls.append({"keys": list(keys), **kwargs})
        return []
    monkeypatch.setattr(reproduce, "run_claims", run_claims)
    return calls


def test_default_out_is_a_new_folder_not_docs(tmp_path, monkeypatch, no_experiments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    assert reproduce.main(["--quick"]) == 0
    assert (tmp_path / "hf-flag-reproduction" / writer.REPORT_NAME).is_file()
    assert list((tmp_path / "docs").iterdir()) == []
    assert json.loads((tmp_path / "hf-flag-reproduction" / writer.DATA_NAME).read_text())["meta"]["quick"] is True


def test_existing_report_needs_overwrite(tmp_path, no_experiments, capsys):
    assert reproduce.main(["--quick", "--out", str(tmp_path)]) == 0
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert reproduce.main(["--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files  # nothing overwritten
    assert len(no_experiments) == 1  # refused before any work
    assert reproduce.main(["--quick", "--out", str(tmp_path), "--overwrite"]) == 0
    assert len(no_experiments) == 2


def test_committed_docs_are_refused_without_overwrite(tmp_path, no_experiments, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    committed = (REPO / "docs" / writer.REPORT_NAME).read_text()
    assert writer.MARKER in committed  # the committed report is a generated one: only --overwrite replaces it
    (docs / writer.REPORT_NAME).write_text(committed)
    assert reproduce.main(["--quick", "--out", str(docs)]) == 2
    assert (docs / writer.REPORT_NAME).read_text() == committed and no_experiments == []
