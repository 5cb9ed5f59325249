"""GGUF for every family of the architecture table with a GGUF layout, at two quantisations each (MATH.md §6).

Each tiny model of ``test_adapters.FAMILIES`` is written to GGUF as llama.cpp's ``convert_hf_to_gguf.py`` writes it
(its reorderings re-implemented here from the converter's ``modify_tensors``, tensor names through gguf-py's
``TensorNameMap``, metadata through gguf-py's ``GGUFWriter``), quantised with ``gguf.quants.quantize``, and read back:

* every tensor hf-flag reads equals the original within its storage precision (a wrong reordering would be off by
  O(1)), and equals what transformers' own GGUF loader holds where transformers loads the family from GGUF;
* the per-head slices and MLP weights read from the GGUF reproduce the forward pass of the model holding the
  dequantised weights (the test_adapters harness);
* the report of the GGUF equals the report of the original weights' safetensors within the storage precision;
* the config hf-flag builds from the metadata and the family's ``GGUFLayout`` (without importing transformers) gives
  the layout (sizes, heads, activation, tensor names) that the config transformers completes gives
  (:func:`transformers_gguf_config`, the independent reference), and analysing a GGUF file imports no transformers.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.quants import dequantize, quantize

from hf_flag.weights.adapters import get_adapter
from hf_flag.weights.adapters.table import ARCHITECTURES
from hf_flag.weights.gguf_source import GGUF_CONFIG_KEYS, GGUFSource, parse_gguf
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
    "xlm-roberta": ("F16", "Q4_1"),
}
#: families transformers >= 5 loads from GGUF with the same weights (from_pretrained(..., gguf_file=...)).  Not
#: listed: gemma, gpt_neox and the BERT family (no GGUF support in transformers), mixtral (transformers reads a "llama" GGUF as
#: Llama), falcon_new (transformers' Falcon GGUF config has no new_decoder_architecture), gpt2 and starcoder2
#: (transformers takes their vocabulary size from the tokenizer, which these files do not carry), qwen3 (its
#: GGUF_CONFIG_MAPPING entry drops attention.key_length, so a head_dim other than hidden / heads does not load),
#: qwen2_moe (its mapping has no expert_feed_forward_length, so moe_intermediate_size keeps the class default).
TRANSFORMERS_LOADS = {"llama", "mistral", "qwen2", "gemma2", "gemma3_text", "stablelm", "falcon", "phi3"}


#: storage precision per GGUF type, written down from the formats (not read from hf_flag): a float type's unit
#: roundoff 2^-p (p stored mantissa bits: F32 23, F16 10, BF16 7); a b-bit block quantisation puts 2^b levels on a
#: block's range [-amax, amax] (Q4_0: d (q - 8), q in 0..15, d = amax / 8; Q8_0: d q, d = amax / 127; Q4_1 / Q5_1: min
#: + d q over [min, max]), so it rounds to within a step ~ 2 amax / 2^b, eps = 2^-b relative to the block maximum,
#: with b the type's bits per weight (K-quants and IQ types by the digit in their name, IQ1: 1); the 4-bit floats
#: (MXFP4, NVFP4: e2m1 times a block scale) have one mantissa bit, 2^-1; ternary TQ types hold {-1, 0, 1} times a
#: scale, no precision finer than the weights' own scale, 1.
GGUF_EPS = {
    "F32": 2.0 ** -23, "F16": 2.0 ** -10, "BF16": 2.0 ** -7,
    "Q8_0": 2.0 ** -8, "Q5_0": 2.0 ** -5, "Q5_1": 2.0 ** -5, "Q4_0": 2.0 ** -4, "Q4_1": 2.0 ** -4,
    "Q6_K": 2.0 ** -6, "Q5_K": 2.0 ** -5, "Q4_K": 2.0 ** -4, "Q3_K": 2.0 ** -3, "Q2_K": 2.0 ** -2,
    "IQ4_NL": 2.0 ** -4, "IQ4_XS": 2.0 ** -4, "IQ3_XXS": 2.0 ** -3, "IQ3_S": 2.0 ** -3, "IQ2_XXS": 2.0 ** -2,
    "IQ2_XS": 2.0 ** -2, "IQ2_S": 2.0 ** -2, "IQ1_S": 2.0 ** -1, "IQ1_M": 2.0 ** -1,
    "MXFP4": 2.0 ** -1, "NVFP4": 2.0 ** -1, "TQ1_0": 1.0, "TQ2_0": 1.0,
}


def expected_eps(storage_dtype: str) -> float:
    """:data:`GGUF_EPS` of a tensor's ``storage_dtype`` (float types are named as torch names them)."""
    return GGUF_EPS[{"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(storage_dtype, storage_dtype)]


def fused_expert(name: str) -> tuple[str, int]:
    """GGUF's stacked ``experts.gate_proj`` / ``experts.up_proj`` -> (transformers' fused name, its half)."""
    base, part = name.rsplit(".", 1)
    return f"{base}.gate_up_proj", 0 if part == "gate_proj" else 1


def model_type_of(family: str) -> str:
    return {"falcon_new": "falcon", "falcon_rw": "falcon"}.get(family, family)


#: GGUF metadata keys transformers' ``GGUF_CONFIG_MAPPING`` does not map for every family, as llama.cpp's
#: ``TextModel.set_gguf_parameters`` writes them (the reference's own key table, not hf-flag's)
REFERENCE_EXTRA_KEYS = {
    "attention.key_length": "head_dim",
    "expert_count": "num_experts",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
}


def transformers_gguf_config(arch: str, model_type: str, metadata: dict, tensors: dict) -> dict:
    """The reference config of a GGUF file, as transformers' GGUF loader builds it: metadata renamed by its
    ``GGUF_CONFIG_MAPPING`` (plus :data:`REFERENCE_EXTRA_KEYS`), completed with the config class's defaults
    (``AutoConfig.for_model``); Falcon's kv heads as transformers' config needs them to read the [Q; K; V]-regrouped
    tensors; tied unless the file has an output tensor (``load_gguf_checkpoint``).  hf-flag built its GGUF configs
    this way until it stopped importing transformers to read a GGUF file."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mapping = GGUF_CONFIG_MAPPING.get(model_type) or GGUF_CONFIG_MAPPING.get(arch) or GGUF_CONFIG_MAPPING["llama"]
    values = {hf_key: metadata[f"{arch}.{key}"] for key, hf_key in mapping.items()
              if hf_key is not None and metadata.get(f"{arch}.{key}") is not None}
    for key, hf_key in REFERENCE_EXTRA_KEYS.items():
        if metadata.get(f"{arch}.{key}") is not None:
            values.setdefault(hf_key, metadata[f"{arch}.{key}"])
    if model_type == "falcon":
        kv = int(metadata.get(f"{arch}.attention.head_count_kv") or 1)
        values.update(num_kv_heads=kv, new_decoder_architecture=kv > 1, multi_query=kv == 1)
    values["tie_word_embeddings"] = "output.weight" not in tensors
    if "token_embd.weight" in tensors:  # transformers counts the tokenizer's tokens, which these files lack
        values.setdefault("vocab_size", tensors["token_embd.weight"].shape[-1])
    settable = {k: v for k, v in values.items() if not isinstance(getattr(CONFIG_MAPPING[model_type], k, None),
                                                                 property)}
    config = AutoConfig.for_model(model_type, **settable).to_dict()
    config.update(values, model_type=model_type)
    return config


def check_config_against_transformers(path, src, adapter, layout) -> None:
    """The layout of hf-flag's GGUF config equals the layout of the config transformers completes (sizes, heads,
    head_dim, d_ff, experts, activation, tied embeddings, tensor names), and the facts both state agree."""
    metadata, tensors = parse_gguf(path)
    arch = metadata["general.architecture"]
    reference = transformers_gguf_config(arch, layout.model_type, metadata, tensors)
    assert adapter.layout(reference, src.keys()) == layout
    shared = [k for k in ("vocab_size", "tie_word_embeddings", "max_position_embeddings", "num_experts")
              if k in src.config and k in reference]
    assert {"vocab_size", "tie_word_embeddings"} <= set(shared)
    assert {k: src.config[k] for k in shared} == {k: reference[k] for k in shared}


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
        if getattr(model.config, "moe_intermediate_size", None):  # TextModel writes it only when the config has it
            writer.add_expert_feed_forward_length(model.config.moe_intermediate_size)
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
    # bert and roberta share xlm-roberta's spec and GGUF layout (a bare encoder, keys as llama.cpp writes them)
    assert gguf_types == {model_type_of(f) for f in QUANTS} | {"bert", "roberta"}
    assert ARCHITECTURES["bert"] == ARCHITECTURES["roberta"] == ARCHITECTURES["xlm-roberta"]
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
        check_config_against_transformers(path, src, g_adapter, g_layout)
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
                eps = expected_eps(src.storage_dtype(name))
                assert src.storage_eps(name) == eps, name
                tol = 2 * eps * original.abs().max().item()
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
    # full=True: every value from all singular vectors (the default report's windows depend on the storage precision)
    gguf, st = analyze(str(tmp_path / "model.gguf"), device="cpu", full=True), analyze(str(folder), device="cpu",
                                                                                      full=True)
    types = gguf.params["storage_dtypes"]
    assert qtype in types or {"F16": "float16", "BF16": "bfloat16"}.get(qtype) in types
    eps = max(expected_eps(t) for t in types)
    assert gguf.params["storage_eps"] == eps
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


def _quant_support() -> tuple[list[str], list[str], list[str]]:
    """gguf-py's GGML types: (quantise and dequantise, dequantise only, neither) among the non-float types."""
    from gguf import quants

    both, dequant_only, neither = [], [], []
    for kind in GGMLQuantizationType:
        if kind.name in ("F32", "F16", "F64", "I8", "I16", "I32", "I64"):
            continue
        traits = getattr(quants, kind.name, None)
        can_d = traits is not None and "dequantize_blocks" in vars(traits)
        can_q = traits is not None and "quantize_blocks" in vars(traits)
        (both if can_q and can_d else dequant_only if can_d else neither).append(kind.name)
    return both, dequant_only, neither


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random bytes make some fp16 block scales inf / NaN
def test_every_dequantisable_type_reads_back_in_one_mixed_file(tmp_path):
    """Types gguf-py can only dequantise (K-quants, IQ types, NVFP4) are written as random block bytes, all in one
    file: each reads back as gguf-py's own dequantisation of those bytes (NaN where a random scale is one), under its
    own storage precision; a type gguf-py cannot dequantise at all (Q8_K) is a one-line error naming the tensor."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import quant_shape_to_byte_shape

    from hf_flag.errors import WeightSourceError

    both, dequant_only, neither = _quant_support()
    assert {"Q4_0", "Q4_1", "Q8_0", "BF16", "MXFP4"} <= set(both)
    assert {"Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ4_NL"} <= set(dequant_only) and "Q8_K" in neither
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    writer.add_block_count(len(dequant_only) + 1)
    writer.add_embedding_length(256)
    writer.add_head_count(2)
    raw = {}
    for j, name in enumerate(dequant_only + ["Q8_K"]):
        kind = GGMLQuantizationType[name]
        shape = (3, 256 * max(1, GGML_QUANT_SIZES[kind][0] // 256))
        raw[name] = rng.integers(0, 256, size=quant_shape_to_byte_shape(shape, kind), dtype=np.uint8)
        writer.add_tensor(f"blk.{j}.ffn_up.weight", raw[name], raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_weights(tmp_path / "mixed.gguf") as src:
        for j, name in enumerate(dequant_only):
            hf = f"model.layers.{j}.mlp.up_proj.weight"
            expected = torch.from_numpy(dequantize(raw[name], GGMLQuantizationType[name]).astype(np.float32))
            torch.testing.assert_close(src.get(hf), expected, rtol=0, atol=0, equal_nan=True)
            assert src.storage_dtype(hf) == name and src.storage_eps(hf) == GGUF_EPS[name]  # one precision per tensor
        with pytest.raises(WeightSourceError, match=r"'model\.layers\.\d+\.mlp\.up_proj\.weight'.*Q8_K.*cannot "
                                                    r"dequantise") as err:
            src.get(f"model.layers.{len(dequant_only)}.mlp.up_proj.weight")
        assert "\n" not in str(err.value)


def test_quantisable_types_round_trip_within_their_precision(tmp_path):
    """Every type gguf-py quantises, on one Gaussian weight: stored by ``quantize``, read back as ``dequantize``
    gives, and within 2 eps of the block maxima (Q4_0's rounding reaches 2^-3 = 2 eps; BF16 rounds within eps / 2)."""
    both, _, _ = _quant_support()
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    writer = GGUFWriter(str(tmp_path / "all.gguf"), "llama")
    writer.add_block_count(len(both))
    writer.add_embedding_length(256)
    writer.add_head_count(2)
    for j, name in enumerate(both):
        writer.add_tensor(f"blk.{j}.ffn_down.weight", quantize(w, GGMLQuantizationType[name]),
                          raw_dtype=GGMLQuantizationType[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_weights(tmp_path / "all.gguf") as src:
        for j, name in enumerate(both):
            hf = f"model.layers.{j}.mlp.down_proj.weight"
            got = src.get(hf)
            expected = dequantize(quantize(w, GGMLQuantizationType[name]), GGMLQuantizationType[name])
            assert torch.equal(got, torch.from_numpy(expected.astype(np.float32))), name
            block_max = np.abs(w).reshape(-1, 32).max(axis=1).repeat(32).reshape(w.shape)
            err = np.abs(got.numpy() - w) / block_max
            assert src.storage_eps(hf) == GGUF_EPS[name], name
            assert err.max() <= 2 * GGUF_EPS[name], (name, err.max(), GGUF_EPS[name])


def _minimal_gguf(path, arch: str, tensors: dict) -> None:
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_gguf_architecture_and_a_user_family(tmp_path, monkeypatch):
    """A GGUF architecture with no table entry is a one-line error naming it and the architectures read; a family
    registered by the user with a GGUFLayout is read from GGUF through gguf-py's names like the table's."""
    import hf_flag.weights.adapters as registry
    from hf_flag.errors import UnsupportedArchitectureError
    from hf_flag.weights.adapters import AdapterSpec, GGUFLayout, register_adapter

    rng = np.random.default_rng(2)
    _minimal_gguf(tmp_path / "mamba.gguf", "mamba", {"token_embd.weight": np.zeros((10, 32), np.float32)})
    with pytest.raises(UnsupportedArchitectureError) as err:
        open_weights(tmp_path / "mamba.gguf")
    msg = str(err.value)
    assert "'mamba.gguf'" in msg and "'mamba'" in msg and "gemma3" in msg and "qwen2moe" in msg and "\n" not in msg
    # a user family: OLMo (GGUF arch "olmo"), plain Llama names, no reordering in llama.cpp's OlmoModel
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    spec = AdapterSpec(name="olmo", stack="layers", attention="linear", mlp="gated",
                       tensors=dict(ARCHITECTURES["llama"].tensors), grouped_query=True, canonical_prefix="model.",
                       gguf=GGUFLayout("olmo"))
    register_adapter("olmo", spec)
    weights = {f"blk.0.{n}.weight": rng.standard_normal(s).astype(np.float32) for n, s in (
        ("attn_q", (32, 32)), ("attn_k", (32, 32)), ("attn_v", (32, 32)), ("attn_output", (32, 32)),
        ("ffn_gate", (64, 32)), ("ffn_up", (64, 32)), ("ffn_down", (32, 64)))}
    _minimal_gguf(tmp_path / "olmo.gguf", "olmo", weights)
    # GGUF stores no activation: a layout that names none cannot be read, in one line saying what to add
    with pytest.raises(UnsupportedArchitectureError) as err:
        open_weights(tmp_path / "olmo.gguf")
    assert "'olmo.gguf'" in str(err.value) and "activation=" in str(err.value) and "\n" not in str(err.value)
    register_adapter("olmo", replace(spec, gguf=GGUFLayout("olmo", activation="silu")), overwrite=True)
    with open_weights(tmp_path / "olmo.gguf") as src:
        assert src.config["model_type"] == "olmo"
        adapter = get_adapter(src.config, src.keys())
        layout = adapter.layout(src.config, src.keys())
        assert layout.activation == "silu" and layout.head_dim == 8  # no key_length: hidden / heads
        blk = adapter.block(src, layout, 0)
        assert torch.equal(src.get("model.layers.0.self_attn.q_proj.weight"), torch.from_numpy(weights["blk.0.attn_q.weight"]))
        assert torch.equal(blk.mlp.mlp_gate.float(), torch.from_numpy(weights["blk.0.ffn_gate.weight"]))


def test_gguf_config_keys_are_gguf_py_keys():
    """hf-flag's metadata keys are gguf-py's own ``Keys.LLM`` / ``Keys.Attention`` names (llama.cpp's, the same for
    every architecture)."""
    from gguf.constants import Keys

    names = {v.removeprefix("{arch}.") for group in (Keys.LLM, Keys.Attention) for v in vars(group).values()
             if isinstance(v, str) and v.startswith("{arch}.")}
    assert set(GGUF_CONFIG_KEYS) <= names


@pytest.mark.pretrained
def test_smollm2_config_equals_the_transformers_config(smollm2_gguf):
    """SmolLM2 (no attention.key_length in its metadata: head_dim = 576 / 9): the same layout as transformers'
    config (whose head_dim comes from rope.dimension_count), 30 layers, 9 / 3 heads of 64, d_ff 1536, SiLU."""
    with open_weights(smollm2_gguf) as src:
        adapter = get_adapter(src.config, src.keys())
        layout = adapter.layout(src.config, src.keys())
        check_config_against_transformers(smollm2_gguf, src, adapter, layout)
        assert (layout.n_layers, layout.d_model, layout.n_heads, layout.n_kv_heads, layout.head_dim, layout.d_ff,
                layout.activation, layout.tied_embeddings) == (30, 576, 9, 3, 64, 1536, "silu", True)


def test_analysing_a_gguf_file_imports_no_transformers(tmp_path, built):
    """``hf-flag analyze x.gguf --json`` in a fresh process: a report, and transformers never imported (its config
    classes cost ~1.9 s CPU at start-up, BENCHMARKS.md)."""
    import json
    import os
    import subprocess
    import sys

    model, _, _, layout = built("llama")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", model, layout, "Q8_0")
    code = ("import sys\nfrom hf_flag.cli import main\nrc = main(sys.argv[1:])\n"
            "assert rc == 0, rc\nbad = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code, "analyze", str(path), "--json", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.splitlines()[0])
    assert report["layout"]["n_layers"] == layout.n_layers and len(report["rows"]) > 0


@pytest.mark.parametrize("key,value", [("attention.head_count", "nine"), ("block_count", 0),
                                       ("feed_forward_length", -1.5)])
def test_bad_gguf_size_metadata_is_a_one_line_error(tmp_path, key, value):
    """A size the layout needs that is not an integer (or not positive where it must be) is refused at open, in one
    line naming the file, the key and the value."""
    from hf_flag.errors import WeightSourceError

    writer = GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    sizes = {"block_count": 1, "embedding_length": 32, "feed_forward_length": 64, "attention.head_count": 4}
    sizes[key] = value
    for k, v in sizes.items():
        if isinstance(v, str):
            writer.add_string(f"llama.{k}", v)
        elif isinstance(v, float):
            writer.add_float32(f"llama.{k}", v)
        else:
            writer.add_uint32(f"llama.{k}", v)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightSourceError) as err:
        open_weights(tmp_path / "bad.gguf")
    msg = str(err.value)
    assert f"'bad.gguf' has metadata llama.{key} = {value!r}" in msg and "\n" not in msg
