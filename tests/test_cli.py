"""``hf-flag`` command line: summary table, JSON / parquet outputs, one-line user errors with exit code 2."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from hf_flag import cli
from hf_flag.defaults import default_model_paths, model_slug
from hf_flag.report import Report, Row
from hf_flag.rows import format_value, summarize


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("hf-flag: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_table_json_and_outputs(tiny_checkpoint, tmp_path, capsys):
    # --full: range_overlap needs whole ranges (the default report's windows leave it None, issue #11)
    code, out, err = run(["analyze", str(tiny_checkpoint), "--composition", "adjacent", "--full", "--out",
                          str(tmp_path)], capsys)
    assert code == 0, err
    assert "commutator_ratio" in out and "baseline" in out and "composition_q" in out and "head_overlap_o" in out
    folder = tmp_path / model_slug(str(tiny_checkpoint))
    report = Report.from_json((folder / "report.json").read_text())
    assert report.architecture == "llama" and report.params["composition"] == "adjacent"
    # kappa of the tiny Llama's MLP does not read as alignment (both ranks below n, MATH.md §3): marked, no number
    mlp_line = next(line for line in out.splitlines() if line.split()[:1] == ["mlp"])
    n_mlp = len(report.select(kind="mlp"))
    assert mlp_line.split()[2:] == ["commutator_ratio", "not", "read", "-", "0", "of", str(n_mlp)]
    assert f"  mlp/commutator_ratio: kappa does not read as alignment on {n_mlp} of {n_mlp} pairs" in out
    # the low-rank companion of kappa (MATH.md §3) is shown beside its baseline, over every row
    overlap_line = next(line for line in out.splitlines() if line.split()[:1] == ["range_overlap"])
    assert overlap_line.split()[1:] == [format_value(report.summary["mlp/range_overlap"]),
                                        format_value(report.summary["mlp/range_overlap_baseline"]), str(n_mlp)]
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "rows.parquet")
    assert table.num_rows == len(report.rows) and "commutator_ratio" in table.column_names
    # a second run overwrites its own outputs
    assert run(["analyze", str(tiny_checkpoint), "--cheap", "--out", str(tmp_path)], capsys)[0] == 0
    assert Report.from_json((folder / "report.json").read_text()).params["cheap"] is True


def test_json_output_and_options(tiny_checkpoint, capsys):
    code, out, err = run(["analyze", str(tiny_checkpoint), "--json", "--layers", "1", "--diagnostics", "mlp,vo",
                          "--dtype", "float32"], capsys)
    assert code == 0, err
    report = Report.from_json(out)
    assert {r.layer for r in report.rows} == {1} and set(report.kinds()) == {"mlp", "mlp_gate", "vo"}
    assert report.params["dtype"] == "float32" and report.params["device"] in ("cpu", "cuda")


def no_analysis(monkeypatch):
    """Make any call of ``analyze`` fail the test: the CLI must refuse before analysing."""
    def boom(*args, **kwargs):
        raise AssertionError("analyze ran although the command line had to refuse first")

    monkeypatch.setattr(cli, "analyze", boom)


def test_refuses_to_overwrite_foreign_files(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    folder = tmp_path / model_slug(str(tiny_checkpoint))
    folder.mkdir()
    (folder / "report.json").write_text("my notes")
    code, _, err = run(["analyze", str(tiny_checkpoint), "--cheap", "--out", str(tmp_path)], capsys)
    assert_user_error(code, err, "not written by hf-flag")
    assert (folder / "report.json").read_text() == "my notes" and not (folder / "rows.parquet").exists()
    no_analysis(monkeypatch)  # ... and it refuses before analysing
    code, _, err = run(["analyze", str(tiny_checkpoint), "--cheap", "--out", str(tmp_path)], capsys)
    assert_user_error(code, err, "not written by hf-flag", str(folder / "report.json"))


def test_out_that_cannot_be_made_is_refused_before_analysing(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    no_analysis(monkeypatch)
    (tmp_path / "notes").write_text("mine")
    code, _, err = run(["analyze", str(tiny_checkpoint), "--out", str(tmp_path / "notes" / "out")], capsys)
    assert_user_error(code, err, "--out", str(tmp_path / "notes" / "out"), "cannot be written")
    assert (tmp_path / "notes").read_text() == "mine"


def test_out_is_a_file_or_shared_by_two_models(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    no_analysis(monkeypatch)
    (tmp_path / "notes").write_text("mine")
    code, _, err = run(["analyze", str(tiny_checkpoint), "--out", str(tmp_path / "notes")], capsys)
    assert_user_error(code, err, "--out", "notes", "is a file")
    assert (tmp_path / "notes").read_text() == "mine"
    # two models with one slug would overwrite each other's outputs: refused, nothing written
    other = tmp_path / "elsewhere" / tiny_checkpoint.name
    code, _, err = run(["analyze", str(tiny_checkpoint), str(other), "--out", str(tmp_path / "out")], capsys)
    assert_user_error(code, err, "both write", str(other))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needles", [
    (["--layers", "3-1"], ("--layers", "descending", "1-3")),
    (["--layers", "0,x"], ("--layers", "'x'")),
    (["--dtype", "float16"], ("--dtype", "float16")),
    (["--bogus"], ("--bogus",)),
    (["--device", "gpu"], ("device='gpu'",)),
])
def test_bad_arguments_one_line_exit_2(tiny_checkpoint, capsys, argv, needles):
    code, out, err = run(["analyze", str(tiny_checkpoint), "--cheap", *argv], capsys)
    assert_user_error(code, err, *needles)
    assert "usage:" not in err and out == ""


def test_no_subcommand(capsys):
    code, _, err = run([], capsys)
    assert_user_error(code, err, "command")


def test_parse_layers():
    assert cli.parse_layers("0,1,5-7") == [0, 1, 5, 6, 7]
    assert cli.parse_layers("3, 2") == [2, 3]
    for bad in ("a", "3-1", "1,,2"):
        with pytest.raises(ValueError):
            cli.parse_layers(bad)


def test_model_slug():
    assert model_slug("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct.q4_1"
    assert model_slug("org/My Model/") == "my-model"


def test_missing_path(tmp_path, capsys):
    code, _, err = run(["analyze", str(tmp_path / "nope")], capsys)
    assert_user_error(code, err, "nope")


def test_folder_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run(["analyze", str(tmp_path)], capsys)
    assert_user_error(code, err)


def test_unsupported_architecture(tmp_path, capsys):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    save_file({"backbone.layers.0.mixer.in_proj.weight": torch.zeros(4, 8)}, str(tmp_path / "model.safetensors"))
    code, _, err = run(["analyze", str(tmp_path)], capsys)
    assert_user_error(code, err, "mamba")


def test_corrupted_safetensors(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = run(["analyze", str(tmp_path)], capsys)
    assert_user_error(code, err)


def test_truncated_safetensors(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(["analyze", str(tmp_path)], capsys)
    assert_user_error(code, err)


def test_no_model_given(capsys):
    code, _, err = run(["analyze"], capsys)
    assert_user_error(code, err, "MODEL")


def test_dispatch_passes_argv_and_reports_missing_module(monkeypatch, capsys):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    fake = types.ModuleType("fake_sweep")
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "fake_sweep", fake)
    monkeypatch.setitem(cli.DISPATCH, "sweep", ("fake_sweep", "main"))
    assert run(["sweep", "--models", "a", "b"], capsys)[0] == 0
    assert seen["argv"] == ["--models", "a", "b"]
    monkeypatch.setitem(cli.DISPATCH, "reproduce", ("hf_flag_no_such_module.reproduce", "main"))
    code, _, err = run(["reproduce", "all"], capsys)
    assert_user_error(code, err, "reproduce")


@pytest.mark.pretrained
def test_default_models_exist(minilm_path, smollm2_gguf):
    models = default_model_paths()
    assert [Path(m) for m in models] == [minilm_path, smollm2_gguf]


def test_nan_weights_exit_2_naming_tensor_and_layer(tmp_path, capsys):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(seed=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 1] = float("inf")
    model.save_pretrained(tmp_path, safe_serialization=True)
    code, _, err = run(["analyze", str(tmp_path), "--cheap"], capsys)
    assert_user_error(code, err, "layer 0", "model.layers.0.mlp.down_proj.weight")


def test_table_means_over_the_rows_where_each_value_reads_with_their_count():
    """Review s5 items 4, 8: each mean carries its count n; kappa is the mean over the rows where it reads (marked
    "not read" where none does), an uninformative range overlap is marked, a value present on 2 of 30 rows says 2."""
    rows = [Row("m", "residual", i, i + 1, "a", "b",
                {"commutator_ratio": [0.02, 0.5, 0.04, 0.06][i], "commutator_ratio_baseline": 0.03,
                 "range_overlap": None if i != 1 else 0.998, "range_overlap_baseline": None if i != 1 else 0.997,
                 "subspace_score": 0.25 if i < 2 else None, "subspace_score_baseline": 0.125 if i < 2 else None},
                {"commutator_reading_holds": i != 1}) for i in range(4)]
    rows += [Row("m", "mlp", i, i, "a", "b", {"commutator_ratio": 0.07, "commutator_ratio_baseline": 0.03},
                 {"commutator_reading_holds": False}) for i in range(3)]
    report = Report("m", "llama", rows=rows, summary=summarize(rows))
    lines = {tuple(line.split()[:3]): line.split() for line in cli.format_table(report).splitlines()}
    assert lines[("residual", "4", "commutator_ratio")][3:] == ["0.04", "0.03", "3", "of", "4"]  # not 0.155
    assert lines[("range_overlap", "uninformative", "-")][3:] == ["0", "of", "1"]
    assert lines[("subspace_score", "0.25", "0.125")][3:] == ["2"]
    assert lines[("mlp", "3", "commutator_ratio")][3:] == ["not", "read", "-", "0", "of", "3"]
    table = cli.format_table(report)
    assert "  residual/commutator_ratio: kappa does not read as alignment on 1 of 4 pairs" in table
    assert "  residual/range_overlap: on 1 of 1 pairs the larger range fills at least 99% of the hidden space" in table


def test_analyze_hands_the_collector_back(tmp_path):
    """``hf-flag analyze`` freezes the imports' objects while it runs and unfreezes after, so a long-lived caller of
    ``main`` (tests, notebooks) keeps a normal collector (an order-dependent failure of a sweep test found it)."""
    import gc

    from hf_flag import cli as cli_module

    assert gc.get_freeze_count() == 0
    assert cli_module.main(["analyze", str(tmp_path / "missing")]) == 2
    assert gc.get_freeze_count() == 0
