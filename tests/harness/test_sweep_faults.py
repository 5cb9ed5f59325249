"""Fault injection on the sweep (harness/sweep.py, harness/claims.py), bounded in time.

Sweeps are forked from one warm process (tests/harness/sweep_faults.py), so each costs its own work only:
* kill -9 at 20 seeded random events of a sweep of tiny models (just before or after a file's atomic commit, a
  rename, the dataset swap or an analysis: a count that does not depend on the machine's speed, so every trial is
  interrupted mid-run on every machine), each followed by a rerun whose dataset equals the uninterrupted run's,
  and which analyses no layer whose checkpoint survived the kill;
* two and three sweeps started together on one folder: every model (every layer checkpoint) analysed exactly once,
  every sweep's outputs equal one sweep's;
* a full disk (RLIMIT_FSIZE) and a read-only folder mid-run: one line naming the path, exit 2, nothing half-written
  as final, and the rerun completes the same results.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest

from hf_flag.harness import claims, schedule

REPO = Path(__file__).resolve().parents[2]
TRIALS = 20


def sweep_args(tiny_models, out: Path) -> list[str]:
    models = [str(tiny_models[n]) for n in ("gpt2", "llama", "broken")]
    return [*models, "--out", str(out), "--composition", "adjacent", "--checkpoint-layers", "1"]


def run_plan(steps: list[list[dict]], tmp: Path) -> tuple[dict[str, dict], list[dict]]:
    """Run the steps in one forking process; returns (name -> record, analysis log lines)."""
    plan = tmp / "plan.json"
    log = tmp / "analyses.log"
    plan.write_text(json.dumps({"tmp": str(tmp), "log": str(log), "steps": steps}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "harness" / "sweep_faults.py"), str(plan)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    analyses = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {r["name"]: r for r in records}, analyses


def rows(out: Path) -> list[dict]:
    return datasets.load_from_disk(str(out / "dataset")).to_list()


def manifest(out: Path) -> list[dict]:
    return json.loads((out / "sweep.json").read_text())["models"]


def assert_clean(out: Path) -> None:
    """No claim left, no temporary dataset, every report and marker whole."""
    assert not list(out.rglob(claims.CLAIM))
    assert not [p for p in out.iterdir() if p.name.startswith(".dataset")]
    for path in out.rglob("*.json"):
        json.loads(path.read_text())


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults-ref")
    records, _ = run_plan([[{"name": "ref", "args": sweep_args(tiny_models, tmp / "out")}]], tmp)
    assert records["ref"]["exit"] == 3, records["ref"]["stderr"][-2000:]  # the broken model fails on purpose
    return tmp / "out"


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_equals_uninterrupted_run(tiny_models, reference, tmp_path):
    steps = [[{"name": "count", "args": sweep_args(tiny_models, tmp_path / "count")}]]
    for i in range(TRIALS):
        args = sweep_args(tiny_models, tmp_path / f"t{i}")
        steps += [[{"name": f"kill{i}", "args": args, "kill_seed": i, "kill_events": "count"}],
                  [{"name": f"rerun{i}", "args": args}]]
    records, analyses = run_plan(steps, tmp_path)
    want_rows, want_manifest = rows(reference), manifest(reference)
    n_events = records["count"]["events"]
    resumed = 0
    for i in range(TRIALS):
        out, kill, rerun = tmp_path / f"t{i}", records[f"kill{i}"], records[f"rerun{i}"]
        assert kill["exit"] == -9 and kill["kill_event"] <= n_events, kill["stderr"][-2000:]  # killed mid-run
        assert rerun["exit"] == 3, rerun["stderr"][-2000:]
        assert rows(out) == want_rows, f"trial {i}: killed at event {kill['kill_event']}: {kill['kill_at']}"
        assert manifest(out) == want_manifest
        assert_clean(out)
        # resumed at the first unfinished layer: no checkpoint that survived the kill was analysed again
        survived = {c.split("/")[1] + "@" + c.split("/")[3] for c in kill["checkpoints"]}
        redone = {f"local--{Path(a['model']).name}@{a['layers'][0]}-{a['layers'][-1]}"
                  for a in analyses if a["pid"] == rerun["pid"] and a["layers"] is not None}
        assert not survived & redone, (i, survived & redone)
        resumed += bool(survived) and bool(redone)
    assert resumed >= 1  # some trials resumed part way through a model


@pytest.mark.slow
def test_sigterm_at_random_points_is_one_line_and_resumable(tiny_models, reference, tmp_path):
    steps = [[{"name": "count", "args": sweep_args(tiny_models, tmp_path / "count")}]]
    for i in range(3):
        args = sweep_args(tiny_models, tmp_path / f"t{i}")
        steps += [[{"name": f"term{i}", "args": args, "kill_seed": 100 + i, "kill_events": "count",
                    "signal": "SIGTERM"}], [{"name": f"rerun{i}", "args": args}]]
    records, _ = run_plan(steps, tmp_path)
    for i in range(3):
        term = records[f"term{i}"]
        lines = [line for line in term["stderr"].splitlines() if line.startswith("hf-flag sweep:")]
        assert term["exit"] == 143, (term["kill_at"], term["stderr"][-2000:])  # every trial terminated mid-run
        assert lines == [f"hf-flag sweep: terminated (SIGTERM); finished models and layers are kept in "
                         f"{tmp_path / f't{i}'}; rerun the same command to resume"]
        assert "Traceback" not in term["stderr"]
        assert records[f"rerun{i}"]["exit"] == 3
        assert rows(tmp_path / f"t{i}") == rows(reference)
        assert_clean(tmp_path / f"t{i}")


def count_analyses(analyses: list[dict], out: Path) -> Counter:
    return Counter((a["model"], tuple(a["layers"] or ())) for a in analyses if a["out"] == str(out))


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_sweeps_on_one_folder_split_the_work(tiny_models, reference, tmp_path, n):
    out = tmp_path / "shared"
    records, analyses = run_plan([[{"name": f"s{k}", "args": sweep_args(tiny_models, out)} for k in range(n)]],
                                 tmp_path)
    for k in range(n):
        assert records[f"s{k}"]["exit"] == 3, records[f"s{k}"]["stderr"][-3000:]
        assert "Traceback" not in records[f"s{k}"]["stderr"]
    counts = count_analyses(analyses, out)
    # every layer checkpoint of the two good models, and the broken model's one failed attempt, exactly once
    want = {(str(tiny_models[m]), (i,)) for m in ("gpt2", "llama") for i in range(3)}
    assert set(counts) - {(str(tiny_models["broken"]), ())} == want
    assert set(counts.values()) == {1}, counts
    assert len({a["pid"] for a in analyses if a["out"] == str(out)}) >= 2  # the work was shared
    assert rows(out) == rows(reference) and manifest(out) == manifest(reference)
    assert_clean(out)


@pytest.mark.slow
def test_full_disk_mid_run_is_one_line_and_the_rerun_completes(tiny_models, reference, tmp_path):
    out = tmp_path / "out"
    args = sweep_args(tiny_models, out)
    records, _ = run_plan([[{"name": "full", "args": args, "fsize": 40_000}], [{"name": "rerun", "args": args}]],
                          tmp_path)
    full = records["full"]
    lines = [line for line in full["stderr"].splitlines() if line.startswith("hf-flag sweep:")]
    assert full["exit"] == 2, full["stderr"][-3000:]
    assert len(lines) == 1 and "cannot write " + str(out) in lines[0] and "File too large" in lines[0], lines
    assert "Traceback" not in full["stderr"] and "rerun" in lines[0]
    assert full["checkpoints"]  # it failed mid-run: some layers were finished and kept
    assert records["rerun"]["exit"] == 3
    assert rows(out) == rows(reference) and manifest(out) == manifest(reference)
    assert_clean(out)


@pytest.mark.slow
def test_read_only_folder_mid_run_is_one_line_and_keeps_finished_work(tiny_models, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    llama = out / "runs" / "local--llama"
    for name in (schedule.DONE, schedule.REPORT):  # llama must be analysed again, gpt2 stays finished
        (llama / name).unlink()
    shutil.rmtree(llama / "layers")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    job = {"name": "ro", "args": sweep_args(tiny_models, out)}
    if os.geteuid() == 0:
        job["read_only"] = str(llama)  # root ignores permissions: a read-only mount seen by the sweep only
    else:
        llama.chmod(0o555)
    try:
        records, analyses = run_plan([[job]], tmp_path)
    finally:
        llama.chmod(0o755)
    ro = records["ro"]
    if ro["exit"] == 98:
        pytest.skip("no mount namespace for a read-only folder here (root without CAP_SYS_ADMIN)")
    lines = [line for line in ro["stderr"].splitlines() if line.startswith("hf-flag sweep:")]
    assert ro["exit"] == 2, ro["stderr"][-3000:]
    assert len(lines) == 1 and f"cannot write {llama}" in lines[0], lines
    assert "Traceback" not in ro["stderr"]
    assert not analyses  # stopped before analysing into a folder it cannot write
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing changed
