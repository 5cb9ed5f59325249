"""The shipped example config (examples/sweep.yaml) and the config messages a new user meets (issue #15 item 4)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hf_flag.harness import config as config_module
from hf_flag.harness import sweep
from hf_flag.harness.config import CONFIG_KEYS, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sweep.yaml"


def documented_keys(text: str) -> list[str]:
    """Top-level keys of a YAML text, commented out or not (``key:`` or ``# key:`` at the start of a line)."""
    return re.findall(r"^(?:# )?([a-z_]+):", text, flags=re.MULTILINE)


def test_example_config_documents_every_key_and_loads():
    text = EXAMPLE.read_text()
    assert documented_keys(text) == list(CONFIG_KEYS)  # every key, in the docstring's order, none unknown
    values = load_config(EXAMPLE)
    assert set(values) == set(CONFIG_KEYS) - {"models"}  # models is commented out: MODEL args / --default add them
    assert values["composition"] == "adjacent" and values["diagnostics"] is None and values["cards_dir"] is None
    for line in text.splitlines():  # every active key explains itself on its line
        if re.match(r"^[a-z_]+:", line):
            assert "#" in line, line
    docstring = config_module.__doc__.split("::", 1)[1]
    assert [k for k in documented_keys(docstring.replace("\n    ", "\n")) if k not in ("path", "name")] == list(
        CONFIG_KEYS)


def test_example_config_runs_a_sweep(tmp_path, tiny_models):
    out = tmp_path / "results"
    assert sweep.main([str(tiny_models["gpt2"]), "--config", str(EXAMPLE), "--out", str(out), "--device", "cpu"]) == 0
    reports = list(out.rglob("report.json"))
    assert len(reports) == 1
    params = json.loads(reports[0].read_text())["params"]
    assert params["composition"] == "adjacent"  # from the example file
    assert len(list((out / "model_cards").glob("*/README.md"))) == 1  # cards_dir: null -> OUT/model_cards


@pytest.mark.parametrize("key, suggestion", [("compositon", "composition"), ("output_dir", "out"),
                                             ("zzz", None), ("model", "models")])
def test_unknown_key_names_it_the_closest_and_the_allowed_ones(key, suggestion):
    with pytest.raises(ConfigError) as err:
        parse_config({"out": "x", key: 1})
    message = str(err.value)
    assert "\n" not in message and f"config key {key!r} is unknown" in message
    assert (f"did you mean {suggestion!r}" in message) if suggestion else "did you mean" not in message
    assert message.endswith(f"known keys: {', '.join(CONFIG_KEYS)} (see examples/sweep.yaml)")


def test_model_entry_unknown_field_names_the_allowed_fields():
    with pytest.raises(ConfigError, match=r"models\[0\]'.*unknown field 'branch'.*fields path, name, revision, "
                                          r"gguf_file$"):
        parse_config({"models": [{"path": "a", "branch": "main"}]})


def test_output_alias_and_null_cards_dir():
    assert parse_config({"output": "o", "cards_dir": None}) == {"out": Path("o"), "cards_dir": None}
    with pytest.raises(ConfigError, match="config key 'output': expected a folder path"):
        parse_config({"output": 3})


def test_sweep_name_option_names_its_one_model(tmp_path):
    from hf_flag.harness.sweep import parse_args

    cfg, _ = parse_args([str(tmp_path / "ft"), "--name", "me/fine-tuned", "--out", str(tmp_path / "o")])
    assert [(m.path, m.name) for m in cfg.models] == [(str(tmp_path / "ft"), "me/fine-tuned")]
    with pytest.raises(ConfigError, match=r"^--name me/x: names one MODEL, but 2 were given"):
        parse_args(["a", "b", "--name", "me/x", "--out", str(tmp_path / "o")])


def test_default_device_is_what_the_docs_say(monkeypatch, tmp_path):
    """README, examples/sweep.yaml and the config docstring say ``auto``: cuda when available, else cpu."""
    import torch

    cfg, _ = sweep.parse_args(["a/b", "--out", str(tmp_path)])
    assert cfg.device == "auto" == load_config(EXAMPLE)["device"]
    assert "device: auto" in config_module.__doc__ and "--device auto" in (REPO / "README.md").read_text()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sweep.resolve_device(cfg.device, 0) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [sweep.resolve_device(cfg.device, rank) for rank in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e-12, 0, -1, True])
def test_config_max_disk_follows_the_option_rule(value):
    """The config key max_disk takes what --max-disk takes (a finite number of GB of at least one byte): a YAML .inf
    was accepted and crashed every model as an internal error."""
    with pytest.raises(ConfigError, match="config key 'max_disk'.*a positive, finite number of GB"):
        parse_config({"out": "x", "max_disk": value})
    assert parse_config({"out": "x", "max_disk": 0.5}) == {"out": Path("x"), "max_disk": 0.5}
