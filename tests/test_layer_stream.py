"""The per-layer pass's memory contract (issue #11 item 4) and the allocation-free NaN/Inf check.

``per_layer_rows`` must hold one raw block at a time: when block i is read, no tensor of an earlier block is
alive except block i-1's down projection (carried for the residual pair i-1 -> i).  Checked with weak references
to every tensor a block hands out, on a 4-layer Llama read from safetensors (fresh tensors per read).  The
streamed pair values are checked against MATH.md's closed forms computed here, in float64, on the n x n
matrices ``A = W_next^T W_next`` and ``B = W_l W_l^T`` of the checkpoint's own tensors (read by the safetensors
library, not hf-flag's reader), for every mlp, mlp_gate, residual and vo pair.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from hf_flag.analysis.api import analyze
from hf_flag.analysis.checks import all_finite, block_tensors
from hf_flag.analysis.transformer import per_layer_rows
from hf_flag.defaults import TRANSFORMER_DIAGNOSTICS
from hf_flag.rows import COMPOSITION_KINDS, KIND_MLP, KIND_MLP_GATE, KIND_RESIDUAL, KIND_VO
from hf_flag.weights.adapters import get_adapter
from hf_flag.weights.sources import open_weights

N_LAYERS = 4
N_HEADS, N_KV, D, D_FF = 4, 2, 32, 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=64, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=N_LAYERS,
                         num_attention_heads=N_HEADS, num_key_value_heads=N_KV, max_position_embeddings=64)
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
    # every pair value against the closed forms on the checkpoint's own tensors (independent of the pass)
    reference = reference_pairs(checkpoint)
    pairs = [r for r in rows if r.kind in (KIND_MLP, KIND_MLP_GATE, KIND_RESIDUAL, KIND_VO)]
    assert {key(r) for r in pairs} == {k for k in reference if k[1] in layers}
    for r in pairs:
        for name, value in reference[key(r)].items():
            assert r.values[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (key(r), name)


def closed_forms(W_l: torch.Tensor, W_next: torch.Tensor) -> dict[str, float]:
    """MATH.md §2-§3 on the n x n matrices, float64: ``A = W_next^T W_next``, ``B = W_l W_l^T``, ``D = A - B``;
    kappa ``||AB - BA||_F / (||A||_F ||B||_F)``, ``||D||_F``, ``||D||_F / (||A||_F + ||B||_F)``, ``||diag D||``."""
    A, B = W_next.double().mT @ W_next.double(), W_l.double() @ W_l.double().mT
    fro = torch.linalg.matrix_norm
    return {"commutator_ratio": float(fro(A @ B - B @ A) / (fro(A) * fro(B))), "imbalance_norm": float(fro(A - B)),
            "relative_imbalance": float(fro(A - B) / (fro(A) + fro(B))),
            "imbalance_diagonal_norm": float(torch.linalg.vector_norm(torch.diagonal(A) - torch.diagonal(B)))}


def reference_pairs(folder) -> dict[tuple, dict[str, float]]:
    """Closed-form values of every mlp, mlp_gate, residual (down_l -> up_l+1) and vo pair (head h: the rows of its
    KV head in v_proj, then its columns of o_proj; KV head ``h // (N_HEADS / N_KV)`` as transformers'
    ``repeat_kv``), keyed as :func:`key`, from the safetensors file read by the safetensors library."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        t = {name: f.get_tensor(name) for name in f.keys()}
    w = lambda i, name: t[f"model.layers.{i}.{name}.weight"]  # noqa: E731
    dh, out = D // N_HEADS, {}
    for i in range(N_LAYERS):
        down = w(i, "mlp.down_proj")
        out[(KIND_MLP, i, i, "mlp.in", "mlp.out")] = closed_forms(w(i, "mlp.up_proj"), down)
        out[(KIND_MLP_GATE, i, i, "mlp.gate", "mlp.out")] = closed_forms(w(i, "mlp.gate_proj"), down)
        if i + 1 < N_LAYERS:
            out[(KIND_RESIDUAL, i, i + 1, "mlp.out", "mlp.in")] = closed_forms(down, w(i + 1, "mlp.up_proj"))
        v, o = w(i, "self_attn.v_proj"), w(i, "self_attn.o_proj")
        for h in range(N_HEADS):
            kv = h // (N_HEADS // N_KV)
            out[(KIND_VO, i, i, f"head {h}", f"head {h}")] = closed_forms(v[kv * dh:(kv + 1) * dh],
                                                                         o[:, h * dh:(h + 1) * dh])
    return out


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
