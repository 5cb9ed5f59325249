"""Exit codes and one-line messages (hf_flag/exits.py) of ``hf-flag`` and ``hf-flag sweep``, and the sweep's layer
checkpoints: a run stopped part way resumes at its first unfinished layer and ends with the rows of one
uninterrupted ``analyze``."""
from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from hf_flag.harness import claims, schedule, sweep
from hf_flag import cli, exits
from hf_flag import analyze
from hf_flag.errors import WeightSourceError
from hf_flag.weights.sources import open_weights


def one_stderr_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-flag")]
    assert len(lines) == 1, lines
    return lines[0]


def test_internal_error_exits_1_with_the_traceback_saved(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def bug(args):
        return {}["no such key"]

    with mock.patch.object(cli, "run_analyze", bug):
        assert cli.main(["analyze", "m"]) == exits.EXIT_INTERNAL
    line = one_stderr_line(capsys)
    assert line.startswith("hf-flag: internal error: KeyError: 'no such key'; traceback saved to ")
    saved = Path(line.split("traceback saved to ")[1].split(" (")[0])
    assert saved.parent == tmp_path and "Traceback" in saved.read_text() and "def bug" not in line
    assert "return {}[\"no such key\"]" in saved.read_text()  # the full traceback, with the failing line


@pytest.mark.parametrize("fault", [lambda: np.zeros(2).reshape(3),  # a ValueError from numpy: a bug of ours
                                   lambda: int("not a number")])  # a ValueError in our own code, not a raise
def test_value_errors_that_are_bugs_are_internal(fault, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with mock.patch.object(cli, "run_analyze", lambda args: fault()):
        assert cli.main(["analyze", "m"]) == exits.EXIT_INTERNAL
    assert "internal error: ValueError" in one_stderr_line(capsys)


def test_a_geometry_invariant_failing_during_a_run_is_internal(tiny_models, tmp_path, capsys, monkeypatch):
    """A ``ValueError`` raised by a ``raise`` statement of hf_flag.geometry deep in a run (here overlap_baseline's
    dimension check, fed dimensions no checked input can produce) is a bug: exit 1, traceback saved, not exit 2."""
    from hf_flag.analysis import heads
    from hf_flag.geometry import baselines

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(heads, "overlap_baseline", lambda p, q, n: baselines.overlap_baseline(p, n + 1, n))
    code = cli.main(["analyze", str(tiny_models["gpt2"]), "--diagnostics", "heads", "--composition", "none"])
    line = one_stderr_line(capsys)
    assert code == exits.EXIT_INTERNAL, line
    assert line.startswith("hf-flag: internal error: ValueError: overlap_baseline: q=") and "traceback saved" in line
    saved = Path(line.split("traceback saved to ")[1].split(" (")[0])
    assert saved.parent == tmp_path and 'raise ValueError(f"{where}: {name}=' in saved.read_text()


def test_user_errors_are_input_errors_and_still_value_errors():
    from hf_flag.errors import HfFlagError, InputError
    from hf_flag.harness.config import ConfigError
    from hf_flag.integrations.cards import CardFormatError

    for error in (cli.CliError, ConfigError, CardFormatError):
        assert issubclass(error, InputError)
    assert issubclass(InputError, HfFlagError) and issubclass(InputError, ValueError)
    with pytest.raises(ValueError):  # library callers catching ValueError keep working
        analyze(mock.Mock(), layers=[0])
    assert exits.user_message(ValueError("a message written for users, but not an input error")) is None
    assert exits.user_message(ConfigError("config key 'out': give a folder")) == "config key 'out': give a folder"


def test_a_missing_output_folder_is_a_user_error(tmp_path, capsys):
    from hf_flag.atomic import atomic_write_text

    target = tmp_path / "absent" / "report.json"
    with mock.patch.object(cli, "run_analyze", lambda args: atomic_write_text(target, "{}")):
        assert cli.main(["analyze", "m"]) == exits.EXIT_USAGE
    assert one_stderr_line(capsys).startswith(f"hf-flag: error: cannot write {str(target)!r}: folder ")
    assert not target.parent.exists()


def test_user_errors_exit_2_with_one_line(tiny_models, capsys):
    assert cli.main(["analyze", str(tiny_models["gpt2"]), "--layers", "7"]) == exits.EXIT_USAGE  # our raise
    line = one_stderr_line(capsys)
    assert line.startswith("hf-flag: error: layers=[7] is out of range")
    assert cli.main(["analyze", str(tiny_models["broken"])]) == exits.EXIT_USAGE  # a WeightSourceError
    assert "model.safetensors" in one_stderr_line(capsys)
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/report.json")
    with mock.patch.object(cli, "run_analyze", mock.Mock(side_effect=full)):
        assert cli.main(["analyze", "m"]) == exits.EXIT_USAGE
    assert one_stderr_line(capsys).startswith(
        "hf-flag: error: cannot write /data/out/report.json: No space left on device; free space")


def test_ctrl_c_exits_130_with_one_line(capsys):
    with mock.patch.object(cli, "run_analyze", mock.Mock(side_effect=KeyboardInterrupt)):
        assert cli.main(["analyze", "m"]) == exits.EXIT_INTERRUPTED
    assert one_stderr_line(capsys) == "hf-flag: interrupted"


def test_sweep_internal_error_saves_its_traceback_in_the_output_folder(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    with mock.patch.object(sweep, "summary_table", mock.Mock(side_effect=TypeError("bad table"))):
        assert sweep.main([str(tiny_models["gpt2"]), "--out", str(out), "--diagnostics", "mlp"]) == 1
    line = one_stderr_line(capsys)
    assert line.startswith("hf-flag sweep: internal error: TypeError: bad table; traceback saved to ")
    saved = Path(line.split("traceback saved to ")[1].split(" (")[0])
    assert saved.parent == out / "errors" and "summary_table" in saved.read_text()
    assert schedule.run_state(out / "runs" / "local--gpt2", json.loads(
        (out / "runs" / "local--gpt2" / schedule.DONE).read_text())["fingerprint"]) is schedule.RunState.DONE


def test_ctrl_c_mid_model_resumes_at_the_first_unfinished_layer(tiny_models, tmp_path, capsys):
    model = str(tiny_models["llama"])
    out = tmp_path / "out"
    args = [model, "--out", str(out), "--composition", "adjacent", "--checkpoint-layers", "1"]
    calls: list[tuple[int, ...]] = []
    real = sweep.analyze_layers

    def interrupted_at_layer_2(spec, cfg, device, layers):
        calls.append(tuple(layers))
        if 2 in layers:
            raise KeyboardInterrupt
        return real(spec, cfg, device, layers)

    with mock.patch.object(sweep, "analyze_layers", interrupted_at_layer_2):
        assert sweep.main(args) == exits.EXIT_INTERRUPTED
    line = one_stderr_line(capsys)
    assert line == f"hf-flag sweep: interrupted; finished models and layers are kept in {out}; rerun the same " \
                   f"command to resume"
    assert calls == [(0,), (1,), (2,)]
    assert sorted(p.name for p in (out / "runs" / "local--llama" / "layers").iterdir()) == ["0-0", "1-1"]
    assert not list(out.rglob(claims.CLAIM))  # released on the way out
    calls.clear()

    def counted(spec, cfg, device, layers):
        calls.append(tuple(layers))
        return real(spec, cfg, device, layers)

    with mock.patch.object(sweep, "analyze_layers", counted):
        assert sweep.main(args) == exits.EXIT_OK
    assert calls == [(2,)]  # layers 0 and 1 were read back, not analysed again
    got = json.loads((out / "runs" / "local--llama" / schedule.REPORT).read_text())
    want = analyze(model, composition="adjacent", name=model)
    assert got["rows"] == json.loads(want.to_json())["rows"]  # the same rows, bit for bit, in the same order
    assert got["summary"] == json.loads(want.to_json())["summary"]


def test_layers_per_checkpoint():
    mib = 2**20
    assert sweep.layers_per_checkpoint(32, 13_000 * mib, None) == 2  # 406 MiB a layer: two per 512 MiB
    assert sweep.layers_per_checkpoint(6, 90 * mib, None) >= 6  # a small model is one checkpoint
    assert sweep.layers_per_checkpoint(6, 90 * mib, 1) == 1
    assert sweep.layers_per_checkpoint(6, 90 * mib, 0) == 6


def test_sweep_exit_code_tells_input_failures_from_internal_ones(tiny_models, tmp_path, capsys):
    """A model that fails on its input (a corrupt checkpoint) leaves the sweep incomplete: exit 3, not the
    internal-error code 1; a model whose analysis hits an internal error (a bug) exits 1 and says where its
    traceback is."""
    good, broken = str(tiny_models["gpt2"]), str(tiny_models["broken"])
    out = tmp_path / "input"
    assert sweep.main([good, broken, "--out", str(out), "--diagnostics", "mlp"]) == exits.EXIT_INCOMPLETE == 3
    assert json.loads((out / "runs" / "local--broken" / schedule.ERROR).read_text())["internal"] is False
    capsys.readouterr()
    out = tmp_path / "internal"
    real = sweep.analyze

    def buggy(source, **kwargs):
        if "llama" in str(kwargs.get("name")):
            raise KeyError("a bug")
        return real(source, **kwargs)

    with mock.patch.object(sweep, "analyze", buggy):
        code = sweep.main([good, str(tiny_models["llama"]), "--out", str(out), "--diagnostics", "mlp"])
    assert code == exits.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "internal error" in err and str(out / "runs" / "local--llama" / schedule.ERROR) in err
    assert "KeyError" in json.loads((out / "runs" / "local--llama" / schedule.ERROR).read_text())["traceback"]


def test_sweep_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 every model done; 1 an internal error" in text and "3 finished incomplete" in text


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "x", "1e-12"])
def test_max_disk_must_be_positive(value, tiny_models, tmp_path, capsys):
    model = str(tiny_models["gpt2"])
    assert cli.main(["analyze", model, "--max-disk", value]) == exits.EXIT_USAGE
    assert "--max-disk" in one_stderr_line(capsys)
    assert sweep.main([model, "--out", str(tmp_path / "o"), "--max-disk", value]) == exits.EXIT_USAGE
    assert "--max-disk" in one_stderr_line(capsys) and not (tmp_path / "o").exists()


def test_gguf_file_with_a_local_model_is_refused(tiny_models, tmp_path, capsys):
    model = str(tiny_models["gpt2"])
    assert cli.main(["analyze", model, "--gguf-file", "x.gguf"]) == exits.EXIT_USAGE
    line = one_stderr_line(capsys)
    assert "--gguf-file 'x.gguf'" in line and "not a Hub id" in line and model in line
    with pytest.raises(WeightSourceError, match="not a Hub id"):
        open_weights(torch.nn.Linear(2, 2), gguf_file="x.gguf")
    # the sweep refuses it too, before any work: nothing written (argument or config-file entry alike)
    out = tmp_path / "o"
    assert sweep.main([model, "--gguf-file", "x.gguf", "--out", str(out)]) == exits.EXIT_USAGE
    line = one_stderr_line(capsys)
    assert "--gguf-file 'x.gguf'" in line and "not a Hub id" in line and model in line and not out.exists()
    config = tmp_path / "sweep.yaml"
    config.write_text(f"models: [{{path: {model}, gguf_file: x.gguf}}]\nout: {out}\n")
    assert sweep.main(["--config", str(config)]) == exits.EXIT_USAGE
    assert "not a Hub id" in one_stderr_line(capsys) and not out.exists()


def test_a_report_of_other_report_code_is_recomputed_not_reused(tiny_models, tmp_path, capsys, monkeypatch):
    """A sweep into a folder whose run an earlier hf-flag finished recomputes it (the code digest is part of the
    model's fingerprint); the same code reuses it."""
    out = tmp_path / "out"
    argv = [str(tiny_models["gpt2"]), "--out", str(out), "--diagnostics", "mlp", "--composition", "none"]
    assert sweep.main(argv) == 0
    done = out / "runs" / "local--gpt2" / schedule.DONE
    first = json.loads(done.read_text())["fingerprint"]
    assert sweep.main(argv) == 0 and json.loads(done.read_text())["fingerprint"] == first
    monkeypatch.setattr(schedule, "report_code_digest", lambda: "other-code")
    with mock.patch.object(sweep, "analyze_unit", wraps=sweep.analyze_unit) as analysed:
        assert sweep.main(argv) == 0
    assert analysed.called and json.loads(done.read_text())["fingerprint"] != first
