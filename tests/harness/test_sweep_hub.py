"""The sweep against a local Hub server (tests/hub_server.py, real HTTP through huggingface_hub, no mocks): Hub ids
into an empty cache, revision pinning, a missing repo, a download killed half way and resumed, and the pushes
(commit, pull request, dry run, derived weights refused, results dataset) received with their exact bytes."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest
import yaml
from huggingface_hub import constants

from hf_flag.harness import sweep
from hf_flag import analyze
from hf_flag.integrations import cards
from hf_flag.report import Report
from hf_flag.weights.hub import shard_names

from tests.conftest import make_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
LLAMA = "tiny-org/tiny-llama"
BERT = "tiny-org/tiny-bert"
ARGS = ["--composition", "adjacent"]
REMOTE_CARD = "---\nlicense: mit\n# a comment\n---\n# Tiny\n\nThe owner's words."


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub_models(hub, tmp_path, tiny_models):
    """Two Hub repos: a tiny Llama in 5 safetensors shards (plus tokenizer / pickle / README the sweep must not
    fetch) and the harness's tiny BERT (one file); returns repo -> (local copy, commit sha)."""
    llama = tmp_path / "llama-copy"
    make_tiny_llama(0).save_pretrained(llama, safe_serialization=True, max_shard_size="20KB")
    extra = {"tokenizer.json": b"{}", "pytorch_model.bin": b"pickle", "README.md": REMOTE_CARD.encode()}
    out = {LLAMA: (llama, hub.add_repo(LLAMA, {**folder_files(llama), **extra}, writers={"hf_writer"})),
           BERT: (tiny_models["bert"], hub.add_repo(BERT, folder_files(tiny_models["bert"])))}
    return out


def report_of(out: Path, slug: str) -> Report:
    return Report.from_json((out / "runs" / slug / "report.json").read_text())


def same_rows(a: Report, b: Report) -> bool:
    return [(r.kind, r.layer, r.source, r.target, r.values) for r in a.rows] == [
        (r.kind, r.layer, r.source, r.target, r.values) for r in b.rows]


def test_sweep_of_hub_ids_into_an_empty_cache(hub, hub_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert not hub.cache.exists()
    code = sweep.main([LLAMA, BERT, "tiny-org/absent", "--out", str(out), *ARGS])
    assert code == 3  # the missing repo fails, the others are done
    status = {m["slug"]: (m["status"], m["error"]) for m in json.loads((out / "sweep.json").read_text())["models"]}
    assert status["tiny-org--absent"][0] == "failed" and status["tiny-org--absent"][1].startswith(
        "WeightSourceError: Hub model 'tiny-org/absent' was not found, or is private")
    for repo, (local, sha) in hub_models.items():
        slug = repo.replace("/", "--")
        got = report_of(out, slug)
        assert status[slug][0] == "done"
        assert got.params["provenance"] == {**got.params["provenance"], "source": "hub", "repo_id": repo,
                                            "sha": sha, "revision": "main", "format": "safetensors"}
        reference = analyze(local, composition="adjacent")  # the same weights from a local copy
        assert same_rows(got, reference) and got.summary == reference.summary
        card = (out / "model_cards" / slug / "README.md").read_text()
        assert f"own weights at commit `{sha[:12]}`" in card.split(cards.SECTION_START)[1].splitlines()[3]
    fetched = {p.rsplit("/", 1)[1] for m, p, _ in hub.log if m == "GET" and "/resolve/" in p}
    assert not fetched & {"tokenizer.json", "pytorch_model.bin", "README.md"}
    summary = {r["model"]: r for r in csv.DictReader(io.StringIO((out / "summary.csv").read_text()))}
    assert summary[LLAMA]["weights_sha"] == hub_models[LLAMA][1] and summary[BERT]["weights_format"] == "safetensors"
    assert f"{LLAMA}@{hub_models[LLAMA][1][:12]} safetensors float32" in (out / "summary.md").read_text()
    ds = datasets.load_from_disk(str(out / "dataset")).to_pandas()
    assert dict(zip(ds["weights_source"], ds["weights_sha"])) == {LLAMA: hub_models[LLAMA][1],
                                                                   BERT: hub_models[BERT][1]}


def test_revision_pins_the_commit(hub, hub_models, tmp_path):
    first = hub_models[LLAMA][1]
    newer = tmp_path / "llama-seed1"
    make_tiny_llama(1).save_pretrained(newer, safe_serialization=True)
    hub.add_repo(LLAMA, folder_files(newer))  # main moves on
    out = tmp_path / "out"
    assert sweep.main([LLAMA, "--revision", first, "--out", str(out), "--diagnostics", "mlp"]) == 0
    got = report_of(out, "tiny-org--tiny-llama")
    assert got.params["provenance"]["sha"] == first
    assert same_rows(got, analyze(hub_models[LLAMA][0], diagnostics={"mlp"}))


def pushed(hub, repo: str, repo_type: str = "model"):
    return [r for r in hub.received if r.repo_id == repo and r.repo_type == repo_type]


def test_push_commit_pr_dry_run_and_dataset_with_exact_bytes(hub, hub_models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    base = [LLAMA, "--out", str(out), "--diagnostics", "mlp", "vo", "heads"]
    # dry run: the diff is printed, nothing reaches the server
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    assert sweep.main([*base, "--push-to-hub", "me/results", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "+<!-- hf-flag:start -->" in printed and "-license: mit" not in printed and hub.received == []
    # a token that can write: one commit on main with the card's exact bytes and its plots
    assert sweep.main([*base, "--push-to-hub", "me/results"]) == 0
    report = report_of(out, "tiny-org--tiny-llama")
    plots = sorted((out / "plots" / "tiny-org--tiny-llama").glob("*.png"))
    captions = json.loads((out / "plots" / "tiny-org--tiny-llama" / "plots.json").read_text())["plots"]
    expected = cards.update_card_text(REMOTE_CARD, report, model_name=LLAMA,
                                      plots={c: f"hf-flag-plots/{f}" for c, f in captions.items()})
    [commit] = pushed(hub, LLAMA)
    assert not commit.create_pr and commit.revision == "main"
    assert commit.files["README.md"] == expected.encode()
    assert {f"hf-flag-plots/{p.name}": p.read_bytes() for p in plots} == {
        k: v for k, v in commit.files.items() if k != "README.md"}
    # the results dataset: created under the token's account, its parquet holds the local dataset's rows
    [data] = pushed(hub, "me/results", "dataset")
    local = datasets.load_from_disk(str(out / "dataset")).to_pandas()
    remote = pd.read_parquet(io.BytesIO(data.files["data/train-00000-of-00001.parquet"]))
    pd.testing.assert_frame_equal(remote, local)
    assert hub_models[LLAMA][1][:12] in data.files["README.md"].decode()
    # the card is now on main; a rerun changes nothing in it (idempotent), so the push carries the same bytes
    hub.received.clear()
    monkeypatch.setenv("HF_TOKEN", "hf_reader")  # may read, may not write: a pull request instead
    assert sweep.main([*base, "--push-to-hub"]) == 0
    [pr] = pushed(hub, LLAMA)
    assert pr.create_pr and pr.pr_url.endswith("/discussions/1") and pr.files["README.md"] == expected.encode()
    hub.received.clear()
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    assert sweep.main([*base, "--push-to-hub", "--create-pr"]) == 0
    [pr] = pushed(hub, LLAMA)
    assert pr.create_pr and pr.pr_url.endswith("/discussions/2")
    assert "hf_writer" not in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"hf_writer" in p.read_bytes()]


def test_derived_weights_are_not_pushed_to_the_original_repo(hub, hub_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"models": [{"path": str(hub_models[LLAMA][0]), "name": LLAMA}],
                                      "out": str(tmp_path / "out"), "diagnostics": ["mlp"]}))
    assert sweep.main(["--config", str(config), "--push-to-hub"]) == 3  # incomplete: a card not pushed
    err = [line for line in capsys.readouterr().err.splitlines() if "card not pushed" in line]
    assert len(err) == 1 and "did not verify" in err[0] and "--allow-derived" in err[0] and hub.received == []
    assert sweep.main(["--config", str(config), "--push-to-hub", "--allow-derived"]) == 0
    [commit] = pushed(hub, LLAMA)
    section = commit.files["README.md"].decode().split(cards.SECTION_START)[1]
    assert section.splitlines()[3].startswith(f"**Computed from an unverified local copy, not from `{LLAMA}`'s own "
                                              f"files at a known commit:** safetensors")


def test_download_killed_half_way_resumes_without_fetching_finished_shards(hub, hub_models, tmp_path):
    local, sha = hub_models[LLAMA]
    shards = shard_names(local / "model.safetensors.index.json")  # the order they are fetched in
    assert len(shards) == 5
    hub.stall_after[(LLAMA, shards[2])] = 1000  # the third shard stalls after 1000 bytes; the process is killed
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hf_flag.harness.sweep", LLAMA, "--out", str(out), "--diagnostics", "mlp"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert hub.stalled.wait(120), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no stall"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        hub.stall_release.set()
    done_before = {s: len(hub.gets("/" + s)) for s in shards}
    assert [done_before[s] for s in shards] == [1, 1, 1, 0, 0]
    assert sweep.main([LLAMA, "--out", str(out), "--diagnostics", "mlp"]) == 0
    assert [len(hub.gets("/" + s)) for s in shards] == [1, 1, 2, 1, 1]  # only the killed shard again
    got = report_of(out, "tiny-org--tiny-llama")
    assert got.params["provenance"]["sha"] == sha and same_rows(got, analyze(local, diagnostics={"mlp"}))


def test_max_disk_sweep_equals_the_full_copy_and_leaves_no_shard(hub, hub_models, tmp_path):
    local, sha = hub_models[LLAMA]
    sizes = sorted(p.stat().st_size for p in local.glob("*.safetensors"))
    budget_gb = (sizes[-1] + sizes[-2]) / 1e9
    out = tmp_path / "out"
    assert sweep.main([LLAMA, "--max-disk", repr(budget_gb), "--out", str(out), *ARGS]) == 0
    got = report_of(out, "tiny-org--tiny-llama")
    assert got.params["provenance"]["max_disk_bytes"] == int(budget_gb * 1e9)
    reference = analyze(local, composition="adjacent")
    assert same_rows(got, reference) and got.summary == reference.summary
    assert not list(hub.cache.rglob("*.safetensors"))  # streamed shards are gone from the cache
    # a budget below the largest shard is refused up front: the sizes come from the Hub's file metadata
    from hf_flag import cli

    assert cli.main(["analyze", LLAMA, "--max-disk", repr(sizes[-1] / 2e9), "--cheap"]) == 2


def test_max_disk_sweep_killed_and_resumed_never_refetches_finished_groups(hub, tmp_path):
    """A 6-layer Llama in many small shards, streamed with room for two: the run is killed while a late shard
    downloads; the rerun starts at the first unfinished group of layers, so the first shards are fetched once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_flag.harness.stream import layer_groups

    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    local = tmp_path / "six"
    model.save_pretrained(local, safe_serialization=True, max_shard_size="8KB")
    hub.add_repo("tiny-org/six", folder_files(local))
    shards = shard_names(local / "model.safetensors.index.json")
    budget_gb = 2 * max(p.stat().st_size for p in local.glob("*.safetensors")) / 1e9
    groups = layer_groups(sweep.ModelSpec("tiny-org/six"), budget_gb)
    assert len(groups) >= 3 and sorted(i for g in groups for i in g) == list(range(6))
    hub.log.clear()
    late = shards[-2]  # a shard of the last layers
    hub.stall_after[("tiny-org/six", late)] = 100
    out = tmp_path / "out"
    args = ["tiny-org/six", "--max-disk", repr(budget_gb), "--out", str(out), "--diagnostics", "mlp", "vo",
            "residual"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hf_flag.harness.sweep", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.stalled.wait(120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        hub.stall_release.set()
    finished = sorted((out / "runs" / "tiny-org--six" / "streamed").glob("*/done.json"))
    assert finished  # some groups were done before the kill
    def data_gets(shard: str) -> list[dict]:  # downloads, not header reads
        return [h for h in hub.gets("/" + shard) if not h.get("Range", "").startswith(("bytes=0-", "bytes=8-"))]

    first = {s: len(data_gets(s)) for s in shards}
    assert sweep.main(args) == 0
    again = {s: len(data_gets(s)) - first[s] for s in shards}
    assert again[shards[0]] == 0 and first[shards[0]] == 1  # the first shard: fetched once, before the kill
    assert again[late] >= 1
    got = report_of(out, "tiny-org--six")
    reference = analyze(local, diagnostics={"mlp", "vo", "residual"})
    assert same_rows(got, reference) and got.summary == reference.summary


def test_offline_dry_run_reads_the_cached_card_and_a_push_bug_keeps_its_traceback(hub, hub_models, tmp_path,
                                                                                  monkeypatch, capsys):
    out = tmp_path / "out"
    base = [LLAMA, "--out", str(out), "--diagnostics", "mlp"]
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    assert sweep.main([*base, "--push-to-hub", "--dry-run"]) == 0  # online: fetches the card into the cache
    online = capsys.readouterr().out
    with monkeypatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
        assert sweep.main([*base, "--push-to-hub", "--dry-run"]) == 0  # offline: the cached card, the same diff
    assert capsys.readouterr().out == online and "+<!-- hf-flag:start -->" in online and hub.received == []

    def broken(*args, **kwargs):
        raise TypeError("a bug in the push code")

    monkeypatch.setattr(cards, "push_card", broken)
    assert sweep.main([*base, "--push-to-hub"]) == 1  # a bug: exit 1 with a pointer to its saved traceback
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "TypeError" in line]
    saved = Path(line.split("traceback saved to ")[1].split()[0])
    assert "internal error" in line and "a bug in the push code" in saved.read_text()


def test_push_to_a_new_repo_creates_it_and_a_failed_push_exits_3_naming_the_repo(hub, tiny_models, tmp_path,
                                                                                   monkeypatch, capsys):
    local = str(tiny_models["bert"])
    args = ["--out", str(tmp_path / "out"), "--diagnostics", "mlp", "--push-to-hub", "--allow-derived"]
    # the token's own repo that does not exist yet: created, then the card committed to it
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    assert sweep.main([local, "--name", "me/newrepo", *args, "--dry-run"]) == 0  # nothing created by a dry run
    assert ("model", "me/newrepo") not in hub.repos and hub.received == []
    assert sweep.main([local, "--name", "me/newrepo", *args]) == 0
    [commit] = pushed(hub, "me/newrepo")
    assert not commit.create_pr and "hf_writer" in hub.repos[("model", "me/newrepo")].writers
    report = report_of(tmp_path / "out", "me--newrepo")
    assert commit.files["README.md"].decode() == cards.update_card_text(
        cards.minimal_card("me/newrepo"), report, model_name="me/newrepo",
        plots={c: f"hf-flag-plots/{Path(p).name}" for c, p in json.loads(
            (tmp_path / "out" / "plots" / "me--newrepo" / "plots.json").read_text())["plots"].items()})
    capsys.readouterr()
    # no token: the Hub refuses to create the repo (401): exit 3, one line naming the repo and what to do
    monkeypatch.delenv("HF_TOKEN")
    assert sweep.main([local, "--name", "me/other", *args, "--push-to-hub", "me/data"]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 2 and all("HF_TOKEN" in line and "not pushed" in line for line in errors)
    assert "dataset repo me/data" in errors[0] and errors[1].startswith("hf-flag sweep: error: --push-to-hub: me/other")
    assert ("model", "me/other") not in hub.repos and (tmp_path / "out" / "dataset.parquet").is_file()
    # an unreachable Hub: exit 3, one line naming the repo, the results kept
    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    assert sweep.main([local, "--name", "me/newrepo", *args]) == 3
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.startswith("hf-flag sweep: error: --push-to-hub: me/newrepo: not pushed:") and "reachable" in line
    assert len(pushed(hub, "me/newrepo")) == 1
