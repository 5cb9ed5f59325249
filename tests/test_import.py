"""``import hf_flag`` is light (no torch, datasets, matplotlib, evaluate) and writes evaluate's module cache only when
a shim is missing or changed (issue #15 item 9; the time itself is measured by benchmarks/bench_import.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "datasets", "matplotlib", "evaluate", "transformers", "pandas", "pyarrow", "accelerate")
CHILD = f"""
import json, sys
import hf_flag
loaded = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps({{"loaded": loaded, "version": hf_flag.__version__}}))
"""


def run(code: str, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_FLAG_NO_REGISTER"}
    env.update(HF_MODULES_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_import_loads_no_heavy_library(tmp_path):
    assert run(CHILD, tmp_path)["loaded"] == []


def test_public_names_resolve_lazily(tmp_path):
    code = ("import json, sys, hf_flag\nfrom hf_flag import Report, Row, analyze\n"
            "print(json.dumps([callable(hf_flag.analyze), hf_flag.analyze is analyze, Report.__name__, Row.__name__,"
            " 'torch' in sys.modules, sorted(hf_flag.__all__)]))")
    assert run(code, tmp_path) == [True, True, "Report", "Row", True, ["Report", "Row", "__version__", "analyze"]]


def test_import_writes_the_module_cache_only_when_missing_or_changed(tmp_path):
    run(CHILD, tmp_path)  # first import: registers
    shims = sorted(p for p in tmp_path.rglob("evaluate-*--*/*/*.py") if p.name != "__init__.py")
    assert [p.name for p in shims] == ["flag_alignment.py", "neural_collapse.py"]
    before = snapshot(tmp_path)
    run(CHILD, tmp_path)
    run(CHILD, tmp_path)
    assert snapshot(tmp_path) == before  # current: nothing written, not even re-touched
    shims[0].unlink()  # missing: written again, the other one left alone
    run(CHILD, tmp_path)
    after = snapshot(tmp_path)
    assert after[str(shims[0])] != before.get(str(shims[0])) and after[str(shims[1])] == before[str(shims[1])]
    shims[1].write_text("raise ImportError('an old shim')\n")  # changed: rewritten
    run(CHILD, tmp_path)
    assert "from hf_flag.integrations.evaluate_modules.neural_collapse" in shims[1].read_text()


def test_harness_never_imports_the_cli():
    """docs/ARCHITECTURE.md: the harness takes table formatting from the ground floor (``hf_flag.rows``), never from
    ``hf_flag.cli``, not even in a function (review s5 item 12: sweep.terminal_summary imported cli.format_value)."""
    import ast

    offenders = []
    for path in sorted((REPO / "harness").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "hf_flag":
                names += [f"hf_flag.{a.name}" for a in node.names]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names if n == "hf_flag.cli"
                          or n.startswith("hf_flag.cli.")]
    assert offenders == []
    assert len(list((REPO / "harness").rglob("*.py"))) > 5  # the walk saw the harness
