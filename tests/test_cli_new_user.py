"""What a new user meets on the command line (issue #15 items 6, 7, 10): help texts without internals, the same
--diagnostics spellings in analyze and sweep, local folders labelled by their model's name, JSON Lines, and the
summary table after a sweep (tests/harness/test_sweep_summary.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from hf_flag import cli
from hf_flag.analysis.api import analyze
from hf_flag.harness import sweep
from hf_flag.harness.config import ConfigError
from hf_flag.report import Report

INTERNALS = (":func:", ":mod:", ":class:", "``", "main(argv)", "harness.", "hf_flag.", "(argv)")


@pytest.mark.parametrize("command", [[], ["analyze"], ["sweep"], ["register"], ["reproduce"]])
def test_help_texts_have_no_internals(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: hf-flag")
    for internal in INTERNALS:
        assert internal not in text, (internal, text)


@pytest.mark.parametrize("parser", [cli.build_parser, sweep.build_parser])
def test_every_argument_has_help(parser):
    built = parser()
    actions = list(built._actions)
    if parser is cli.build_parser:  # the analyze subcommand's arguments
        sub = next(a for a in actions if a.dest == "command")
        actions = list(sub.choices["analyze"]._actions)
    missing = [a.dest for a in actions if not a.help]
    assert missing == []
    names = {a.dest for a in actions}
    assert {"models", "diagnostics", "composition"} <= names
    if parser is cli.build_parser:
        assert "dtype" in names


@pytest.mark.parametrize("spelling", [["mlp,vo"], ["mlp", "vo"], ["mlp,", "vo"], ["mlp, vo"], ["vo", "mlp", "vo"]])
def test_diagnostics_same_spellings_in_analyze_and_sweep(spelling, tiny_checkpoint, tmp_path, capsys):
    code = cli.main(["analyze", str(tiny_checkpoint), "--layers", "0", "--cheap", "--json", "--diagnostics",
                     *spelling])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert set(Report.from_json(out).kinds()) == {"mlp", "mlp_gate", "vo"}
    cfg, _ = sweep.parse_args([str(tiny_checkpoint), "--out", str(tmp_path), "--diagnostics", *spelling])
    assert set(cfg.diagnostics) == {"mlp", "vo"}


def test_unknown_diagnostic_one_line_in_both(tiny_checkpoint, tmp_path, capsys):
    code = cli.main(["analyze", str(tiny_checkpoint), "--diagnostics", "mlp,attn"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'attn'" in err and "residual" in err
    with pytest.raises(ConfigError, match="unknown diagnostic 'attn'.*commas or spaces"):
        sweep.parse_args([str(tiny_checkpoint), "--out", str(tmp_path), "--diagnostics", "mlp", "attn"])


def test_local_folder_is_labelled_by_its_own_name(tiny_checkpoint, tmp_path, capsys):
    """A local folder or file is labelled by its own name, never by its config's ``_name_or_path`` (which for a
    fine-tuned copy names its base model); ``--name`` names it."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = "me/tiny-llama"
    (folder / "config.json").write_text(json.dumps(config))
    assert cli.main(["analyze", str(folder), "--cheap"]) == 0
    assert capsys.readouterr().out.startswith("model  [llama")
    weights = next(folder.glob("*.safetensors"))
    assert cli.main(["analyze", str(weights), "--cheap"]) == 0
    assert capsys.readouterr().out.startswith(f"{weights.name}  [llama")
    # --name: a fine-tuned copy whose _name_or_path names its base model is labelled (and its folder named) as told
    config["_name_or_path"] = "base-org/base-model"
    (folder / "config.json").write_text(json.dumps(config))
    assert cli.main(["analyze", str(folder), "--cheap", "--name", "me/fine-tuned", "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.startswith("me/fine-tuned  [llama")
    assert (tmp_path / "o" / "me--fine-tuned" / "report.json").is_file()
    assert cli.main(["analyze", str(folder), str(folder), "--cheap", "--name", "me/x"]) == 2
    assert "--name me/x: names one model" in capsys.readouterr().err


def test_json_with_several_models_is_json_lines(tiny_checkpoint, tiny_llama, capsys):
    code = cli.main(["analyze", str(tiny_checkpoint), str(tiny_checkpoint), "--cheap", "--layers", "0", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2  # one line per model, each a whole JSON document
    expected = analyze(str(tiny_checkpoint), cheap=True, layers=[0])
    for line in lines:
        report = Report.from_dict(json.loads(line))
        assert report.summary == pytest.approx(expected.summary, rel=1e-12)


def test_options_shared_by_analyze_and_sweep_are_defined_once():
    """MODEL, --default, --name, --revision, --gguf-file, --max-disk, --diagnostics, --composition, --cheap mean the
    same in both commands: same spelling, type, choices and help text (hf_flag.options); only the defaults differ
    where the sweep lets its config file decide."""
    analyze_parser = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["analyze"]
    ours = {a.dest: a for a in analyze_parser._actions}
    theirs = {a.dest: a for a in sweep.build_parser()._actions}
    shared = ("models", "default", "name", "revision", "gguf_file", "max_disk", "diagnostics", "composition", "cheap")
    for dest in shared:
        a, b = ours[dest], theirs[dest]
        assert (a.option_strings, a.help, a.type, a.choices, a.metavar, a.nargs) == \
               (b.option_strings, b.help, b.type, b.choices, b.metavar, b.nargs), dest
    assert (ours["composition"].default, ours["cheap"].default) == ("auto", False)
    assert (theirs["composition"].default, theirs["cheap"].default) == (None, None)  # the config file decides
