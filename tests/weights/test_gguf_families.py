"""GGUF for every family of the architecture table with a GGUF layout, at two quantisations each (MATH.md §6).

Each tiny model of ``test_adapters.FAMILIES`` is written to GGUF as llama.cpp's ``convert_hf_to_gguf.py`` writes it
(its reorderings re-implemented here from the converter's ``modify_tensors``, tensor names through gguf-py's
``TensorNameMap``, metadata through gguf-py's ``GGUFWriter``), quantised with ``gguf.quants.quantize``, and read back:

* every tensor hf-flag reads equals the original within its storage precision (a wrong reordering would be off by
  O(1)), and equals what transformers' own GGUF loader holds where transformers loads the family from GGUF;
* the per-head slices and MLP weights read from the GGUF reproduce the forward pass of the model holding the
  dequantised weights (the test_adapters harness);
* the report of the GGUF equals the report of the original weights' safetensors within the storage precision.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.quants import dequantize, quantize

from hf_flag.weights.adapters import get_adapter
from hf_flag.weights.adapters.table import ARCHITECTURES
from hf_flag.weights.gguf_source import GGUFSource, quant_eps
from hf_flag.weights.sources import open_weights

from tests.weights.test_adapters import ATOL, FAMILIES, RTOL, T, build, mlp_from_weights, module_and_heads

# family -> the two storage types of its 2-D weights (1-D tensors stay F32, as llama.cpp keeps them); a weight whose
# rows do not fill whole quantisation blocks falls back to F16, as llama.cpp's quantiser does, so most files are mixed
QUANTS = {
    "gpt2": ("Q8_0", "Q4_1"), "gpt_neox": ("BF16", "Q5_0"), "llama": ("F16", "Q4_0"), "mistral": ("Q8_0", "Q5_1"),
    "qwen2": ("BF16", "Q4_1"), "qwen3": ("Q8_0", "MXFP4"), "gemma": ("F16", "Q5_0"), "gemma2": ("Q8_0", "Q4_0"),
    "gemma3_text": ("BF16", "Q5_1"), "stablelm": ("Q8_0", "Q4_1"), "starcoder2": ("F16", "Q4_0"),
    "falcon": ("Q8_0", "Q5_0"), "falcon_new": ("BF16", "Q4_1"), "falcon_rw": ("F16", "Q8_0"),
    "phi3": ("Q8_0", "Q4_0"), "mixtral": ("BF16", "Q5_1"), "qwen2_moe": ("Q8_0", "Q4_1"),
}
#: families transformers >= 5 loads from GGUF with the same weights (from_pretrained(..., gguf_file=...)).  Not
#: listed: gemma and gpt_neox (no GGUF support in transformers), mixtral (transformers reads a "llama" GGUF as
#: Llama), falcon_new (transformers' Falcon GGUF config has no new_decoder_architecture), gpt2 and starcoder2
#: (transformers takes their vocabulary size from the tokenizer, which these files do not carry), qwen3 (its
#: GGUF_CONFIG_MAPPING entry drops attention.key_length, so a head_dim other than hidden / heads does not load),
#: qwen2_moe (its mapping has no expert_feed_forward_length, so moe_intermediate_size keeps the class default).
TRANSFORMERS_LOADS = {"llama", "mistral", "qwen2", "gemma2", "gemma3_text", "stablelm", "falcon", "phi3"}


def fused_expert(name: str) -> tuple[str, int]:
    """GGUF's stacked ``experts.gate_proj`` / ``experts.up_proj`` -> (transformers' fused name, its half)."""
    base, part = name.rsplit(".", 1)
    return f"{base}.gate_up_proj", 0 if part == "gate_proj" else 1


def model_type_of(family: str) -> str:
    return {"falcon_new": "falcon", "falcon_rw": "falcon"}.get(family, family)


# ---- llama.cpp's convert_hf_to_gguf.py, forward direction ---------------------------------------------------------
def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_qkv_rows(w: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """``FalconModel.modify_tensors`` (n_kv groups -> [Q; K; V]); with n_kv = n_head it is
    ``GPTNeoXModel.modify_tensors`` ((head, {q, k, v}) rows -> [Q; K; V])."""
    dh = w.shape[0] // (n_head + 2 * n_kv)
    qkv = w.reshape(n_kv, n_head // n_kv + 2, dh, *w.shape[1:])
    q = qkv[:, :-2].reshape(n_head * dh, *w.shape[1:])
    k = qkv[:, [-2]].reshape(n_kv * dh, *w.shape[1:])
    v = qkv[:, [-1]].reshape(n_kv * dh, *w.shape[1:])
    return torch.cat((q, k, v)).reshape_as(w)


def converted_tensors(family: str, model, layout) -> dict[str, torch.Tensor]:
    """HF name -> tensor as llama.cpp's converter hands it to the writer (before naming and quantisation)."""
    model_type = model_type_of(family)
    arch = ARCHITECTURES[model_type].gguf.arch
    out = {}
    for name, w in model.state_dict().items():
        w = w.detach().float()
        if name == "lm_head.weight" and layout.tied_embeddings:
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = llama_cpp_permute(w, layout.n_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = llama_cpp_permute(w, layout.n_kv_heads)
        elif arch == "gpt2" and name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                               "mlp.c_proj.weight")):
            w = w.T
        elif arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w + 1
        elif "query_key_value" in name:
            w = llama_cpp_qkv_rows(w, layout.n_heads, layout.n_kv_heads)
        elif name.endswith("shared_expert_gate.weight"):
            w = w.squeeze(0)
        if name.endswith("experts.gate_up_proj"):  # llama.cpp stacks the per-expert gate and up separately
            gate, up = w.chunk(2, dim=1)
            out[name.replace("gate_up_proj", "gate_proj")], out[name.replace("gate_up_proj", "up_proj")] = gate, up
            continue
        out[name] = w
    return out


def storage(array: np.ndarray, qtype: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    kind = GGMLQuantizationType[qtype]
    if array.ndim < 2 or qtype == "F32":
        return array.astype(np.float32), None
    if qtype == "F16":
        return array.astype(np.float16), None
    from gguf import GGML_QUANT_SIZES

    if array.shape[-1] % GGML_QUANT_SIZES[kind][0]:
        return array.astype(np.float16), None
    return quantize(array, kind), kind


def write_gguf(path, family: str, model, layout, qtype: str) -> dict[str, str]:
    """The model as llama.cpp writes it; returns GGUF name -> HF name of every tensor written."""
    model_type = model_type_of(family)
    arch = ARCHITECTURES[model_type].gguf.arch
    name_map = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch), layout.n_layers)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{family}")
    writer.add_block_count(layout.n_layers)
    writer.add_context_length(32)
    writer.add_embedding_length(layout.d_model)
    writer.add_feed_forward_length(layout.d_ff)
    writer.add_head_count(layout.n_heads)
    writer.add_head_count_kv(layout.n_kv_heads)
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_vocab_size(model.config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    if arch == "llama":
        writer.add_rope_dimension_count(layout.head_dim)
    if layout.n_experts:
        writer.add_expert_count(layout.n_experts)
        writer.add_expert_used_count(2)
        writer.add_expert_feed_forward_length(layout.d_ff)
        if getattr(model.config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(model.config.shared_expert_intermediate_size)
    written = {}
    for hf_name, w in converted_tensors(family, model, layout).items():
        base, _, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, suffix = hf_name, "weight"
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            continue
        data, raw = storage(w.numpy(), qtype)
        writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=raw)
        written[f"{gguf_name}.{suffix}"] = hf_name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(family):
        if family not in cache:
            model = build(family)
            source = open_weights(model)
            adapter = get_adapter(source.config, source.keys())
            cache[family] = model, source, adapter, adapter.layout(source.config, source.keys())
        return cache[family]

    return get


CASES = [(f, q) for f, pair in QUANTS.items() for q in pair]


def test_every_gguf_family_is_covered():
    gguf_types = {mt for mt, spec in ARCHITECTURES.items() if spec.gguf is not None}
    assert gguf_types == {model_type_of(f) for f in QUANTS}
    assert set(QUANTS) <= set(FAMILIES) and TRANSFORMERS_LOADS <= set(QUANTS)


@pytest.mark.parametrize("family,qtype", CASES)
def test_gguf_family_reads_back(tmp_path, built, family, qtype):
    model, ref_source, adapter, layout = built(family)
    path = tmp_path / f"{family}-{qtype}.gguf"
    written = write_gguf(path, family, model, layout, qtype)
    with open_weights(path) as src:
        assert isinstance(src, GGUFSource)
        assert src.config["model_type"] == layout.model_type
        g_adapter = get_adapter(src.config, src.keys())
        g_layout = g_adapter.layout(src.config, src.keys())
        assert g_adapter.name == adapter.name
        for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "activation", "gated_mlp",
                    "tied_embeddings", "attention_layout", "mlp_layout", "qk_norm", "n_experts"):
            assert getattr(g_layout, key) == getattr(layout, key), key
        stacked = {"experts_gate_up", "experts_gate", "experts_in"}  # GGUF keeps the experts' gate and up apart
        assert [t for t in g_layout.tensors if t[0] not in stacked] == [t for t in layout.tensors if t[0] not in stacked]
        types = set()
        state = model.state_dict()
        for i in range(layout.n_layers):
            for name in g_adapter.block_tensor_names(g_layout, i):
                got = src.get(name, dtype=torch.float64)
                types.add(src.storage_dtype(name))
                original = state[name].double() if name in state else None
                if original is None:  # stacked experts: GGUF keeps gate and up apart
                    fused, half = fused_expert(name)
                    original = state[fused].double().chunk(2, dim=1)[half]
                # a wrong reordering would be off by O(max |w|); rounding stays within ~ eps relative to the max
                tol = 2 * src.storage_eps(name) * original.abs().max().item()
                assert got.shape == original.shape and (got - original).abs().max().item() <= tol, name
        assert any(t == qtype or (qtype in ("F32", "F16", "BF16") and t == {"F16": "float16", "BF16": "bfloat16",
                                                                        "F32": "float32"}[qtype]) for t in types)
        # the file's per-tensor precisions: each tensor its own (1-D tensors F32, unfillable rows F16)
        assert {src.storage_dtype(k) for k in written.values() if k in src} >= {"float32"}
        check_forward(family, model, src, g_adapter, g_layout)
        if family in TRANSFORMERS_LOADS:
            check_against_transformers(path, src, g_adapter, g_layout)


def check_forward(family, model, src, adapter, layout):
    """The slices read from the GGUF reproduce the forward pass of the model holding the dequantised weights."""
    q_model = copy.deepcopy(model)
    state = q_model.state_dict()
    loaded = {}
    for i in range(layout.n_layers):
        for name in adapter.block_tensor_names(layout, i):
            tensor = src.get(name, dtype=torch.float64)
            if name in state:
                loaded[name] = tensor
            else:  # experts.gate_proj / up_proj -> the model's fused gate_up_proj
                fused, half = fused_expert(name)
                loaded.setdefault(fused, state[fused].clone()).chunk(2, dim=1)[half].copy_(tensor)
    q_model.load_state_dict(loaded, strict=False)
    fam = FAMILIES[family]
    for i in range(layout.n_layers):
        blk = adapter.block(src, layout, i)
        x = torch.randn(1, T, layout.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        own, mine = module_and_heads(family, q_model, layout, blk.attention, i, x)
        torch.testing.assert_close(mine, own, rtol=RTOL, atol=ATOL)
        block = fam.layers(q_model)[i]
        with torch.no_grad():
            if fam.mlp is not None:
                torch.testing.assert_close(mlp_from_weights(blk.mlp, x), fam.mlp(block)(x), rtol=RTOL, atol=ATOL)
            for e, expert in enumerate(blk.experts):
                flat = x[0]
                own = block.mlp.experts(flat, torch.full((T, 1), e), torch.ones(T, 1, dtype=torch.float64))
                torch.testing.assert_close(mlp_from_weights(expert, flat), own, rtol=RTOL, atol=ATOL)


def check_against_transformers(path, src, adapter, layout):
    """transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``) holds the same tensors."""
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32)
    state = loaded.state_dict()
    compared = 0
    for i in range(layout.n_layers):
        for name in adapter.block_tensor_names(layout, i):
            if name.endswith(("experts.gate_proj", "experts.up_proj")):  # transformers fuses them into gate_up_proj
                fused, half = fused_expert(name)
                assert torch.equal(src.get(name), state[fused].float().chunk(2, dim=1)[half]), name
            elif name in state:
                assert torch.equal(src.get(name), state[name].float()), name
            else:  # transformers' GGUF config carries no bias flag (Llama's attention_bias, Falcon's bias): no biases
                assert name.endswith(".bias") and layout.model_type in ("llama", "falcon"), name
                continue
            compared += 1
    assert compared >= 4 * layout.n_layers


#: row values that are by design functions of the flag tolerance (so of the storage precision itself), and z-scores
#: (overlap minus its baseline over a small spread): their inputs, overlap and overlap_baseline, are compared instead
TOLERANCE_DERIVED = {"flag_tau", "gl_kernel_dim", "overlap_zscore"}
REPORT_CASES = [(f, pair[j % 2]) for j, (f, pair) in enumerate(QUANTS.items())]


@pytest.mark.parametrize("family,qtype", REPORT_CASES)
def test_gguf_report_equals_safetensors_report(tmp_path, built, family, qtype):
    """``analyze`` of the GGUF equals ``analyze`` of the original weights saved as safetensors, value by value, within
    twice the file's coarsest storage precision (the bound the tensors themselves meet: Q4_0 / Q5_0 round to up to
    2 eps of a block's largest entry); the GGUF report records the storage types it read and the coarsest precision."""
    from safetensors.torch import save_file

    from hf_flag import analyze

    model, _, _, layout = built(family)
    write_gguf(tmp_path / "model.gguf", family, model, layout, qtype)
    folder = tmp_path / "safetensors"
    folder.mkdir()
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    model.config.to_json_file(str(folder / "config.json"))
    gguf, st = analyze(str(tmp_path / "model.gguf"), device="cpu"), analyze(str(folder), device="cpu")
    types = gguf.params["storage_dtypes"]
    assert qtype in types or {"F16": "float16", "BF16": "bfloat16"}.get(qtype) in types
    eps = gguf.params["storage_eps"]
    assert eps == max(quant_eps({"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(t, t)) for t in types)
    assert len(gguf.rows) == len(st.rows) > 0
    compared = 0
    for a, b in zip(gguf.rows, st.rows):
        assert (a.kind, a.layer, a.target_layer, a.source, a.target) == (b.kind, b.layer, b.target_layer, b.source,
                                                                          b.target)
        for metric, value in a.values.items():
            ref = b.values[metric]
            if metric in TOLERANCE_DERIVED or not isinstance(value, float) or not math.isfinite(ref):
                continue
            assert abs(value - ref) <= 2 * eps * max(1.0, abs(ref)), (a.kind, a.layer, a.source, metric, value, ref)
            compared += 1
    assert compared > 10 * layout.n_layers
