"""``hf-flag sweep --out DIR`` replaces only what it wrote (review s5 item 1): a ``summary.*`` or ``dataset/`` in
``DIR`` without hf-flag's ``sweep.json`` stops the sweep before any work (exit 2, one line, nothing touched), and
the dataset and summaries of a folder shared by several sweeps cover every model finished in it."""
from __future__ import annotations

import csv
import io
import json

import datasets
import pytest

from hf_flag import exits
from hf_flag.harness import sweep

ARGS = ["--diagnostics", "mlp", "--composition", "none", "--cheap"]


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("foreign, extra", [
    ("summary.csv", []), ("summary.md", []), ("dataset/notes.txt", []), ("sweep.json", []),
    ("dataset.parquet", []), ("plots/local--gpt2/commutator_ratio.png", []),
    ("model_cards/local--gpt2/README.md", []), ("model_cards/local--gpt2/hf-flag-plots/range_overlap.png", []),
    ("cards/local--gpt2/README.md", ["--cards-dir", "{out}/cards"])])
def test_files_hf_flag_did_not_write_stop_the_sweep(foreign, extra, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    (out / foreign).parent.mkdir(parents=True)
    (out / foreign).write_text("precious\n")
    before = snapshot(out)
    extra = [arg.format(out=out) for arg in extra]
    assert sweep.main([str(tiny_models["gpt2"]), "--out", str(out), *ARGS, *extra]) == exits.EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-flag")]
    named = out / "/".join(foreign.split("/")[:1 if foreign.startswith("dataset/") else 2])  # the path it replaces
    assert len(lines) == 1 and str(named) in lines[0] and "not written by hf-flag" in lines[0]
    assert "move it away or choose another --out" in lines[0]
    assert snapshot(out) == before and not (out / "runs").exists()  # refused before any work


def test_outputs_outside_the_guard_and_of_an_unfinished_sweep_are_written(tiny_models, tmp_path, capsys):
    """Another model's plots, a cards folder outside --out, and the plots a killed sweep drew before writing its
    sweep.json (its run folder is there) do not stop the sweep; hf-flag's own outputs are rewritten on reruns."""
    out, cards = tmp_path / "out", tmp_path / "cards"
    for path in (out / "plots" / "someone-else" / "a.png", out / "plots" / "local--gpt2" / "old.png",
                 cards / "local--gpt2" / "README.md"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (out / "runs" / "local--gpt2").mkdir(parents=True)  # a sweep killed after plotting, before its sweep.json
    model = str(tiny_models["gpt2"])
    assert sweep.main([model, "--out", str(out), "--cards-dir", str(cards), *ARGS]) == exits.EXIT_OK
    assert (out / "plots" / "someone-else" / "a.png").read_text() == "x"
    assert "hf-flag:start" in (cards / "local--gpt2" / "README.md").read_text()  # --cards-dir outside: not guarded
    assert sweep.main([model, "--out", str(out), *ARGS]) == exits.EXIT_OK  # its own outputs: rewritten


def test_a_folder_shared_by_sweeps_covers_every_finished_model(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    gpt2, llama, broken = (str(tiny_models[n]) for n in ("gpt2", "llama", "broken"))
    assert sweep.main([gpt2, "--out", str(out), *ARGS]) == exits.EXIT_OK
    first = datasets.load_from_disk(str(out / "dataset")).to_list()
    assert sweep.main([llama, broken, "--out", str(out), *ARGS]) == exits.EXIT_INCOMPLETE
    capsys.readouterr()
    rows = datasets.load_from_disk(str(out / "dataset")).to_list()
    alone = tmp_path / "alone"
    assert sweep.main([llama, "--out", str(alone), *ARGS]) == exits.EXIT_OK
    llama_rows = datasets.load_from_disk(str(alone / "dataset")).to_list()
    assert {r["model"] for r in first} == {gpt2}
    assert sorted(map(str, rows)) == sorted(map(str, first + llama_rows))  # both sweeps' models, each once
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert {(r["model"], r["status"]) for r in summary} == {(gpt2, "done"), (llama, "done"), (broken, "failed")}
    assert gpt2 in (out / "summary.md").read_text()
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["written_by"] == "hf-flag sweep"
    assert {m["name"]: m["status"] for m in manifest["models"]} == {gpt2: "done", llama: "done", broken: "failed"}
    assert sorted(p.name for p in (out / "model_cards").iterdir()) == ["local--gpt2", "local--llama"]


def test_a_sweep_json_with_a_bare_models_list_is_not_taken_for_hf_flags(tiny_models, tmp_path, capsys):
    """Another tool's sweep.json with a "models" key does not vouch for the outputs beside it (only hf-flag's
    marker, or an older hf-flag's list of model records whose run folders exist)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text('{"models": [{"name": "x"}]}')
    (out / "summary.csv").write_text("precious\n")
    before = snapshot(out)
    assert sweep.main([str(tiny_models["gpt2"]), "--out", str(out), *ARGS]) == exits.EXIT_USAGE
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hf-flag")][0]
    assert "not written by hf-flag" in line and snapshot(out) == before


def test_an_unreadable_report_of_another_model_is_a_failed_entry_not_a_crash(tiny_models, tmp_path, capsys):
    """A truncated runs/<other>/report.json (or one an older hf-flag wrote) in a shared folder: this sweep still
    writes its outputs; the other model is listed as failed with the file named and what to do."""
    out = tmp_path / "out"
    assert sweep.main([str(tiny_models["gpt2"]), "--out", str(out), *ARGS]) == exits.EXIT_OK
    other = out / "runs" / "old-model"
    other.mkdir()
    (other / "done.json").write_text('{"fingerprint": "x"}')
    (other / "report.json").write_text('{"model": "trunc')
    capsys.readouterr()
    assert sweep.main([str(tiny_models["llama"]), "--out", str(out), *ARGS]) == exits.EXIT_OK
    manifest = json.loads((out / "sweep.json").read_text())
    entry = [m for m in manifest["models"] if m["slug"] == "old-model"][0]
    assert entry["status"] == "failed" and str(other / "report.json") in entry["error"]
    assert "rerun that model, or delete" in entry["error"]
    assert str(tiny_models["llama"]) in (out / "summary.md").read_text()
