"""hf_flag.harness.sweep end to end: 1 process vs a real 2-process ``accelerate launch`` (gloo, CPU), layer splitting,
resume after a death, failures recorded, bad input, model cards (pushes: tests/harness/test_sweep_hub.py).

The subprocess runs share one module-scoped 1-process sweep as the reference.  Tests never touch the network.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import datasets
import pytest
import yaml

from hf_flag import collector
from hf_flag.harness import claims, schedule, sweep
from hf_flag.harness.claims import Claims, Owner
from hf_flag.harness.config import ConfigError, ModelSpec, load_config
from hf_flag.report import Report
from hf_flag.rows import format_value

REPO = Path(__file__).resolve().parents[2]
UNKNOWN = "nobody-offline/not-a-cached-model"
RANK_EXITS = REPO / "tests" / "harness" / "sweep_rank_exits.py"
ARGS = ["--composition", "adjacent"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sweep(args: list[str], processes: int = 1, script: Optional[Path] = None,
              **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), **env_extra}
    program = ["-m", "hf_flag.harness.sweep"] if script is None else [str(script)]
    if processes == 1:
        cmd = [sys.executable, *program, *args]
    else:
        # accelerate 1.15 runs ONE process for ``--cpu --num_processes N`` (multi-CPU needs mpirun); the torchrun
        # launcher behind --multi_gpu starts N processes, which PartialState(cpu=True) (--device cpu) joins over gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *program, *args]
        cmd += ["--device", "cpu"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def model_list(tiny_models) -> list[str]:
    return [str(tiny_models[n]) for n in ("gpt2", "llama", "bert", "broken")] + [UNKNOWN]


def rows(out: Path) -> list[dict]:
    return datasets.load_from_disk(str(out / "dataset")).to_list()


def statuses(out: Path) -> dict[str, str]:
    return {m["slug"]: m["status"] for m in json.loads((out / "sweep.json").read_text())["models"]}


@pytest.fixture(scope="module")
def one_process(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep1") / "out"
    proc = run_sweep([*model_list(tiny_models), "--out", str(out), *ARGS])
    assert proc.returncode == 3, proc.stderr[-3000:]  # two models fail on purpose
    return out


def test_one_process_records_failures_and_matches_analyze(one_process, tiny_models):
    from hf_flag.analysis.api import analyze

    assert statuses(one_process) == {"local--gpt2": "done", "local--llama": "done", "local--bert": "done",
                                     "local--broken": "failed", f"{UNKNOWN.replace('/', '--')}": "failed"}
    broken = json.loads((one_process / "runs" / "local--broken" / "error.json").read_text())["error"]
    unknown = json.loads((one_process / "runs" / UNKNOWN.replace("/", "--") / "error.json").read_text())["error"]
    assert "\n" not in broken and "model.safetensors" in broken
    assert "\n" not in unknown and UNKNOWN in unknown and "cache" in unknown
    got = [r for r in rows(one_process) if r["model"] == str(tiny_models["gpt2"])]
    want = analyze(str(tiny_models["gpt2"]), composition="adjacent", name=str(tiny_models["gpt2"])).flat_rows()
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):  # the harness changes no number (seeded baselines; BLAS thread counts may
        # differ between the sweep's process and this one, so floats agree to rounding, not bit for bit)
        numbers = {k for k, v in w.items() if isinstance(v, float)}
        assert {k: g[k] for k in w if k not in numbers} == {k: v for k, v in w.items() if k not in numbers}
        assert {k: g[k] for k in numbers} == pytest.approx({k: w[k] for k in numbers}, rel=1e-12, abs=1e-15)
        provenance = set(sweep.provenance_columns(Report("", "")))  # where the weights came from, on every row
        assert all(g[k] is None for k in set(g) - set(w) - provenance)
        assert (g["weights_format"], g["weights_sha"]) == ("safetensors", "") and g["hf_flag_version"]
    assert {r["model"] for r in rows(one_process)} == {str(tiny_models[n]) for n in ("gpt2", "llama", "bert")}


def test_summary_plots_and_cards(one_process, tiny_models):
    import csv

    table = list(csv.DictReader((one_process / "summary.csv").open()))
    assert [t["status"] for t in table] == ["done", "done", "done", "failed", "failed"]
    report = Report.from_json((one_process / "runs" / "local--llama" / "report.json").read_text())
    llama = table[1]
    assert float(llama["vo/commutator_ratio"]) == report.summary["vo/commutator_ratio"]
    assert float(llama["vo/commutator_ratio_baseline"]) == report.summary["vo/commutator_ratio_baseline"]
    assert int(llama["vo/commutator_ratio_n"]) == len(report.select(kind="vo"))
    assert llama["mlp/commutator_ratio"] == "" and "mlp/commutator_ratio: not read" in llama["notes"]
    assert table[3]["error"] and table[3]["vo/commutator_ratio"] == ""
    md = (one_process / "summary.md").read_text()
    assert md.count("\n") == 2 + 5
    assert (f"{format_value(report.summary['vo/commutator_ratio'])} "
            f"({format_value(report.summary['vo/commutator_ratio_baseline'])}) n={len(report.select(kind='vo'))}"
            in md)
    pngs = sorted(p.name for p in (one_process / "plots" / "local--llama").glob("*.png"))
    # the intersection plot is drawn only where some pair differs from its general-position baseline (random
    # tiny weights: none, every pair at max(0, 2c - n), checked on the rows themselves)
    differs = any(r.values.get("intersection_dim") not in (None, r.values.get("intersection_dim_baseline"))
                  for r in report.rows)
    assert not differs
    assert pngs == ["commutator_ratio.png", "head_overlap_o.png", "range_overlap.png"]
    card = one_process / "model_cards" / "local--llama" / "README.md"
    text = card.read_text()
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert len(links) == len(pngs) and all((card.parent / link).resolve().is_file() for link in links)
    assert "- MLP: " in text and "hf_flag:" in text
    assert not (tiny_models["llama"] / "README.md").exists()  # local folders untouched without the flag


@pytest.mark.slow
def test_two_processes_equal_one(one_process, tiny_models, tmp_path):
    out = tmp_path / "out2"
    proc = run_sweep([*model_list(tiny_models), "--out", str(out), *ARGS], processes=2)
    assert proc.returncode != 0, proc.stderr[-3000:]  # accelerate passes on rank 0's "some models failed"
    assert statuses(out) == statuses(one_process)
    assert rows(out) == rows(one_process)
    assert (out / "summary.csv").read_text() == (one_process / "summary.csv").read_text()
    # largest first, round robin; a rank that runs out of work takes the others' from the end of their shares
    slugs = [p.name for p in sorted((out / "runs").iterdir()) if not p.name.startswith(".")]
    ranks = {s: json.loads((out / "runs" / s / "started.json").read_text())["rank"] for s in slugs}
    units = sweep.model_units(sweep.parse_args([*model_list(tiny_models), "--out", str(out), *ARGS])[0])
    sizes = {u.slug: sweep.model_size(u.spec) for u in units}
    plan = schedule.assign_models(sizes, 2)
    assert sorted(ranks) == sorted(s for part in plan for s in part) and set(ranks.values()) <= {0, 1}
    for r, part in enumerate(plan):
        taken = [s for s in part if ranks[s] != r]
        assert taken == part[len(part) - len(taken):], (ranks, plan)  # only a suffix of a share is taken over
    assert [p.name for p in (out / ".sweep").iterdir()] == [claims.LOCK]  # the run's bookkeeping is gone
    assert not list(out.rglob(claims.CLAIM))  # every claim was released


@pytest.mark.slow
def test_split_layers_across_two_processes_equals_one(one_process, tiny_models, tmp_path):
    out = tmp_path / "split"
    proc = run_sweep([*model_list(tiny_models), "--out", str(out), "--split-layers", *ARGS], processes=2)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert statuses(out) == statuses(one_process)
    assert rows(out) == rows(one_process)
    for slug in ("local--gpt2", "local--llama", "local--bert"):
        merged = Report.from_json((out / "runs" / slug / "report.json").read_text())
        single = Report.from_json((one_process / "runs" / slug / "report.json").read_text())
        assert merged.summary == single.summary  # recomputed from the merged rows by analyze's summarize
        shard_layers = [Report.from_json((d / "report.json").read_text()).params["layers"]
                        for d in sorted((out / "runs" / slug / "shards").iterdir())]
        assert len(shard_layers) == 2 and not set(shard_layers[0]) & set(shard_layers[1])
        assert sorted(shard_layers[0] + shard_layers[1]) == list(range(single.layout["n_layers"]))


@pytest.mark.slow
def test_rerun_after_death_runs_each_model_exactly_once(one_process, tiny_models, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(one_process, out)
    dead = out / "runs" / "local--llama"
    (dead / "done.json").unlink()  # the process died after started.json, before its result
    (dead / "report.json").unlink()
    before = {p.parent.name: p.read_text() for p in (out / "runs").glob("*/started.json")}
    errors = {p.parent.name: p.read_text() for p in (out / "runs").glob("*/error.json")}
    proc = run_sweep([*model_list(tiny_models), "--out", str(out), *ARGS])
    assert proc.returncode == 3, proc.stderr[-3000:]
    after = {p.parent.name: p.read_text() for p in (out / "runs").glob("*/started.json")}
    assert [s for s in after if after[s] != before[s]] == ["local--llama"]  # only the dead one was redone
    assert errors == {p.parent.name: p.read_text() for p in (out / "runs").glob("*/error.json")}
    assert rows(out) == rows(one_process)  # every model once, nothing lost


@pytest.mark.slow
def test_rank_that_leaves_early_is_named_and_its_work_taken_over(one_process, tiny_models, tmp_path):
    """Shared --out: rank 1 exits (status 0, so the launcher lets rank 0 run on) holding the claim of its first
    model; rank 0 takes that claim over at once (same machine, dead pid), runs rank 1's share and names it."""
    out = tmp_path / "out"
    proc = run_sweep([*model_list(tiny_models), "--out", str(out), *ARGS], processes=2, script=RANK_EXITS,
                     HF_FLAG_TEST_EXIT_RANK="1")
    assert proc.returncode != 0, proc.stderr[-3000:]  # two models fail on purpose
    named = [line for line in proc.stderr.splitlines() if "stopped before finishing" in line]
    assert len(named) == 1 and "rank 1 (pid " in named[0] and "took its work over" in named[0], proc.stderr[-3000:]
    assert statuses(out) == statuses(one_process) and rows(out) == rows(one_process)
    ranks = {json.loads(p.read_text())["rank"] for p in (out / "runs").glob("*/started.json")}
    assert ranks == {0}  # rank 0 ran everything, the model rank 1 held a claim on when it left included


@pytest.mark.slow
def test_unshared_out_results_travel_and_a_dead_rank_is_named_within_its_lease(one_process, tiny_models, tmp_path):
    """--out-shared no: results reach rank 0 over the launcher's store; a rank that leaves is named once its
    heartbeat has stood still for --lease-seconds, its models are named missing, and a rerun completes them."""
    out = tmp_path / "out"
    args = [*model_list(tiny_models), "--out", str(out), *ARGS, "--out-shared", "no", "--lease-seconds", "3"]
    proc = run_sweep(args, processes=2)  # nobody leaves: rank 1's results travel over the store
    assert proc.returncode != 0
    assert statuses(out) == statuses(one_process) and rows(out) == rows(one_process)
    out2 = tmp_path / "out2"
    args2 = [*model_list(tiny_models), "--out", str(out2), *ARGS, "--out-shared", "no", "--lease-seconds", "3"]
    proc = run_sweep(args2, processes=2, script=RANK_EXITS, HF_FLAG_TEST_EXIT_RANK="1")
    named = [line for line in proc.stderr.splitlines() if "stopped before finishing" in line]
    assert len(named) == 1 and "rank 1 (pid " in named[0] and "missing" in named[0], proc.stderr[-3000:]
    units = sweep.model_units(sweep.parse_args(args2)[0])
    plan = schedule.assign_models({u.slug: sweep.model_size(u.spec) for u in units}, 2)
    got = statuses(out2)
    assert {s for s, st in got.items() if st == "missing"} == set(plan[1])
    notes = {m["slug"]: m["error"] for m in json.loads((out2 / "sweep.json").read_text())["models"]}
    assert all("rank 1 (pid " in notes[s] for s in plan[1])
    assert run_sweep(args2).returncode == 3  # the rerun (one process) completes rank 1's models
    assert statuses(out2) == statuses(one_process) and rows(out2) == rows(one_process)


def test_bad_inputs_exit_2_with_one_line(tiny_models, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert sweep.main([str(tiny_models["gpt2"]), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out" in err and "writable" in err
    cases = {"models: 3\nout: x\n": "'models'", "out: x\nmodles: [a]\n": "'modles'",
             "models: [a]\nout: x\ndevice: tpu\n": "'device'", "models: [{path: a, nme: b}]\n": "'nme'",
             "models: [a]\nout: x\nmerge_timeout: -1\n": "'merge_timeout'", "models: [a\n": "line 2",
             "models: [a]\nout: x\ndiagnostics: [mlp, atention]\n": "'diagnostics'",
             "models: [a]\nout: x\n# caf\xe9\n": "UTF-8"}
    for text, key in cases.items():
        config = tmp_path / "c.yaml"
        config.write_bytes(text.encode("latin-1"))
        with pytest.raises(ConfigError, match=key):
            load_config(config)
        assert sweep.main(["--config", str(config), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and key in err
    assert sweep.main(["--out", str(tmp_path / "o")]) == 2
    assert "no models" in capsys.readouterr().err
    # an unwritable --cards-dir stops the sweep before any analysis, not after it
    out = tmp_path / "cards-out"
    assert sweep.main([str(tiny_models["gpt2"]), "--out", str(out), "--cards-dir", str(blocker / "cards")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--cards-dir" in err and "writable" in err
    assert not (out / "runs").exists()


def test_failed_push_is_one_line_and_keeps_the_results(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(tiny_models["gpt2"]), "--name", "me/tiny-gpt2", "--out", str(out), "--diagnostics", "mlp",
            "--push-to-hub", "me/results", "--allow-derived"]
    assert sweep.main(args) == 3  # the session is offline (HF_HUB_OFFLINE=1): the pushes cannot reach the Hub
    err = [line for line in capsys.readouterr().err.splitlines() if "hf-flag sweep: error" in line]  # not tqdm's
    assert len(err) == 2 and all("OfflineModeIsEnabled" in line and "rerun the same command" in line for line in err)
    assert "--push-to-hub: dataset repo me/results: not pushed" in err[0]  # one line per repo, each named
    assert "--push-to-hub: me/tiny-gpt2: not pushed" in err[1]
    assert statuses(out) == {"me--tiny-gpt2": "done"} and rows(out)  # everything was written before the push


def test_hf_flag_cli_dispatches_to_the_sweep(tmp_path, capsys):
    from hf_flag.cli import main as cli_main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli_main(["sweep", "m", "--out", str(blocker / "out")]) == 2
    assert "--out" in capsys.readouterr().err


def test_write_model_cards_in_place(tiny_models, tmp_path, monkeypatch, capsys, assert_card_preserved):
    model = tmp_path / "mymodel"
    shutil.copytree(tiny_models["bert"], model)
    user_card = "---\n# keep me\nlicense: mit\nmodel-index:\n- name: mine\n  results:\n  - task: {type: fill-mask}\n" \
                "    dataset: {name: wiki, type: wiki}\n    metrics:\n    - {type: loss, value: 1.5}\n---\n# Mine\n"
    (model / "README.md").write_text(user_card)
    out = tmp_path / "out"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"models": [{"path": str(model), "name": "me/tiny-bert"}], "out": str(out),
                                      "composition": "adjacent", "diagnostics": ["mlp", "vo", "heads"]}))
    assert sweep.main(["--config", str(config), "--write-model-cards"]) == 0
    in_place = (model / "README.md").read_text()
    assert_card_preserved(in_place, user_card)
    assert "# keep me" in in_place and [e["name"] for e in yaml.safe_load(in_place.split("---")[1])["model-index"]] \
        == ["mine"]  # hf-flag's results join the user's entry; its name stays
    assert "(hf-flag-plots/commutator_ratio.png)" in in_place and (model / "hf-flag-plots" / "commutator_ratio.png"
                                                                   ).is_file()
    generated = (out / "model_cards" / "me--tiny-bert" / "README.md").read_text()
    assert_card_preserved(generated, user_card)  # the sweep's card starts from the model's own README
    assert (out / "model_cards" / "me--tiny-bert" / "hf-flag-plots" / "commutator_ratio.png").is_file()
    started = (out / "runs" / "me--tiny-bert" / "started.json").read_text()
    assert sweep.main(["--config", str(config), "--write-model-cards"]) == 0  # a rerun: nothing changes
    assert (model / "README.md").read_text() == in_place
    assert (out / "runs" / "me--tiny-bert" / "started.json").read_text() == started  # card edit != new inputs


@pytest.mark.pretrained
def test_default_models_are_named(minilm_path, smollm2_gguf, tmp_path):
    from hf_flag.harness.config import slugs

    cfg, _ = sweep.parse_args(["--default", "--out", str(tmp_path)])
    assert [(Path(s.path).resolve(), s.name) for s in cfg.models] == [
        (minilm_path.resolve(), "sentence-transformers/all-MiniLM-L6-v2"),
        (smollm2_gguf.resolve(), "HuggingFaceTB/SmolLM2-135M-Instruct")]
    assert slugs(cfg.models) == ["sentence-transformers--all-MiniLM-L6-v2", "HuggingFaceTB--SmolLM2-135M-Instruct"]
    assert slugs([ModelSpec("/a/x"), ModelSpec("/b/x")])[0].startswith("local--x-")  # collisions disambiguated
    # given by its path, an embedded model is still named by its Hub id, not by its config's _name_or_path (the
    # model it was fine-tuned from: nreimers/MiniLM-L6-H384-uncased for all-MiniLM-L6-v2)
    by_path, _ = sweep.parse_args([str(minilm_path), "--out", str(tmp_path)])
    assert [s.name for s in by_path.models] == ["sentence-transformers/all-MiniLM-L6-v2"]


def test_config_file_and_arguments_merge(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("models:\n  - a/b\n  - {path: ./local, name: me/local}\nout: from-file\ncomposition: all\n"
                      "diagnostics: mlp\nsplit_layers: true\n")
    cfg, _ = sweep.parse_args(["--config", str(config), "c/d", "a/b", "--composition", "adjacent",
                               "--out", str(tmp_path / "cli")])
    assert cfg.models == (ModelSpec("a/b"), ModelSpec("./local", "me/local"), ModelSpec("c/d"))  # no duplicate
    assert (cfg.composition, cfg.out, cfg.diagnostics, cfg.split_layers) == ("adjacent", tmp_path / "cli",
                                                                             ("mlp",), True)
    assert cfg.device == "auto" and cfg.push_to_hub is None and not cfg.write_model_cards  # defaults


def test_long_lived_frozen_hands_the_heap_back():
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        with collector.long_lived_frozen():
            assert gc.get_freeze_count() > 0
            raise RuntimeError("a failing sweep still unfreezes")
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller that manages the collector itself is left alone
    try:
        frozen = gc.get_freeze_count()
        with collector.long_lived_frozen():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def context(cfg, *, rank: int = 0, world: int = 1, **options) -> sweep.RunContext:
    """The run context of one process of a sweep, without a launcher (claims renewed only inside ``with``)."""
    mine = Claims(Owner.this_process(f"rank {rank} of the test"), options.get("lease_s", 60.0))
    return sweep.RunContext(cfg, rank=rank, world=world, device="cpu", options=sweep.Options(**options),
                            claims=mine, run_id="test-run")


def test_rank_0_takes_over_work_of_an_absent_rank_and_names_held_work_missing(tiny_models, tmp_path):
    """Rank 0 of a 2-process sweep whose rank 1 never starts: rank 0 runs rank 1's unclaimed model too and names
    rank 1; a model held by a live process elsewhere that never finishes is named missing after --merge-timeout."""
    models = [str(tiny_models[n]) for n in ("gpt2", "bert", "llama")]
    cfg, _ = sweep.parse_args([*models, "--out", str(tmp_path), "--diagnostics", "mlp", "--merge-timeout", "0.5"])
    units = sweep.model_units(cfg)
    held = next(u for u in units if u.slug == "local--llama")
    held.run_dir.mkdir(parents=True)
    (held.run_dir / claims.CLAIM).write_text(json.dumps({"token": "elsewhere", "owner": "pid 7 on elsewhere",
                                                         "host": "elsewhere", "pid": 7, "expires": 4e9}))
    ctx = context(cfg, world=2)
    states, notes, dead = sweep.sweep_models(ctx, units)
    assert dead == {1: "rank 1"} and notes == {}
    results = sweep.write_outputs(ctx, units, states, notes=notes)
    assert {r.slug: r.status for r in results} == {"local--gpt2": "done", "local--bert": "done",
                                                         "local--llama": "missing"}
    missing = {m["slug"]: m for m in json.loads((tmp_path / "sweep.json").read_text())["models"]}["local--llama"]
    assert "rerun to resume" in missing["error"]
    assert {r["model"] for r in rows(tmp_path)} == {models[0], models[1]}
    assert not (held.run_dir / schedule.STARTED).exists()  # the held model was never touched
    assert json.loads((held.run_dir / claims.CLAIM).read_text())["token"] == "elsewhere"


def test_retry_failed_reruns_only_failures(one_process, tiny_models, tmp_path):
    out = tmp_path / "retry"
    shutil.copytree(one_process, out)
    started = {p.parent.name: p.read_text() for p in (out / "runs").glob("*/started.json")}
    args = [*model_list(tiny_models), "--out", str(out), *ARGS]
    assert sweep.main(args) == 3  # failures are final for unchanged inputs: nothing reruns
    assert started == {p.parent.name: p.read_text() for p in (out / "runs").glob("*/started.json")}
    assert sweep.main([*args, "--retry-failed"]) == 3
    changed = {p.parent.name for p in (out / "runs").glob("*/started.json") if p.read_text() != started[p.parent.name]}
    assert changed == {"local--broken", UNKNOWN.replace("/", "--")}


def test_a_local_copy_is_named_by_its_folder_and_never_pushed_without_a_name(minilm_path, tmp_path, capsys):
    """A copy of all-MiniLM-L6-v2 (config ``_name_or_path``: its base model nreimers/MiniLM-L6-H384-uncased) is
    labelled, carded and slugged by its folder name; ``--push-to-hub`` refuses it (one line, exit 2, before any
    work) until ``--name`` names its repo; the embedded default keeps its Hub id."""
    copy = tmp_path / "mycopy"
    shutil.copytree(minilm_path, copy)
    out = tmp_path / "out"
    args = [str(copy), "--out", str(out), "--diagnostics", "mlp", "--composition", "none", "--cheap"]
    assert sweep.main([*args, "--push-to-hub", "--allow-derived", "--dry-run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-flag")]
    assert len(err) == 1 and f"local model {str(copy)!r} has no Hub repo name" in err[0] and "--name" in err[0]
    assert not (out / "runs").exists()
    assert sweep.main(args) == 0
    section = (out / "model_cards" / "local--mycopy" / "README.md").read_text().split("hf-flag:start")[1]
    assert "`mycopy`" in section and "nreimers" not in section  # hf-flag's section (the copy's own text is kept)
    assert sweep.main([*args, "--name", "me/mycopy", "--push-to-hub", "--allow-derived", "--dry-run"]) == 0
    pushed = capsys.readouterr().out
    assert "card of me/mycopy" in pushed and "nreimers" not in pushed
    cfg, _ = sweep.parse_args([str(minilm_path), "--out", str(tmp_path), "--push-to-hub"])  # a default: named
    assert [s.name for s in cfg.models] == ["sentence-transformers/all-MiniLM-L6-v2"]
