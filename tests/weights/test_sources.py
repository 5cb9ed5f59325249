"""Weight sources: every implementation against an independent reading path (MATH.md is not involved here)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_flag.errors import HfFlagError, WeightSourceError
from hf_flag.weights import safetensors_source
from hf_flag.weights.gguf_source import gguf_name_table, quant_eps, reverse_permute
from hf_flag.weights.sources import (GGUFSource, ModuleSource, SafetensorsSource, TorchPickleSource, WeightSource,
                                     open_weights)


# ---------------------------------------------------------------- in-memory modules
def test_module_source_is_a_view_of_the_state_dict(tiny_llama):
    src = open_weights(tiny_llama)
    assert isinstance(src, ModuleSource) and isinstance(src, WeightSource)
    state = tiny_llama.state_dict()
    assert src.keys() == list(state)
    assert src.config["model_type"] == "llama" and src.config["num_key_value_heads"] == 2
    name = "model.layers.1.self_attn.k_proj.weight"
    assert src.shape(name) == (16, 32)
    # no copy: same storage as the live parameter
    assert src.get(name).data_ptr() == tiny_llama.model.layers[1].self_attn.k_proj.weight.data_ptr()
    got = src.get(name, dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, state[name].double())
    assert src.storage_dtype(name) == "float32" and src.storage_eps(name) == torch.finfo(torch.float32).eps


def test_module_source_plain_sequential_and_bf16():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(torch.bfloat16)
    src = open_weights(mlp)
    assert src.config == {} and src.name == "Sequential"
    assert src.keys() == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert src.storage_dtype("2.weight") == "bfloat16"
    assert src.storage_eps("2.weight") == 2.0 ** -7
    w = src.get("2.weight", dtype=torch.float64)
    assert torch.equal(w, mlp[2].weight.detach().double())
    assert src.nbytes() == sum(p.numel() * 2 for p in mlp.parameters())


def test_module_source_tied_weights_counted_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    src = open_weights(model)
    assert set(src.keys()) == {"emb.weight", "head.weight"}
    assert src.nbytes() == 10 * 4 * 4


def test_module_source_missing_tensor_and_meta_device():
    with torch.device("meta"):
        lin = nn.Linear(3, 2)
    src = open_weights(lin)
    with pytest.raises(WeightSourceError, match="meta device"):
        src.get("weight")
    with pytest.raises(WeightSourceError, match="'nope' is not in"):
        src.get("nope")
    assert issubclass(WeightSourceError, ValueError) and issubclass(WeightSourceError, HfFlagError)


def test_open_weights_rejects_other_objects():
    with pytest.raises(WeightSourceError, match="int is not supported"):
        open_weights(3)
    src = open_weights(nn.Linear(2, 2))
    assert open_weights(src) is src


# ---------------------------------------------------------------- safetensors

def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(3, 5, generator=g).to(torch.float16),
        "c.weight": torch.randn(2, 3, generator=g),
        "c.bias": torch.randn(2, generator=g, dtype=torch.float64),
        "steps": torch.arange(4),
    }


@pytest.fixture()
def mixed_file(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(_mixed_tensors(), str(path))
    return path


def test_safetensors_single_file_matches_load_file(mixed_file):
    ref = load_file(str(mixed_file))
    with open_weights(mixed_file) as src:
        assert isinstance(src, SafetensorsSource) and src.name == "mixed.safetensors" and src.config == {}
        assert sorted(src.keys()) == sorted(ref)
        for k, t in ref.items():
            got = src.get(k)
            assert got.dtype == t.dtype and torch.equal(got, t) and src.shape(k) == tuple(t.shape)
        assert src.nbytes() == sum(t.numel() * t.element_size() for t in ref.values())
        expected = {"a.weight": ("bfloat16", 2.0 ** -7), "b.weight": ("float16", 2.0 ** -10),
                    "c.weight": ("float32", 2.0 ** -23), "c.bias": ("float64", 2.0 ** -52)}
        for k, (dt, eps) in expected.items():
            assert (src.storage_dtype(k), src.storage_eps(k)) == (dt, eps)
        assert src.storage_dtype("steps") == "int64"  # integers have no storage precision: not a real weight
        with pytest.raises(WeightSourceError, match="'steps' of 'mixed.safetensors' is stored as int64"):
            src.storage_eps("steps")


def test_unsigned_and_unknown_safetensors_dtypes(tmp_path):
    """U16/U32/U64 (written by the safetensors library) read back exactly as integers; they have no storage
    precision and are refused as real values (integer-quantised weights); a dtype code hf-flag does not know opens
    (its header is valid) but reading it names the tensor and the code."""
    values = torch.tensor([1, 2, 60000], dtype=torch.int64)
    save_file({f"u{b}": values.to(getattr(torch, f"uint{b}")) for b in (16, 32, 64)}, str(tmp_path / "u.safetensors"))
    with open_weights(tmp_path / "u.safetensors") as src:
        for b in (16, 32, 64):
            assert src.storage_dtype(f"u{b}") == f"uint{b}"
            assert torch.equal(src.get(f"u{b}", dtype=torch.int64), values)
            for refused in (lambda: src.storage_eps(f"u{b}"), lambda: src.get(f"u{b}", dtype=torch.float64)):
                with pytest.raises(WeightSourceError, match=f"'u{b}' of .* stored as uint{b}: an integer-quantised"):
                    refused()
    _write_safetensors_by_hand(tmp_path / "odd.safetensors",
                               {"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 2]}}, {"w": b"ab"}, 2)
    with open_weights(tmp_path / "odd.safetensors") as src:
        with pytest.raises(WeightSourceError, match="tensor 'w' .* safetensors dtype 'X9', which hf-flag cannot read"):
            src.get("w")


def test_low_precision_storage_upcasts_exactly(mixed_file):
    orig = _mixed_tensors()
    with open_weights(mixed_file) as src:
        for k in ("a.weight", "b.weight"):
            up = src.get(k, dtype=torch.float64)
            assert up.dtype == torch.float64
            assert torch.equal(up, orig[k].double())  # bf16/fp16 -> float64 is lossless
            assert torch.equal(up.to(orig[k].dtype), orig[k])  # and round-trips back


def test_folder_checkpoint_matches_model(tiny_checkpoint, tiny_llama):
    state = tiny_llama.state_dict()
    with open_weights(tiny_checkpoint) as src:
        assert src.name == tiny_checkpoint.name
        assert src.config["model_type"] == "llama" and src.config["num_hidden_layers"] == 2
        assert set(src.keys()) <= set(state) and "model.layers.1.mlp.down_proj.weight" in src
        for k in src.keys():
            assert torch.equal(src.get(k), state[k])


def test_sharded_index_equals_single_file(tmp_path, tiny_llama, tiny_checkpoint):
    sharded = tmp_path / "sharded"
    tiny_llama.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    with open_weights(tiny_checkpoint) as single, open_weights(sharded) as multi, \
            open_weights(sharded / "model.safetensors.index.json") as by_index:
        assert sorted(multi.keys()) == sorted(single.keys()) == sorted(by_index.keys())
        assert multi.files() == shards and multi.nbytes() == single.nbytes()
        for k in single.keys():
            assert torch.equal(multi.get(k), single.get(k)) and torch.equal(by_index.get(k), single.get(k))


def test_get_reads_only_the_requested_tensor(monkeypatch, tiny_checkpoint):
    calls: list[tuple[int, int]] = []
    real = safetensors_source.pread_into

    def counting(fd, buffer, offset):
        calls.append((offset, buffer.numel()))
        return real(fd, buffer, offset)

    monkeypatch.setattr(safetensors_source, "pread_into", counting)
    name = "model.layers.0.mlp.up_proj.weight"
    with open_weights(tiny_checkpoint) as src:
        src.keys(), src.shape(name), src.nbytes()
        assert calls == []  # metadata comes from the header alone
        got = src.get(name, dtype=torch.float64)
    assert len(calls) == 1 and calls[0][1] == got.numel() * 4  # one read of exactly this float32 tensor's bytes
    from safetensors import safe_open

    with safe_open(str(next(tiny_checkpoint.glob("*.safetensors"))), framework="pt") as ref:
        assert torch.equal(got, ref.get_tensor(name).double())


def _rss_file() -> int:
    """Resident file-backed pages of this process (bytes), from /proc/self/status."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssFile from /proc/self/status")
def test_reading_every_tensor_leaves_no_file_pages_resident(tmp_path):
    """A memory-mapped reader keeps each page it read resident (RssFile grows to the file size); pread does not."""
    n = 8 * 2 ** 20  # 8 Mi float32 = 32 MiB per tensor, 96 MiB in all
    tensors = {f"t{i}": torch.full((n,), float(i), dtype=torch.float32) for i in range(3)}
    entries = {k: {"dtype": "F32", "shape": [n], "data_offsets": [i * 4 * n, (i + 1) * 4 * n]}
               for i, k in enumerate(tensors)}
    path = tmp_path / "three.safetensors"
    _write_safetensors_by_hand(path, entries, {k: t.numpy().tobytes() for k, t in tensors.items()}, 12 * n)
    before = _rss_file()
    with open_weights(path) as src:
        for k, t in tensors.items():
            got = src.get(k)
            assert torch.equal(got, t)
            del got
        grown = _rss_file() - before
    assert grown < 8 * 2 ** 20, f"file-backed RSS grew by {grown / 2 ** 20:.0f} MiB reading a 96 MiB file"


def _write_safetensors_by_hand(path, entries: dict, data: dict[str, bytes], data_size: int) -> None:
    """A safetensors file written from its spec (not by the safetensors library); unwritten data stays sparse."""
    header = json.dumps(entries).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        start = fh.tell()
        for name, payload in data.items():
            fh.seek(start + entries[name]["data_offsets"][0])
            fh.write(payload)
        fh.truncate(start + data_size)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc/self/statm")
def test_lazy_read_of_large_file_keeps_rss_small(tmp_path):
    big = 64 * 2 ** 20  # 64 Mi float32 = 256 MiB, sparse on disk
    small = torch.arange(16, dtype=torch.float32)
    entries = {"big": {"dtype": "F32", "shape": [big], "data_offsets": [0, 4 * big]},
               "small": {"dtype": "F32", "shape": [4, 4], "data_offsets": [4 * big, 4 * big + 64]}}
    path = tmp_path / "large.safetensors"
    _write_safetensors_by_hand(path, entries, {"small": small.numpy().tobytes()}, 4 * big + 64)

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    with open_weights(path) as src:
        got = src.get("small", dtype=torch.float64)
        grown = rss() - before
        assert src.nbytes() == 4 * big + 64 and src.shape("big") == (big,)
    assert torch.equal(got, small.double().reshape(4, 4))
    assert grown < 32 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.0f} MiB reading a 64-byte tensor"


# ---------------------------------------------------------------- Hub ids from the local cache (offline)
def _fake_hf_cache(root, repo_id: str, files_from) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files_from.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())


def test_hub_id_resolves_from_local_cache_only(tmp_path, monkeypatch, tiny_checkpoint, tiny_llama):
    cache = tmp_path / "hub"
    _fake_hf_cache(cache, "tiny-org/tiny-llama", tiny_checkpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with open_weights("tiny-org/tiny-llama") as src:
        assert src.name == "tiny-org/tiny-llama" and src.config["model_type"] == "llama"
        k = "model.layers.0.self_attn.v_proj.weight"
        assert torch.equal(src.get(k), tiny_llama.state_dict()[k])
    with pytest.raises(WeightSourceError, match=r"^Hub model 'tiny-org/absent' is not in the HF cache \(.*hub\) and "
                                                r"HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it"):
        open_weights("tiny-org/absent")
    with pytest.raises(WeightSourceError, match="at revision 'v2'"):
        open_weights("tiny-org/tiny-llama", revision="v2")


# ---------------------------------------------------------------- bad input
def test_missing_path_and_folder_without_weights(tmp_path):
    with pytest.raises(WeightSourceError, match="does not exist"):
        open_weights(tmp_path / "nowhere")
    with pytest.raises(WeightSourceError, match="does not exist"):
        open_weights("./nowhere/model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(WeightSourceError, match="has no weights"):
        open_weights(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightSourceError, match="not a known weight format"):
        open_weights(tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightSourceError, match="config.json' is not valid JSON"):
        open_weights(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-10], "ends at byte"),  # truncated download
    (lambda b: b[:4], "shorter than the 8-byte header"),
    (lambda b: struct.pack("<Q", 10 ** 12) + b[8:], "exceeds the file size"),
    (lambda b: b[:8] + b"\xff" * (len(b) - 8), "not valid JSON"),
])
def test_corrupted_safetensors_fail_at_open(mixed_file, damage, message):
    mixed_file.write_bytes(damage(mixed_file.read_bytes()))
    with pytest.raises(WeightSourceError, match=message):
        open_weights(mixed_file)


def test_header_inconsistent_with_shape_fails(tmp_path):
    entries = {"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 32]}}
    path = tmp_path / "bad.safetensors"
    _write_safetensors_by_hand(path, entries, {}, 32)
    with pytest.raises(WeightSourceError, match=r"declares shape \[3, 3\] F32 but 32 bytes"):
        open_weights(path)


def test_index_errors(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    moved = tmp_path / "moved.bak"
    (tmp_path / first).rename(moved)
    with pytest.raises(WeightSourceError, match=f"lists shard '{first}', which is missing"):
        open_weights(tmp_path)
    moved.rename(tmp_path / first)
    data["weight_map"]["ghost.weight"] = first
    index.write_text(json.dumps(data))
    with pytest.raises(WeightSourceError, match="puts tensor 'ghost.weight'"):
        open_weights(tmp_path)
    index.write_text("[]")
    with pytest.raises(WeightSourceError, match="'weight_map'"):
        open_weights(tmp_path)


def test_duplicate_tensor_across_files_and_closed_source(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(WeightSourceError, match="appears in both 'a.safetensors' and 'b.safetensors'"):
        open_weights(tmp_path)
    src = open_weights(tmp_path / "b.safetensors")
    src.close()
    with pytest.raises(WeightSourceError, match="were closed"):
        src.get("w")
    assert src.shape("w") == (2,) and src.storage_dtype("w") == "float32"


# ---------------------------------------------------------------- pickle (opt-in)
def test_pickle_requires_opt_in_and_then_matches(tmp_path, tiny_llama):
    state = tiny_llama.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama.config.to_dict()))
    with pytest.raises(WeightSourceError, match=r"pass allow_pickle=True \(CLI: --allow-pickle\)"):
        open_weights(tmp_path)
    with pytest.raises(WeightSourceError, match="allow_pickle=True"):
        open_weights(tmp_path / "pytorch_model.bin")
    with open_weights(tmp_path, allow_pickle=True) as src:
        assert isinstance(src, TorchPickleSource) and src.config["model_type"] == "llama"
        assert src.keys() == list(state)
        k = "model.layers.1.mlp.gate_proj.weight"
        assert torch.equal(src.get(k), state[k]) and src.storage_dtype(k) == "float32"
        assert src.nbytes() == sum(t.numel() * t.element_size() for t in state.values())


class _NotATensor:
    pass


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "evil": _NotATensor()}, tmp_path / "model.pt")
    with pytest.raises(WeightSourceError, match="cannot be loaded safely"):
        open_weights(tmp_path / "model.pt", allow_pickle=True)
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2, 2)}}, tmp_path / "ckpt.pt")
    with open_weights(tmp_path / "ckpt.pt", allow_pickle=True) as src:
        assert src.keys() == ["w"] and torch.equal(src.get("w"), torch.ones(2, 2))


# ---------------------------------------------------------------- GGUF
def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (the forward direction)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_reverse_permute_inverts_llama_cpp(n_head):
    w = torch.randn(n_head * 8, 5, generator=torch.Generator().manual_seed(n_head))
    assert torch.equal(reverse_permute(_llama_cpp_permute(w, n_head), n_head), w)
    assert not torch.equal(_llama_cpp_permute(w, n_head), w)
    with pytest.raises(WeightSourceError, match="heads of even size"):
        reverse_permute(torch.zeros(6, 2), 2)


def test_gguf_names_and_precision():
    from hf_flag.weights.adapters.table import ARCHITECTURES

    names = gguf_name_table(ARCHITECTURES["llama"], "llama", 13,
                            ["blk.12.attn_q.weight", "output.weight", "rope_freqs.weight", "token_embd.weight"])
    assert names["blk.12.attn_q.weight"] == "model.layers.12.self_attn.q_proj.weight"
    assert names["blk.0.ffn_down.weight"] == "model.layers.0.mlp.down_proj.weight"
    assert names["output.weight"] == "lm_head.weight" and names["token_embd.weight"] == "model.embed_tokens.weight"
    assert "rope_freqs.weight" not in names  # kept unchanged by the source
    assert quant_eps("Q4_1") == quant_eps("Q4_K") == 2.0 ** -4 and quant_eps("Q8_0") == 2.0 ** -8
    assert quant_eps("F16") == 2.0 ** -10 and quant_eps("I32") == 0.0
    with pytest.raises(WeightSourceError, match="no known precision"):
        quant_eps("FP8_E4M3")


@pytest.mark.pretrained
def test_gguf_matches_transformers_loader(smollm2_gguf):
    """Against transformers' GGUF loader, step by step as ``load_gguf_checkpoint(return_tensors=True)`` runs it
    (its config parse; gguf-py's HF -> GGUF name map as ``get_gguf_hf_weights_map`` applies it; dequantise +
    ``LlamaTensorProcessor`` un-permutation), for three layers and the embedding rather than the whole model
    (loading all 272 tensors through ``from_pretrained`` gives the same result but takes ~4x longer)."""
    from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, load_gguf_checkpoint

    ref_cfg = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=False)["config"]
    processor = TENSOR_PROCESSORS["llama"](config=ref_cfg)
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, ref_cfg["num_hidden_layers"])
    raw = {t.name: t for t in GGUFReader(str(smollm2_gguf)).tensors}
    wanted = ["model.embed_tokens.weight"] + [
        f"model.layers.{layer}.{part}.weight" for layer in (0, 14, 29)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    ref = {}
    for hf_name in wanted:
        t = raw[name_map.get_name(hf_name.removesuffix(".weight")) + ".weight"]
        result = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name)
        ref[hf_name] = torch.from_numpy(np.copy(result.weights))

    with open_weights(smollm2_gguf) as src:
        assert isinstance(src, GGUFSource)
        cfg = src.config
        for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
            assert cfg[key] == ref_cfg[key], key
        # the file has no attention.key_length: head_dim is hidden / heads (transformers: rope.dimension_count)
        from hf_flag.weights.adapters import get_adapter

        layout = get_adapter(cfg, src.keys()).layout(cfg, src.keys())
        assert (layout.n_kv_heads, layout.head_dim, layout.activation) == (3, ref_cfg["head_dim"], "silu")
        # every HF name maps back (through gguf-py's map) onto a distinct GGUF tensor, and all are covered
        back = {"{}.{}".format(name_map.get_name(k.rsplit(".", 1)[0]), k.rsplit(".", 1)[1]) for k in src.keys()}
        assert back == set(raw) and len(src.keys()) == len(raw)
        assert "lm_head.weight" not in src  # tied to the embedding
        q = "model.layers.0.self_attn.q_proj.weight"
        assert (src.storage_dtype(q), src.storage_eps(q), src.shape(q)) == ("Q4_1", 2.0 ** -4, (576, 576))
        assert src.storage_dtype("model.norm.weight") == "float32"
        assert src.storage_dtype("model.embed_tokens.weight") == "Q8_0"
        for k, expected in ref.items():
            assert torch.equal(src.get(k, dtype=torch.float64), expected.double()), k
    assert src.shape(q) == (576, 576) and src.storage_dtype(q) == "Q4_1"  # metadata survives close()
    with pytest.raises(WeightSourceError, match="were closed"):
        src.get(q)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_torch_dequantize_equals_gguf_py(type_name):
    """hf-flag's torch dequantisation of the block types it handles itself is bitwise gguf-py's ``dequantize``
    (the reference), on random blocks quantised by gguf-py, including zero blocks and both nibble halves."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from hf_flag.weights.gguf_source import dequantize_blocks

    rng = np.random.default_rng(0)
    values = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 10.0, (64, 1))).astype(np.float32)
    values[3] = 0.0
    qtype = GGMLQuantizationType[type_name]
    data = quantize(values, qtype)
    expected = np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(-1)
    got = dequantize_blocks(data.tobytes(), type_name).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert np.abs(got - values.reshape(-1)).max() <= np.abs(values).max() / 8  # and it is the data, roughly


def test_parse_gguf_agrees_with_gguf_reader(smollm2_gguf):
    """Our one-pass header parser against gguf-py's GGUFReader: every scalar/string metadata value, and each
    tensor's type, dims and absolute data offset (arrays, e.g. the tokenizer, are skipped by design)."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType

    from hf_flag.weights.gguf_source import parse_gguf

    meta, tensors = parse_gguf(smollm2_gguf)
    reader = GGUFReader(str(smollm2_gguf))
    checked = 0
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or field.types[0] == GGUFValueType.ARRAY:
            assert meta.get(key) is None
            continue
        value = field.contents()
        assert meta[key] == (value.item() if isinstance(value, np.generic) else value), key
        checked += 1
    assert checked >= 10 and meta["general.architecture"] == "llama"
    assert [(t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
            for t in reader.tensors] == [(k, v.tensor_type, v.shape, v.offset, v.n_bytes) for k, v in tensors.items()]


def test_gguf_errors(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(WeightSourceError, match="corrupted or truncated"):
        open_weights(bad)


# ---------------------------------------------------------------- pretrained MiniLM folder
@pytest.mark.pretrained
def test_minilm_folder_opens_as_bert(minilm_path):
    with open_weights(minilm_path) as src:
        assert src.config["model_type"] == "bert"
        ref = load_file(str(minilm_path / "model.safetensors"))
        assert sorted(src.keys()) == sorted(ref)
        k = next(k for k in ref if k.endswith("attention.self.query.weight"))
        assert src.shape(k) == (384, 384) and torch.equal(src.get(k), ref[k])
        assert src.storage_eps(k) == torch.finfo(ref[k].dtype).eps


def _write_tiny_gguf(path, tensors: dict, *, arch: str = "llama", heads: int | None = 4, kv_heads: int = 2) -> None:
    """A GGUF file written by gguf-py's own ``GGUFWriter`` (HF-order numpy arrays; quantised ones as raw bytes)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    if heads is not None:
        writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_written_by_gguf_py_reads_back_as_hf_tensors(tmp_path):
    """No pretrained file needed: float tensors come back exactly, llama.cpp's Q/K row permutation is undone (the
    forward permutation is llama.cpp's converter code), F16 widens to float32 and Q8_0 equals gguf-py's dequantise."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(32, 32, generator=g), torch.randn(16, 32, generator=g)  # 4 heads / 2 KV heads of dim 8
    up, down = torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g).half()
    embed = torch.randn(10, 32, generator=g)
    up_q8 = quantize(up.numpy(), GGMLQuantizationType.Q8_0)
    _write_tiny_gguf(tmp_path / "tiny.gguf", {
        "token_embd.weight": (embed.numpy(), None),
        "blk.0.attn_q.weight": (_llama_cpp_permute(q, 4).numpy(), None),
        "blk.0.attn_k.weight": (_llama_cpp_permute(k, 2).numpy(), None),
        "blk.0.ffn_up.weight": (up_q8, GGMLQuantizationType.Q8_0),
        "blk.0.ffn_down.weight": (down.numpy(), None),
    })
    with open_weights(tmp_path / "tiny.gguf") as src:
        assert isinstance(src, GGUFSource)
        assert {k: src.config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "intermediate_size", "vocab_size",
                                           "tie_word_embeddings")} == {
            "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "vocab_size": 10, "tie_word_embeddings": True}
        assert "head_dim" not in src.config  # no attention.key_length: the adapters take hidden / heads = 8
        assert torch.equal(src.get("model.layers.0.self_attn.q_proj.weight"), q)
        assert torch.equal(src.get("model.layers.0.self_attn.k_proj.weight"), k)
        assert torch.equal(src.get("model.embed_tokens.weight"), embed)
        d = "model.layers.0.mlp.down_proj.weight"
        assert src.get(d).dtype == torch.float32 and torch.equal(src.get(d), down.float())
        u = "model.layers.0.mlp.up_proj.weight"
        assert src.shape(u) == (64, 32) and torch.equal(src.get(u), torch.from_numpy(
            dequantize(up_q8, GGMLQuantizationType.Q8_0)))
        assert [(src.storage_dtype(n), src.storage_eps(n)) for n in (d, u)] == [("float16", 2.0 ** -10),
                                                                              ("Q8_0", 2.0 ** -8)]
        assert src.nbytes() == (32 * 32 + 16 * 32 + 10 * 32) * 4 + 32 * 64 * 2 + 64 * 32 // 32 * 34  # Q8_0: 34 B/32


def test_gguf_other_architecture_or_missing_metadata_is_refused(tmp_path):
    from hf_flag.errors import UnsupportedArchitectureError

    weights = {"token_embd.weight": (np.zeros((10, 32), dtype=np.float32), None)}
    _write_tiny_gguf(tmp_path / "mamba.gguf", weights, arch="mamba")
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba.gguf'.*architecture 'mamba'.*safetensors"):
        open_weights(tmp_path / "mamba.gguf")
    _write_tiny_gguf(tmp_path / "headless.gguf", weights, heads=None)
    with pytest.raises(WeightSourceError, match=r"lacks metadata \['llama.attention.head_count'\]"):
        open_weights(tmp_path / "headless.gguf")


def test_pickle_shard_index_and_its_errors(tmp_path, tiny_llama):
    state = tiny_llama.state_dict()
    names = list(state)
    weight_map = {}
    for j in range(3):  # three shards and their index, as transformers' sharded torch.save writes them
        shard = f"pytorch_model-0000{j + 1}-of-00003.bin"
        torch.save({k: state[k] for k in names[j::3]}, tmp_path / shard)
        weight_map.update({k: shard for k in names[j::3]})
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_weights(tmp_path, allow_pickle=True) as src:
        assert isinstance(src, TorchPickleSource) and sorted(src.keys()) == sorted(state)
        for k in src.keys():
            assert torch.equal(src.get(k), state[k])
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = sorted(set(data["weight_map"].values()))[0]
    index.write_text(json.dumps(data))
    with open_weights(tmp_path, allow_pickle=True) as src:
        with pytest.raises(WeightSourceError, match="does not contain tensor 'ghost.weight' although its index"):
            src.get("ghost.weight")
    data["weight_map"]["ghost.weight"] = "absent.bin"
    index.write_text(json.dumps(data))
    with pytest.raises(WeightSourceError, match="lists shard 'absent.bin', which is missing"):
        open_weights(tmp_path, allow_pickle=True)


def test_pickle_files_with_the_same_tensor_are_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "b.pt")
    with pytest.raises(WeightSourceError, match="appears in both 'a.pt' and 'b.pt'"):
        open_weights(tmp_path, allow_pickle=True)


@pytest.mark.pretrained
def test_embedded_default_models_are_their_own_hub_name(minilm_path, smollm2_gguf, tmp_path):
    """MiniLM's config names its base model (``_name_or_path``: nreimers/MiniLM-L6-H384-uncased); the provenance
    names the model the weights are, as ``--default`` does (also for the weight file inside its folder).  A copy of
    the same files is a local copy: named by its folder, with no Hub name, never by ``_name_or_path``."""
    with open_weights(str(minilm_path)) as source:
        assert source.config["_name_or_path"] == "nreimers/MiniLM-L6-H384-uncased"
        assert source.provenance["hub_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    with open_weights(str(minilm_path / "model.safetensors")) as source:
        assert source.provenance["hub_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    with open_weights(str(smollm2_gguf)) as source:
        assert source.provenance["hub_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    copy = tmp_path / "mycopy"
    shutil.copytree(minilm_path, copy)
    for path, label in ((copy, "mycopy"), (copy / "model.safetensors", "model.safetensors")):
        with open_weights(str(path)) as source:
            assert source.provenance["hub_name"] is None and source.name == label
