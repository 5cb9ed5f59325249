"""Hub ids through huggingface_hub against a local Hub server (tests/hub_server.py): which files are fetched, the
cache, revision pinning, errors, a dropped connection resumed.  No mock of huggingface_hub: real HTTP on 127.0.0.1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_flag.errors import WeightSourceError
from hf_flag.weights import hub as hub_module
from hf_flag.weights.sources import open_weights, provenance

from tests.conftest import make_tiny_llama

REPO = "tiny-org/tiny-llama"
NEVER = ("tokenizer.json", "tokenizer_config.json", "pytorch_model.bin", "README.md", "optimizer.pt")


def checkpoint_files(tmp_path: Path, seed: int = 0, shard_size: str = "20KB") -> dict[str, bytes]:
    """A 2-layer tiny Llama saved in several safetensors shards, plus files the analysis must never fetch."""
    folder = tmp_path / f"ckpt-{seed}"
    make_tiny_llama(seed).save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert "model.safetensors.index.json" in files and sum(n.endswith(".safetensors") for n in files) >= 3
    files.update({n: b"not for hf-flag " + n.encode() for n in NEVER})
    return files


def state_of(source) -> dict[str, torch.Tensor]:
    return {k: source.get(k) for k in source.keys()}


def test_hub_id_into_empty_cache_fetches_only_config_index_and_shards(hub, tmp_path):
    files = checkpoint_files(tmp_path)
    sha = hub.add_repo(REPO, files)
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    with open_weights(REPO) as src:
        got = state_of(src)
        prov = provenance(src)
    expected = {}
    for shard in shards:
        expected.update(load_file(tmp_path / "ckpt-0" / shard))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    fetched = sorted(p.rsplit("/", 1)[1] for m, p, _ in hub.log if m == "GET" and "/resolve/" in p)
    assert fetched == sorted(["config.json", "model.safetensors.index.json", *shards])
    assert prov == {"source": "hub", "repo_id": REPO, "revision": "main", "sha": sha, "format": "safetensors",
                    "files": ["config.json", "model.safetensors.index.json", *shards]}
    # cache first: a second open fetches no file (one API call resolves main to its sha)
    before = len(hub.log)
    with open_weights(REPO) as src:
        assert torch.equal(src.get("model.layers.1.mlp.up_proj.weight"), expected["model.layers.1.mlp.up_proj.weight"])
    assert [m for m, p, _ in hub.log[before:]] == ["GET"] and "/api/models/" in hub.log[before][1]


def test_offline_mode_reads_the_cache_without_a_request(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    sha = hub.add_repo(REPO, checkpoint_files(tmp_path))
    open_weights(REPO).close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.log)
    with open_weights(REPO) as src:
        assert provenance(src)["sha"] == sha and src.config["model_type"] == "llama"
    assert len(hub.log) == before
    with pytest.raises(WeightSourceError, match=r"^Hub model 'tiny-org/other' is not in the HF cache .* "
                                                r"HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it"):
        open_weights("tiny-org/other")


def test_revision_pins_branch_tag_and_commit(hub, tmp_path):
    first = hub.add_repo(REPO, checkpoint_files(tmp_path, seed=0))
    hub.add_repo(REPO, {"config.json": b"x"}, branch="v1")  # placeholder, replaced below by the tag's real files
    hub.repos[("model", REPO)].refs["v1"] = first
    second = hub.add_repo(REPO, checkpoint_files(tmp_path, seed=1))
    key = "model.layers.0.self_attn.o_proj.weight"
    w0, w1 = (make_tiny_llama(s).state_dict()[key] for s in (0, 1))
    for revision, sha, weight in ((None, second, w1), ("main", second, w1), (first, first, w0), ("v1", first, w0)):
        with open_weights(REPO, revision=revision) as src:
            assert provenance(src)["sha"] == sha and torch.equal(src.get(key), weight), revision
            assert provenance(src)["revision"] == (revision or "main")
    with pytest.raises(WeightSourceError, match=r"^Hub model 'tiny-org/tiny-llama' has no revision 'v9' \(HTTP 404\); "
                                                r"pass a branch, tag or commit sha that exists to --revision$"):
        open_weights(REPO, revision="v9")


def test_404_401_403_are_one_line_errors_and_the_token_is_never_written(hub, tmp_path, monkeypatch):
    files = checkpoint_files(tmp_path)
    hub.add_repo("tiny-org/private", files, private=True, readers={"hf_reader_secret"})
    hub.add_repo("tiny-org/gated", files, gated=True, readers={"hf_reader_secret"})
    with pytest.raises(WeightSourceError, match=r"^Hub model 'tiny-org/absent' was not found, or is private and your "
                                                r"token may not read it \(HTTP 404\); check the id, or log in"):
        open_weights("tiny-org/absent")
    with pytest.raises(WeightSourceError, match=r"^Hub model 'tiny-org/private' was not found, or is private .*"
                                                r"\(HTTP 401\)"):
        open_weights("tiny-org/private")
    with pytest.raises(WeightSourceError, match=r"^Hub model 'tiny-org/gated' is gated \(HTTP 403\): accept its "
                                                r"conditions"):
        open_weights("tiny-org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_reader_secret")  # huggingface_hub's own token lookup
    for repo in ("tiny-org/private", "tiny-org/gated"):
        with open_weights(repo) as src:
            assert src.config["model_type"] == "llama"
    assert any(h.get("Authorization") == "Bearer hf_reader_secret" for _, _, h in hub.log)
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and b"hf_reader_secret" in p.read_bytes()]
    assert leaks == []


def test_connection_dropped_half_way_is_resumed_with_a_range_request(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    files = checkpoint_files(tmp_path)
    hub.add_repo(REPO, files)
    shard = sorted(n for n in files if n.endswith(".safetensors"))[1]
    # huggingface_hub writes whole chunks (10 MB by default); a small chunk lets a small shard be cut half way
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    half = len(files[shard]) // 2 // 1024 * 1024
    assert 0 < half < len(files[shard])
    hub.drop_after[(REPO, shard)] = half
    with open_weights(REPO) as src:
        assert src.config["model_type"] == "llama"
    ranges = [h.get("Range") for h in hub.gets("/" + shard)]
    assert ranges == [None, f"bytes={half}-"]  # the second request asks for the rest only
    blobs = [p for p in (hub.cache / f"models--{REPO.replace('/', '--')}" / "blobs").iterdir()]
    assert any(p.read_bytes() == files[shard] for p in blobs)


def test_weight_file_choice():
    names = ["README.md", "tokenizer.json", "config.json", "model.safetensors", "pytorch_model.bin"]
    assert hub_module.weight_files("o/m", names) == ["config.json", "model.safetensors"]
    ggufs = ["m.Q4_1.gguf", "m-Q8_0.gguf", "m.F16.gguf", "m-f32-00001-of-00002.gguf", "tokenizer.json"]
    assert hub_module.weight_files("o/m", ggufs) == ["m.F16.gguf"]
    assert hub_module.weight_files("o/m", ggufs, gguf_file="m.Q4_1.gguf") == ["m.Q4_1.gguf"]
    assert hub_module.gguf_choice(["b.Q4_0.gguf", "a.Q4_1.gguf", "c.q8_0.gguf"]) == "c.q8_0.gguf"
    with pytest.raises(WeightSourceError, match=r"^Hub model 'o/m' has no file 'x.gguf' \(GGUF files: m-Q8_0.gguf, "):
        hub_module.weight_files("o/m", ggufs, gguf_file="x.gguf")
    with pytest.raises(WeightSourceError, match=r"^Hub model 'o/m' has only pickle weights \(pytorch_model.bin\).*"
                                                r"--allow-pickle"):
        hub_module.weight_files("o/m", ["config.json", "pytorch_model.bin"])
    assert hub_module.weight_files("o/m", ["config.json", "pytorch_model.bin"], allow_pickle=True) == [
        "config.json", "pytorch_model.bin"]
    with pytest.raises(WeightSourceError, match=r"^Hub model 'o/m' has no weights hf-flag reads"):
        hub_module.weight_files("o/m", ["README.md"])


def provenance_sha(hub) -> str:
    return hub.repos[("model", REPO)].refs["main"]


def test_cli_analyze_hub_id_at_a_revision_reports_its_sha(hub, tmp_path, capsys):
    from hf_flag.cli import main

    first = hub.add_repo(REPO, checkpoint_files(tmp_path, seed=0))
    hub.add_repo(REPO, checkpoint_files(tmp_path, seed=1))
    assert main(["analyze", REPO, "--revision", first, "--diagnostics", "mlp", "--json"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed.strip().splitlines()[-1])  # JSON Lines; an imported library may print a line first
    assert report["model"] == REPO and report["params"]["provenance"]["sha"] == first
    assert main(["analyze", REPO, "--revision", "main", "--diagnostics", "mlp"]) == 0
    table = capsys.readouterr().out
    assert f"  weights: {REPO} at {provenance_sha(hub)[:12]}, safetensors, stored as float32; hf-flag " in table
    assert main(["analyze", "tiny-org/absent", "--diagnostics", "mlp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hf-flag: error: Hub model 'tiny-org/absent' was not found")


def test_max_disk_streams_shard_by_shard_with_values_of_the_full_copy(hub, tmp_path):
    from hf_flag import analyze

    files = checkpoint_files(tmp_path)
    hub.add_repo(REPO, files)
    shards = hub_module.shard_names(tmp_path / "ckpt-0" / "model.safetensors.index.json")
    sizes = [len(files[s]) for s in shards]
    budget = sorted(sizes)[-1] + sorted(sizes)[-2]  # room for the two largest shards, not for the model
    assert budget < sum(sizes)
    with open_weights(REPO, max_disk_bytes=budget) as src:
        assert provenance(src)["max_disk_bytes"] == budget and src.nbytes() == sum(sizes)
        streamed = analyze(src, composition="adjacent")
        weight_map = json.loads(files["model.safetensors.index.json"])["weight_map"]
        blocks = {shard for name, shard in weight_map.items() if name.startswith("model.layers.")}
        assert 0 < src.peak_bytes <= budget and set(src.fetches) == blocks  # embeddings-only shards: never fetched
        fetches = list(src.fetches)
    snapshot = hub.cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
    assert not [p for p in snapshot.rglob("*.safetensors")]  # every fetched shard evicted at close
    full = analyze(tmp_path / "ckpt-0", composition="adjacent")
    assert [(r.kind, r.layer, r.source, r.target, r.values) for r in streamed.rows] == [
        (r.kind, r.layer, r.source, r.target, r.values) for r in full.rows]
    assert streamed.summary == full.summary
    assert len([h for h in hub.gets(".safetensors") if not h.get("Range", "").startswith("bytes=0-")
                and not h.get("Range", "").startswith("bytes=8-")]) == len(fetches)
    with pytest.raises(WeightSourceError, match=r"^--max-disk 1e-06 GB is smaller than shard .* raise --max-disk"):
        open_weights(REPO, max_disk_bytes=1000)


def blob_links(hub, sha: str) -> dict[str, bytes]:
    """Every file of the cached snapshot ``sha`` of REPO, read through its link."""
    folder = hub.cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / sha
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_max_disk_eviction_keeps_blobs_another_revision_links_to(hub, tmp_path):
    files = checkpoint_files(tmp_path)
    old = hub.add_repo(REPO, files, branch="old")
    config = json.loads(files["config.json"])
    new = hub.add_repo(REPO, {**files, "config.json": json.dumps({**config, "note": "v2"}).encode()})
    assert old != new  # two commits sharing every shard's bytes (the same blobs in the cache)
    shards = hub_module.shard_names(tmp_path / "ckpt-0" / "model.safetensors.index.json")
    open_weights(REPO, revision="old").close()  # the old revision, fully cached
    blobs = hub.cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    before = sorted(p.name for p in blobs.iterdir())
    budget = 2 * max(len(files[s]) for s in shards)
    with open_weights(REPO, max_disk_bytes=budget) as src:
        assert provenance(src)["sha"] == new
        for key in src.keys():
            src.get(key)
        assert src.fetches  # the new revision's shards went through the streaming cache (linked, then evicted)
    assert {n: b for n, b in blob_links(hub, old).items() if n in shards} == {s: files[s] for s in shards}
    assert not [n for n in blob_links(hub, new) if n in shards]  # the streamed revision's links are gone
    assert sorted(p.name for p in blobs.iterdir()) == sorted({*before, *[  # only the new config's blob was added
        p.name for p in blobs.iterdir() if p.read_bytes() == json.dumps({**config, "note": "v2"}).encode()]})


def test_max_disk_eviction_deletes_a_blob_only_this_revision_links_to(hub, tmp_path):
    files = checkpoint_files(tmp_path)
    hub.add_repo(REPO, files)
    shards = hub_module.shard_names(tmp_path / "ckpt-0" / "model.safetensors.index.json")
    with open_weights(REPO, max_disk_bytes=2 * max(len(files[s]) for s in shards)) as src:
        for key in src.keys():
            src.get(key)
    blobs = hub.cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert not [p for p in blobs.iterdir() if p.read_bytes() in {files[s] for s in shards}]


def test_max_disk_eviction_without_delete_files_keeps_shared_blobs(hub, tmp_path, monkeypatch):
    """huggingface_hub before HFCacheInfo.delete_files: the same rule from the scan."""
    from huggingface_hub.utils import _cache_manager

    monkeypatch.delattr(_cache_manager.HFCacheInfo, "delete_files")
    test_max_disk_eviction_keeps_blobs_another_revision_links_to(hub, tmp_path)


def streamed_repo_missing_a_shard(hub, tmp_path, *, headers_too: bool) -> tuple[str, float]:
    """REPO whose one block shard the Hub stopped serving (its header too, or only its downloads); returns that
    shard and a --max-disk budget in GB that streams."""
    files = checkpoint_files(tmp_path)
    shards = hub_module.shard_names(tmp_path / "ckpt-0" / "model.safetensors.index.json")
    gone = shards[len(shards) // 2]
    hub.add_repo(REPO, {n: b for n, b in files.items() if n != gone} if headers_too else files)
    if not headers_too:
        hub.missing_downloads.add((REPO, gone))
    return gone, 2 * max(len(files[s]) for s in shards) / 1e9


@pytest.mark.parametrize("headers_too", [True, False], ids=["header-read", "download"])
def test_cli_max_disk_shard_404_mid_stream_is_one_line_exit_2(hub, tmp_path, capsys, headers_too):
    from hf_flag.cli import main

    gone, budget = streamed_repo_missing_a_shard(hub, tmp_path, headers_too=headers_too)
    assert main(["analyze", REPO, "--max-disk", repr(budget), "--diagnostics", "mlp"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("hf-flag")] == [
        f"hf-flag: error: Hub model {REPO!r} lists {gone!r} but the Hub does not serve it (HTTP 404); retry later or "
        f"pass a local folder"]


def test_offline_finds_a_tag_and_a_sha_read_online_before(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    first = hub.add_repo(REPO, checkpoint_files(tmp_path, seed=0))
    hub.repos[("model", REPO)].refs["v1"] = first
    second = hub.add_repo(REPO, checkpoint_files(tmp_path, seed=1))
    for revision in ("v1", None, first):
        open_weights(REPO, revision=revision).close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.log)
    for revision, sha in (("v1", first), (None, second), ("main", second), (first, first)):
        with open_weights(REPO, revision=revision) as src:
            assert provenance(src)["sha"] == sha, revision
    assert len(hub.log) == before
    with pytest.raises(WeightSourceError, match=r"^Hub model 'tiny-org/tiny-llama' at revision 'v2' is not in the HF "
                                                r"cache .* HF_HUB_OFFLINE is set"):
        open_weights(REPO, revision="v2")


def test_unreachable_hub_reads_a_revision_cached_before(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    sha = hub.add_repo(REPO, checkpoint_files(tmp_path))
    open_weights(REPO).close()
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing answers there
    with open_weights(REPO) as src:
        assert provenance(src)["sha"] == sha
    with pytest.raises(WeightSourceError, match=r"^Hub model 'tiny-org/other' is not in the HF cache .* the Hub is "
                                                r"unreachable .*; connect to download it"):
        open_weights("tiny-org/other")
