"""The per-layer pass's memory contract (issue #11 item 4) and the allocation-free NaN/Inf check.

``per_layer_rows`` must hold one raw block at a time: when block i is read, no tensor of an earlier block is
alive except block i-1's down projection (carried for the residual pair i-1 -> i).  Checked with weak references
to every tensor a block hands out, on a 4-layer Llama read from safetensors (fresh tensors per read); the rows
must be those of ``analyze`` (which runs the same pass) and of a pass that loads every block up front.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_flag.analysis.api import analyze
from hf_flag.analysis.checks import all_finite, block_tensors
from hf_flag.analysis.transformer import per_layer_rows
from hf_flag.defaults import TRANSFORMER_DIAGNOSTICS
from hf_flag.rows import COMPOSITION_KINDS, KIND_RESIDUAL
from hf_flag.weights.adapters import get_adapter
from hf_flag.weights.sources import open_weights

N_LAYERS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("stream_llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def run_pass(folder, layers, *, keep_all: bool):
    """per_layer_rows over ``layers``; returns (rows, violations): tensors of earlier blocks alive at a read."""
    source = open_weights(str(folder))
    adapter = get_adapter(source.config, source.keys())
    layout = adapter.layout(source.config, source.keys())
    alive: dict[int, list[tuple[str, weakref.ref]]] = {}
    held, violations = [], []

    def load(i: int):
        for j, refs in alive.items():
            for name, ref in refs:
                if ref() is not None and not (j == i - 1 and name == "mlp_out"):
                    violations.append((i, j, name))
        block = adapter.block(source, layout, i, dtype=torch.float32, device="cpu")
        names = {id(t): n for n in ("mlp_in", "mlp_out", "mlp_gate") if (t := getattr(block.mlp, n)) is not None}
        alive[i] = [(names.get(id(t), "attention"), weakref.ref(t)) for t in block_tensors(block)]
        if keep_all:
            held.append([t for t in block_tensors(block)])
        return block

    rows = per_layer_rows("m", layout, layers, load, lambda i: adapter.block_storage_eps(source, layout, i),
                          diagnostics=frozenset(TRANSFORMER_DIAGNOSTICS), cheap=False, progress=False, window=True)
    source.close()
    return rows, violations


def key(r):
    return (r.kind, r.layer, r.target_layer, r.source, r.target)


@pytest.mark.parametrize("layers", [list(range(N_LAYERS)), [0, 2]])
def test_per_layer_pass_holds_one_block(checkpoint, layers):
    rows, violations = run_pass(checkpoint, layers, keep_all=False)
    assert violations == []
    # the detector sees a held block: keeping every block alive is reported
    _, seen_when_held = run_pass(checkpoint, layers, keep_all=True)
    assert seen_when_held
    # the same rows and values as analyze() (composition aside); layers [0, 2] read blocks 1 and 3 for their
    # residual pairs, which appear with layer 0 and 2
    report = analyze(str(checkpoint), device="cpu", layers=layers, composition="none")
    expected = {key(r): r.values for r in report.rows if r.kind not in COMPOSITION_KINDS}
    assert {key(r): r.values for r in rows} == expected
    residual = sorted((r.layer, r.target_layer) for r in rows if r.kind == KIND_RESIDUAL)
    assert residual == [(i, i + 1) for i in layers if i + 1 < N_LAYERS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 16, 33, 4097):
        x = torch.randn(n, generator=g, dtype=dtype)
        assert all_finite(x) and all_finite(x.reshape(-1, 1).mT)
        for pos in {0, n // 2, n - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                y = x.clone()
                y[pos] = bad
                assert all_finite(y) == bool(torch.isfinite(y).all()) is False
                assert not all_finite(y.reshape(-1, 1).mT)
    assert all_finite(torch.empty(0, 3, dtype=dtype))


def test_mmap_threshold_is_fixed_only_for_weights_read_from_files(tiny_llama, tiny_checkpoint, monkeypatch):
    """The process-wide glibc setting (``checks.bound_heap_growth``) is made for file-backed analyses (the
    streamed checkpoints the memory bound is about), never for an in-memory model such as the Trainer
    callback's, whose process the setting would otherwise outlive."""
    import hf_flag.analysis.transformer as transformer
    from hf_flag.analysis.api import analyze

    calls = []
    monkeypatch.setattr(transformer, "bound_heap_growth", lambda: calls.append(1))
    analyze(tiny_llama, device="cpu", cheap=True)
    assert calls == []
    analyze(str(tiny_checkpoint), device="cpu", cheap=True)
    assert calls == [1]
