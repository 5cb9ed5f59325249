"""hf_flag.harness.schedule: largest-first round robin, layer shards, fingerprints, atomic markers, polling."""
from __future__ import annotations


from pathlib import Path

import pytest

from hf_flag.harness import schedule
from hf_flag.harness.schedule import RunState


def test_largest_first_round_robin_not_contiguous():
    sizes = {"a": 10, "b": 40, "c": 30, "d": 20, "e": 5}
    # by size: b c d a e, dealt from the last rank: rank 1 gets b, d, e; rank 0 (which merges afterwards) gets
    # the lighter c, a (contiguous blocks would give one rank b, c, d)
    assert schedule.assign_models(sizes, 2) == [["c", "a"], ["b", "d", "e"]]
    assert schedule.assign_models(sizes, 1) == [["b", "c", "d", "a", "e"]]
    assert schedule.assign_models(sizes, 3) == [["d"], ["c", "e"], ["b", "a"]]


def test_ties_break_by_name_and_every_model_once():
    sizes = {f"m{i}": i % 3 for i in range(11)}
    for world in (1, 2, 3, 4, 16):
        parts = schedule.assign_models(sizes, world)
        flat = [m for p in parts for m in p]
        assert sorted(flat) == sorted(sizes) and len(flat) == len(set(flat))
        assert len(parts) == world
    assert schedule.largest_first({"x": 1, "b": 1, "a": 2}) == ["a", "b", "x"]


def test_shard_layers():
    assert schedule.shard_layers(5, 2) == [[0, 2, 4], [1, 3]]
    assert schedule.shard_layers(2, 3) == [[0], [1]]  # empty shards dropped
    assert schedule.shard_layers(0, 2) == []
    with pytest.raises(ValueError, match="world_size"):
        schedule.shard_layers(4, 0)
    with pytest.raises(ValueError, match="n_layers"):
        schedule.shard_layers(-1, 2)


def test_fingerprint_tracks_params_and_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"1234")
    fp = schedule.fingerprint({"composition": "all"}, [folder])
    assert fp == schedule.fingerprint({"composition": "all"}, [folder])
    assert fp != schedule.fingerprint({"composition": "adjacent"}, [folder])
    (folder / "README.md").write_text("card")  # cards are edited in place: not an input of the analysis
    assert fp == schedule.fingerprint({"composition": "all"}, [folder])
    (folder / "model.safetensors").write_bytes(b"12345")  # the user repaired / replaced the weights
    assert fp != schedule.fingerprint({"composition": "all"}, [folder])
    # a path that does not exist (a Hub id) hashes its parameters only
    assert schedule.fingerprint({"m": "org/x"}, ["org/x"]) == schedule.fingerprint({"m": "org/x"}, [])


def test_run_state_lifecycle(tmp_path):
    run = tmp_path / "runs" / "m"
    assert schedule.run_state(run, "fp1") is RunState.NEW
    schedule.mark_started(run, "fp1", rank=1)
    assert schedule.run_state(run, "fp1") is RunState.STARTED  # a process that dies here leaves this state
    assert schedule.run_state(run, "fp2") is RunState.NEW  # other inputs/parameters: not this run
    schedule.mark_done(run, "fp1", '{"x": 1}')
    assert schedule.run_state(run, "fp1") is RunState.DONE
    (run / schedule.REPORT).unlink()
    assert schedule.run_state(run, "fp1") is RunState.STARTED  # done marker without its report is not done
    done = (run / schedule.DONE).read_text()
    schedule.mark_started(run, "fp1", rank=0)
    assert (run / schedule.DONE).read_text() == done  # starting never deletes a marker (another process's)
    schedule.mark_failed(run, "fp1", "ValueError: bad\nsecond line")
    assert schedule.run_state(run, "fp1") is RunState.FAILED
    assert schedule.read_error(run) == "ValueError: bad"  # one line
    schedule.mark_done(run, "fp1", '{"x": 2}')  # a retried failure that succeeds: done, the failure removed
    assert schedule.run_state(run, "fp1") is RunState.DONE and not (run / schedule.ERROR).exists()
    assert schedule.read_error(tmp_path / "nowhere") == ""


def test_report_code_digest_hashes_the_code_that_computes_reports(tmp_path, monkeypatch):
    """Independent reference: sha256 over the same files computed here; a change of one geometry file or of the
    version changes it, so a sweep does not reuse a report an earlier hf-flag computed."""
    import hashlib

    import hf_flag

    root = Path(hf_flag.__file__).resolve().parent
    digest = schedule.report_code_digest()
    files = sorted({*root.joinpath("weights").rglob("*.py"), *root.joinpath("geometry").rglob("*.py"),
                    *root.joinpath("analysis").rglob("*.py"), root / "rows.py", root / "report.py"})
    h = hashlib.sha256(hf_flag.__version__.encode())
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    assert digest == h.hexdigest()[:16]
    schedule.report_code_digest.cache_clear()
    monkeypatch.setattr(hf_flag, "__version__", hf_flag.__version__ + "+other")
    try:
        assert schedule.report_code_digest() != digest
    finally:
        schedule.report_code_digest.cache_clear()
