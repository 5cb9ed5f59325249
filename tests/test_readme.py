"""The README as a new user follows it (issue #15 items 3, 4, 5): the two set-up commands with their stated
durations (the test one verbatim in .ci/run), every config it names shipped, every hf-flag command line accepted by
the real parsers, and no user command that overwrites the committed docs/."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hf_flag import cli
from hf_flag.harness import sweep
from hf_flag.harness.experiments import reproduce

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SHELL_LINES = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
               for line in block.splitlines() if line.strip()]


def setup_section() -> str:
    return README.split("## Set-up commands", 1)[1].split("\n## ", 1)[0]


def test_two_setup_commands_with_measured_durations():
    section = setup_section()
    commands = re.findall(r"```bash\n(.*?)\n```", section, flags=re.DOTALL)
    assert len(commands) == 2 and all(c.startswith("python3 -m venv .venv && ") for c in commands)
    assert commands[0].endswith("hf-flag sweep --default --out results --cards-dir model_cards")
    assert commands[1].endswith(".venv/bin/python -m pytest -q")
    assert commands[1] in (REPO / ".ci" / "run").read_text()  # .ci/run calls the README's test command verbatim
    durations = re.findall(r"Expected duration on 2 cores: ([^\n]*\d+[^\n]*min)", section)
    assert len(durations) == 2  # one stated duration after each command


def test_every_config_the_readme_names_ships():
    configs = re.findall(r"--config (\S+)", README)
    assert configs and set(configs) == {"examples/sweep.yaml"}
    assert (REPO / "examples" / "sweep.yaml").is_file()


@pytest.mark.parametrize("line", [l for l in SHELL_LINES if re.match(r"(hf-flag|accelerate launch) ", l)])
def test_every_readme_command_line_parses(line):
    tokens = shlex.split(line.split(" > ")[0])
    if tokens[0] == "accelerate":
        tokens = tokens[tokens.index("hf_flag.harness.sweep") + 1:]
        sweep.build_parser().parse_args(tokens)
        return
    command, args = tokens[1], tokens[2:]
    if command == "analyze":
        cli.build_parser().parse_args(tokens[1:])
    elif command == "sweep":
        sweep.build_parser().parse_args(args)
    elif command == "reproduce":
        parsed = reproduce.build_parser().parse_args(args)
        assert parsed.out != Path("docs") or parsed.overwrite  # a user's run never lands in the committed docs/
    else:
        assert command == "register" and args == []


def test_maintainer_reproduce_command_is_documented_as_such():
    line = next(l for l in README.splitlines() if "--out docs" in l)
    assert "hf-flag reproduce --out docs --overwrite" in line and "--quick" not in line
    assert "Maintainers" in README.split("hf-flag reproduce --out docs --overwrite")[0].rsplit("\n\n", 1)[1]


@pytest.mark.pretrained
def test_one_minute_example_prints_what_it_says(tmp_path):
    """Review s5 item 4: the one-minute example prints values that read (MATH.md §3), and each ``# prints:`` line
    under a print is what it prints today (the example is run as a user would, in a fresh interpreter)."""
    import os
    import subprocess
    import sys

    block = re.search(r"## One minute\n\n```python\n(.*?)```", README, flags=re.DOTALL).group(1)
    expected = re.findall(r"^# prints: (.*)$", block, flags=re.M)
    assert len(expected) == 3 and "mlp/commutator_ratio" not in block  # MiniLM's MLP kappa does not read
    script = tmp_path / "one_minute.py"
    script.write_text(block)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.splitlines()
    assert printed[:3] == expected
