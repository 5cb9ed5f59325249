"""Adapters reproduce each family's own attention and MLP from the extracted per-head slices (MATH.md §6).

Tiny random models (seeded, float64, eager attention) are built locally; nothing touches the network.  For every
family: softmax(q k^T * scale) v summed over heads through W_O[h] (with the model's own RoPE / q_norm / k_norm and a
causal mask where the family needs one) must equal the attention module's output on the same input, and
mlp_out @ act(mlp_in x) (gated: act(gate x) * up x) the MLP's output.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import transformers
from torch import nn
from transformers.activations import ACT2FN

from hf_flag.errors import UnsupportedArchitectureError
from hf_flag.weights.adapters import AdapterSpec, get_adapter, register_adapter, registered_model_types
from hf_flag.weights.adapters.base import CheckpointLayout
from hf_flag.weights.adapters.mlp import linear_chain
from hf_flag.weights.blocks import AttentionWeights, MLPWeights, ModelLayout
from hf_flag.weights.sources import open_weights

T = 5  # sequence length
RTOL, ATOL = 1e-5, 1e-7  # eager attention takes its softmax in float32
SMALL = dict(vocab_size=64, max_position_embeddings=32)
LLAMA_LIKE = dict(SMALL, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


@dataclass
class Family:
    """How to build a tiny model of one family and call its own attention / MLP of layer i."""

    make: Callable[[], nn.Module]
    layers: Callable[[nn.Module], nn.ModuleList]  # the block list
    attention: Callable[[nn.Module], nn.Module]  # block -> attention module (called as module(x, **kw)[0])
    mlp: Optional[Callable[[nn.Module], Callable]]  # block -> x -> MLP output (None: no dense MLP)
    modeling: Optional[str] = None  # transformers module with apply_rotary_pos_emb (rotary families)
    rotary: Optional[Callable[[nn.Module], nn.Module]] = None
    causal: bool = True
    out_proj: Optional[Callable[[nn.Module], nn.Module]] = None  # BERT: attention.output.dense after self-attention
    call: dict = field(default_factory=dict)  # extra keyword arguments of the attention call (Falcon: alibi=None)
    rotary_kwargs: Callable[[nn.Module, int], dict] = lambda model, i: {}  # Gemma 3: the layer's rope type


def _llama_like(config_cls, **kw):
    return lambda: transformers.AutoModelForCausalLM.from_config(
        config_cls(**{**LLAMA_LIKE, **kw}), attn_implementation="eager", experts_implementation="eager")


_LLAMA_PARTS = dict(layers=lambda m: m.model.layers, attention=lambda b: b.self_attn, mlp=lambda b: b.mlp,
                    rotary=lambda m: m.model.rotary_emb)
_FALCON_PARTS = dict(layers=lambda m: m.transformer.h, attention=lambda b: b.self_attention, mlp=lambda b: b.mlp,
                     modeling="falcon", rotary=lambda m: m.transformer.rotary_emb, call={"alibi": None})
FAMILIES = {
    "gpt2": Family(
        make=lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64, attn_implementation="eager")),
        layers=lambda m: m.transformer.h, attention=lambda b: b.attn, mlp=lambda b: b.mlp),
    "gpt_neox": Family(  # a causal LM (keys "gpt_neox.layers.N...", as llama.cpp's converter reads them)
        make=lambda: transformers.AutoModelForCausalLM.from_config(transformers.GPTNeoXConfig(
            **SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4),
            attn_implementation="eager"),
        layers=lambda m: m.gpt_neox.layers, attention=lambda b: b.attention, mlp=lambda b: b.mlp,
        modeling="gpt_neox", rotary=lambda m: m.gpt_neox.rotary_emb),
    "opt": Family(
        make=lambda: transformers.AutoModel.from_config(transformers.OPTConfig(
            **SMALL, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32), attn_implementation="eager"),
        layers=lambda m: m.decoder.layers, attention=lambda b: b.self_attn,
        mlp=lambda b: (lambda x: b.fc2(b.activation_fn(b.fc1(x))))),
    "llama": Family(make=_llama_like(transformers.LlamaConfig, head_dim=12, attention_bias=True, mlp_bias=True),
                    modeling="llama", **_LLAMA_PARTS),
    "mistral": Family(make=_llama_like(transformers.MistralConfig), modeling="mistral", **_LLAMA_PARTS),
    "qwen2": Family(make=_llama_like(transformers.Qwen2Config), modeling="qwen2", **_LLAMA_PARTS),
    "qwen3": Family(make=_llama_like(transformers.Qwen3Config, head_dim=12), modeling="qwen3", **_LLAMA_PARTS),
    "phi3": Family(make=_llama_like(transformers.Phi3Config, pad_token_id=0, bos_token_id=1, eos_token_id=2), modeling="phi3", **_LLAMA_PARTS),
    "gemma": Family(make=_llama_like(transformers.GemmaConfig, head_dim=16), modeling="gemma", **_LLAMA_PARTS),
    "gemma2": Family(make=_llama_like(transformers.Gemma2Config, head_dim=16, attn_logit_softcapping=None,
                                      query_pre_attn_scalar=20), modeling="gemma2", **_LLAMA_PARTS),
    "gemma3_text": Family(make=_llama_like(transformers.Gemma3TextConfig, head_dim=16), modeling="gemma3",
                          rotary_kwargs=lambda m, i: {"layer_type": m.config.layer_types[i]}, **_LLAMA_PARTS),
    "stablelm": Family(make=_llama_like(transformers.StableLmConfig, partial_rotary_factor=1.0, use_qkv_bias=True),
                       modeling="stablelm", **_LLAMA_PARTS),
    "starcoder2": Family(make=_llama_like(transformers.Starcoder2Config), modeling="starcoder2", **_LLAMA_PARTS),
    # Falcon in its three attention layouts: multi-query (7B), new decoder architecture (40B, kv groups), neither (RW)
    "falcon": Family(make=lambda: transformers.AutoModelForCausalLM.from_config(transformers.FalconConfig(
        **SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=True), attn_implementation="eager"),
        **_FALCON_PARTS),
    "falcon_new": Family(make=lambda: transformers.AutoModelForCausalLM.from_config(transformers.FalconConfig(
        **SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True), attn_implementation="eager"), **_FALCON_PARTS),
    "falcon_rw": Family(make=lambda: transformers.AutoModelForCausalLM.from_config(transformers.FalconConfig(
        **SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=False, bias=True),
        attn_implementation="eager"), **_FALCON_PARTS),
    # mixtures of experts: the block's "mlp" is the shared expert (Qwen2-MoE) or absent (Mixtral)
    "mixtral": Family(make=_llama_like(transformers.MixtralConfig, num_local_experts=3, num_experts_per_tok=2),
                      modeling="mixtral", **{**_LLAMA_PARTS, "mlp": None}),
    "qwen2_moe": Family(make=_llama_like(transformers.Qwen2MoeConfig, moe_intermediate_size=24, num_experts=3,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=20),
                        modeling="qwen2_moe", **{**_LLAMA_PARTS, "mlp": lambda b: b.mlp.shared_expert}),
    "bert": Family(  # a task model: keys "bert.encoder.layer.N..." (the bare prefix is the MiniLM test's)
        make=lambda: transformers.BertForMaskedLM(transformers.BertConfig(
            **SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            attn_implementation="eager")),
        layers=lambda m: m.bert.encoder.layer, attention=lambda b: b.attention.self,
        mlp=lambda b: (lambda x: b.output.dense(b.intermediate(x))), causal=False,
        out_proj=lambda b: b.attention.output.dense),
    "xlm-roberta": Family(  # a bare encoder: keys "encoder.layer.N..."
        make=lambda: transformers.AutoModel.from_config(transformers.XLMRobertaConfig(
            **SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            pad_token_id=1), attn_implementation="eager"),
        layers=lambda m: m.encoder.layer, attention=lambda b: b.attention.self,
        mlp=lambda b: (lambda x: b.output.dense(b.intermediate(x))), causal=False,
        out_proj=lambda b: b.attention.output.dense),
    "roberta": Family(
        make=lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(
            **SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            pad_token_id=1, attn_implementation="eager")),
        layers=lambda m: m.roberta.encoder.layer, attention=lambda b: b.attention.self,
        mlp=lambda b: (lambda x: b.output.dense(b.intermediate(x))), causal=False,
        out_proj=lambda b: b.attention.output.dense),
}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family].make().to(torch.float64).eval()
    with torch.no_grad():  # random biases / norm gains, so that their handling is tested too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    model = build(request.param)
    source = open_weights(model)
    adapter = get_adapter(source.config, source.keys())
    return request.param, model, source, adapter, adapter.layout(source.config, source.keys())


def causal_mask(n: int) -> torch.Tensor:
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.zeros(1, 1, n, n, dtype=torch.float64).masked_fill(upper, torch.finfo(torch.float64).min)


def heads_attention(att: AttentionWeights, layout: ModelLayout, x: torch.Tensor, *, scaling: float,
                    mask: Optional[torch.Tensor], rope=None, apply_rope=None, q_norm=None, k_norm=None,
                    return_kv: bool = False):
    """Attention recomputed head by head from the extracted slices (x @ W convention, MATH.md §6)."""
    def proj(W, b):
        y = torch.einsum("btd,hde->bhte", x, W)
        return y if b is None else y + b[None, :, None, :]

    q, k, v = proj(att.W_Q, att.b_Q), proj(att.W_K, att.b_K), proj(att.W_V, att.b_V)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, k, *rope)
    if return_kv:
        return k
    kv = torch.tensor([layout.kv_head_of(h) for h in range(layout.n_heads)])
    scores = q @ k[:, kv].transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores + mask
    per_head = torch.softmax(scores, dim=-1) @ v[:, kv]  # (b, H, T, dh)
    out = torch.einsum("bhte,hed->btd", per_head, att.W_O)
    return out if att.b_O is None else out + att.b_O


def mlp_from_weights(mlp: MLPWeights, x: torch.Tensor) -> torch.Tensor:
    act = ACT2FN[mlp.activation]
    up = x @ mlp.mlp_in.T + (0 if mlp.b_in is None else mlp.b_in)
    if mlp.mlp_gate is not None:
        hidden = act(x @ mlp.mlp_gate.T + (0 if mlp.b_gate is None else mlp.b_gate)) * up
    else:
        hidden = act(up)
    return hidden @ mlp.mlp_out.T + (0 if mlp.b_out is None else mlp.b_out)


def module_and_heads(name: str, model: nn.Module, layout: ModelLayout, att: AttentionWeights, i: int,
                     x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the attention module's own output, the output recomputed from the slices) for block i on input x."""
    fam = FAMILIES[name]
    block = fam.layers(model)[i]
    module = fam.attention(block)
    mask = causal_mask(x.shape[1]) if fam.causal else None
    kwargs, extra = {"attention_mask": mask, **fam.call}, {}
    if fam.rotary is not None:
        rope = fam.rotary(model)(x, torch.arange(x.shape[1])[None], **fam.rotary_kwargs(model, i))
        kwargs["position_embeddings"] = rope
        modeling = importlib.import_module(f"transformers.models.{fam.modeling}.modeling_{fam.modeling}")
        extra.update(rope=rope, apply_rope=modeling.apply_rotary_pos_emb)
    if getattr(layout, "qk_norm", False):
        extra.update(q_norm=module.q_norm, k_norm=module.k_norm)
    with torch.no_grad():
        own = module(x, **kwargs)[0]
        if fam.out_proj is not None:
            own = fam.out_proj(block)(own)
        scaling = getattr(module, "scaling", None) if name != "opt" else None  # OPT scales q inside q_proj's output
        mine = heads_attention(att, layout, x, scaling=scaling or layout.head_dim ** -0.5, mask=mask, **extra)
    return own, mine


@pytest.mark.parametrize("i", [0, 1])
def test_slices_reproduce_attention_and_mlp(family_model, i):
    name, model, source, adapter, layout = family_model
    blk = adapter.block(source, layout, i)
    assert blk.attention.W_Q.dtype == torch.float64 and blk.storage_eps == torch.finfo(torch.float64).eps
    x = torch.randn(1, T, layout.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
    own, mine = module_and_heads(name, model, layout, blk.attention, i, x)
    torch.testing.assert_close(mine, own, rtol=RTOL, atol=ATOL)
    if FAMILIES[name].mlp is None:
        assert blk.mlp is None
        return
    with torch.no_grad():
        torch.testing.assert_close(mlp_from_weights(blk.mlp, x), FAMILIES[name].mlp(FAMILIES[name].layers(model)[i])(x),
                                   rtol=RTOL, atol=ATOL)


ARCHITECTURE_OF = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama", "roberta": "bert", "xlm-roberta": "bert",
                   "gemma2": "gemma", "gemma3_text": "gemma", "falcon_new": "falcon", "falcon_rw": "falcon",
                   "mixtral": "moe", "qwen2_moe": "moe"}
GATED = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "stablelm", "mixtral",
         "qwen2_moe"}
WITH_QKV_BIAS = {"gpt2", "gpt_neox", "opt", "llama", "qwen2", "bert", "roberta", "xlm-roberta", "stablelm",
                 "starcoder2", "falcon", "falcon_rw", "qwen2_moe"}


def test_layout_facts(family_model):
    name, model, source, adapter, layout = family_model
    cfg = model.config
    expected_kv = {"falcon": 1, "falcon_new": 2}.get(name, getattr(cfg, "num_key_value_heads", None) or layout.n_heads)
    assert (layout.model_type, layout.n_layers, layout.n_kv_heads) == (cfg.model_type, 2, expected_kv)
    assert layout.architecture == ARCHITECTURE_OF.get(name, name)
    # config.head_dim, not hidden / heads (Gemma: 16 with hidden 32 and 4 heads, as Gemma's 256 with 640-3072)
    assert layout.head_dim == {"llama": 12, "qwen3": 12, "gemma": 16, "gemma2": 16, "gemma3_text": 16}.get(name, 8)
    assert layout.gated_mlp == (name in GATED)
    assert layout.qk_norm == (name in ("qwen3", "gemma3_text"))
    assert layout.n_experts == (3 if name in ("mixtral", "qwen2_moe") else 0)
    blk = adapter.block(source, layout, 0)
    a = blk.attention
    assert a.W_Q.shape == (layout.n_heads, layout.d_model, layout.head_dim)
    assert a.W_K.shape == a.W_V.shape == (layout.n_kv_heads, layout.d_model, layout.head_dim)
    assert a.W_O.shape == (layout.n_heads, layout.head_dim, layout.d_model)
    assert (a.b_Q is not None) == (name in WITH_QKV_BIAS)
    if name == "qwen3":
        assert blk.names["q_norm"] == "model.layers.0.self_attn.q_norm.weight"
    # the requested device and dtype are honoured (no hard-coded cpu): "meta" stands in for an accelerator
    moved = adapter.block(source, layout, 0, dtype=torch.float32, device="meta")
    tensors = [moved.attention.W_Q, moved.attention.W_K, moved.attention.W_V, moved.attention.W_O]
    tensors += [t for m in (moved.mlp, *moved.experts) if m is not None for t in (m.mlp_in, m.mlp_out)]
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in tensors)


def test_block_tensor_names_are_exactly_what_block_reads(family_model):
    _, _, source, adapter, layout = family_model

    class Spy:
        def __init__(self, inner):
            self.inner, self.read = inner, []

        def get(self, name, dtype=None, device=None):
            self.read.append(name)
            return self.inner.get(name, dtype=dtype, device=device)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    spy = Spy(source)
    adapter.block(spy, layout, 1)
    names = adapter.block_tensor_names(layout, 1)
    assert sorted(spy.read) == sorted(names) and len(set(names)) == len(names)
    assert all(".1." in n for n in names) and set(names) <= set(source.keys())


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_experts_and_router_reproduce_the_sparse_block(name):
    """Each expert's (gate, up, down) is the model's own expert (its experts module routed every token to that one
    expert with weight 1); the router gives the model's router logits; Qwen2-MoE's shared expert is ``block.mlp``."""
    model = build(name)
    source = open_weights(model)
    adapter = get_adapter(source.config, source.keys())
    layout = adapter.layout(source.config, source.keys())
    x = torch.randn(T, layout.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for i in range(layout.n_layers):
        blk = adapter.block(source, layout, i)
        moe = FAMILIES[name].layers(model)[i].mlp
        assert len(blk.experts) == layout.n_experts == 3 and blk.router.shape == (3, layout.d_model)
        with torch.no_grad():
            torch.testing.assert_close(x @ blk.router.T, moe.gate(x)[0], rtol=RTOL, atol=ATOL)
            for e, expert in enumerate(blk.experts):
                route = torch.full((T, 1), e)
                own = moe.experts(x, route, torch.ones(T, 1, dtype=torch.float64))
                torch.testing.assert_close(mlp_from_weights(expert, x), own, rtol=RTOL, atol=ATOL)
            assert (blk.mlp is not None) == (name == "qwen2_moe")
            if blk.mlp is not None:
                torch.testing.assert_close(mlp_from_weights(blk.mlp, x), moe.shared_expert(x), rtol=RTOL, atol=ATOL)
        assert blk.names["router"] == f"model.layers.{i}.mlp.gate.weight"
        if name == "qwen2_moe":
            assert "shared_router" in blk.names and "shared_router" not in [
                r for r, n in blk.names.items() if n in adapter.block_tensor_names(layout, i)]


def test_grouped_query_mapping_matches_repeat_kv():
    from transformers.models.llama.modeling_llama import repeat_kv

    model = build("llama")
    source = open_weights(model)
    adapter = get_adapter(source.config, source.keys())
    layout = adapter.layout(source.config, source.keys())
    att = adapter.block(source, layout, 0).attention
    x = torch.randn(1, T, layout.d_model, dtype=torch.float64)
    k = heads_attention(att, layout, x, scaling=1.0, mask=None, return_kv=True)  # (1, n_kv, T, dh)
    ours = k[:, [layout.kv_head_of(h) for h in range(layout.n_heads)]]
    torch.testing.assert_close(ours, repeat_kv(k, layout.n_heads // layout.n_kv_heads), rtol=0, atol=0)
    assert [layout.kv_head_of(h) for h in range(4)] == [0, 0, 1, 1]


def test_llama_like_fallback_on_renamed_model_type():
    model = build("llama")
    source = open_weights(model)
    config = dict(source.config, model_type="my_llama_clone")
    assert "my_llama_clone" not in registered_model_types()
    adapter = get_adapter(config, source.keys())
    layout = adapter.layout(config, source.keys())
    assert layout.architecture == adapter.name == "llama-like(my_llama_clone)"
    assert layout.model_type == "my_llama_clone"
    x = torch.randn(1, T, layout.d_model, dtype=torch.float64)
    own, mine = module_and_heads("llama", model, layout, adapter.block(source, layout, 1).attention, 1, x)
    torch.testing.assert_close(mine, own, rtol=RTOL, atol=ATOL)


def test_unsupported_architecture_messages():
    gpt2 = open_weights(build("gpt2"))
    with pytest.raises(UnsupportedArchitectureError) as err:
        get_adapter({"model_type": "mystery", "hidden_size": 32, "num_attention_heads": 4}, gpt2.keys())
    msg = str(err.value)
    assert "'mystery'" in msg and "model.layers.0.self_attn.q_proj.weight" in msg and "register_adapter" in msg
    assert "\n" not in msg
    with pytest.raises(UnsupportedArchitectureError, match="config has no hidden_size"):
        get_adapter({"model_type": "mystery", "num_attention_heads": 4}, gpt2.keys())
    with pytest.raises(UnsupportedArchitectureError, match="keys=source.keys"):
        get_adapter({"model_type": "mystery", "hidden_size": 32, "num_attention_heads": 4})
    with pytest.raises(UnsupportedArchitectureError, match="no model_type"):
        get_adapter({"hidden_size": 32})
    # a registered model_type whose checkpoint lacks the family's tensors
    with pytest.raises(UnsupportedArchitectureError, match=r"'llama'.*model\.layers\.0\.self_attn\.q_proj\.weight"):
        get_adapter({"model_type": "llama"}).layout(dict(gpt2.config, model_type="llama"), gpt2.keys())


def test_bad_config_and_layer_errors():
    model = build("llama")
    source = open_weights(model)
    adapter = get_adapter(source.config, source.keys())
    wrong = dict(source.config, head_dim=None)  # falls back to 32 / 4 = 8, but the tensors have head_dim 12
    layout = adapter.layout(wrong, source.keys())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*head_dim=8"):
        adapter.block(source, layout, 0)
    good = adapter.layout(source.config, source.keys())
    with pytest.raises(ValueError, match="layer index 2"):
        adapter.block_tensor_names(good, 2)
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        adapter.layout(dict(source.config, num_key_value_heads=3), source.keys())
    with pytest.raises(ValueError, match="3 layers"):
        adapter.layout(dict(source.config, num_hidden_layers=3), source.keys())
    plain = ModelLayout(**{k: v for k, v in good.to_dict().items() if k in ModelLayout.__dataclass_fields__})
    with pytest.raises(ValueError, match=r"adapter\.layout"):
        adapter.block(source, plain, 0)


def test_register_adapter_for_a_new_family(monkeypatch, tmp_path):
    import hf_flag.weights.adapters as registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave the global registry as it was
    # a user family: Llama's tensors under a different layer stack name
    model = build("mistral")
    sd = {k.replace("model.layers.", "model.blocks."): v for k, v in model.state_dict().items()}
    keys = list(sd)
    spec = AdapterSpec(name="blocky", stack="blocks", attention="linear", mlp="gated",
                       tensors={r: get_adapter({"model_type": "llama"}).spec.tensors[r]
                                for r in ("q", "k", "v", "o", "mlp_gate", "mlp_in", "mlp_out")},
                       grouped_query=True)
    adapter = register_adapter("blocky_test", spec)
    assert get_adapter({"model_type": "blocky_test"}) is adapter
    assert get_adapter(model.config).name == "llama"  # a PretrainedConfig works as well as a dict
    with pytest.raises(ValueError, match="overwrite=True"):
        register_adapter("blocky_test", get_adapter({"model_type": "gpt2"}))
    config = dict(model.config.to_dict(), model_type="blocky_test")
    layout = adapter.layout(config, keys)
    assert isinstance(layout, CheckpointLayout) and layout.architecture == "blocky"
    assert adapter.block_tensor_names(layout, 1)[0] == "model.blocks.1.self_attn.q_proj.weight"
    # the user family's block reproduces the model's own attention, read from a checkpoint with the new names
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with open_weights(tmp_path / "model.safetensors") as renamed:
        att = adapter.block(renamed, layout, 1).attention
    x = torch.randn(1, T, layout.d_model, dtype=torch.float64)
    own, mine = module_and_heads("mistral", model, layout, att, 1, x)
    torch.testing.assert_close(mine, own, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="roles"):
        AdapterSpec(name="bad", stack="layers", attention="linear", mlp="gated", tensors={"q": "q.weight"})


# --- plain MLP chains -------------------------------------------------------------------------------------------


def test_linear_chain_sequential():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 2))
    for chain in (linear_chain(net), linear_chain(open_weights(net))):
        assert [c.name for c in chain] == ["0", "2", "4"]
        assert [c.activation_after for c in chain] == ["relu", "gelu", "identity"]
        for c, j in zip(chain, (0, 2, 4)):
            assert c.weight.dtype == torch.float64
            assert (c.storage_dtype, c.storage_eps) == ("float32", torch.finfo(torch.float32).eps)
            torch.testing.assert_close(c.weight, net[j].weight.double(), rtol=0, atol=0)
            torch.testing.assert_close(c.bias, net[j].bias.double(), rtol=0, atol=0)
    # the chain recomputes the network's output
    x = torch.randn(7, 3, dtype=torch.float64)
    h = x
    for c in chain:
        h = ACT2FN["linear" if c.activation_after == "identity" else c.activation_after](h @ c.weight.T + c.bias)
    torch.testing.assert_close(h, net.double()(x), rtol=1e-12, atol=1e-12)


def test_linear_chain_nested_and_custom_modules():
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 3, bias=False), nn.Tanh(), nn.Dropout(0.1)),
                           nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.2)), nn.Linear(3, 1), nn.Sigmoid())
    chain = linear_chain(nested, dtype=None)
    assert [c.name for c in chain] == ["0.0", "1.0", "2"]
    assert [c.activation_after for c in chain] == ["tanh", "leaky_relu", "sigmoid"]
    assert chain[0].bias is None and chain[0].weight.dtype == torch.float32

    class Custom(nn.Module):  # forward applies relu functionally: invisible to a module walk
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.GELU("tanh"), nn.Linear(5, 2)

    assert [c.activation_after for c in linear_chain(Custom())] == ["unknown", "gelu_tanh", "identity"]
    assert all(c.weight.device.type == "meta" for c in linear_chain(Custom(), device="meta"))
    with pytest.raises(ValueError, match="do not chain"):
        linear_chain(nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match="no 2-D Linear"):
        linear_chain(nn.Sequential(nn.ReLU()))


def test_linear_chain_from_checkpoint_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(4, 4), nn.ReLU())], nn.Linear(4, 3))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    chain = linear_chain(open_weights(tmp_path / "model.safetensors"))
    assert [c.name for c in chain] == [str(j) for j in range(0, 13, 2)]  # natural order: "10" after "8"
    assert [c.activation_after for c in chain] == ["unknown"] * 6 + ["identity"]
    assert {(c.storage_dtype, c.storage_eps) for c in chain} == {("float32", torch.finfo(torch.float32).eps)}
    torch.testing.assert_close(chain[-1].weight, net[12].weight.double(), rtol=0, atol=0)


def per_expert_checkpoint(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as the Hub stores mixture-of-experts checkpoints: one tensor per expert (Mixtral's
    block_sparse_moe w1 / w3 / w2 and router, Qwen2-MoE's mlp.experts.N.gate/up/down_proj)."""
    out = {}
    for key, w in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            gate, up = w.chunk(2, dim=1)
            for e in range(w.shape[0]):
                if name == "mixtral":
                    base = key.replace("mlp.experts.gate_up_proj", f"block_sparse_moe.experts.{e}")
                    out[f"{base}.w1.weight"], out[f"{base}.w3.weight"] = gate[e].clone(), up[e].clone()
                else:
                    base = key.replace("gate_up_proj", f"{e}")
                    out[f"{base}.gate_proj.weight"], out[f"{base}.up_proj.weight"] = gate[e].clone(), up[e].clone()
        elif key.endswith("mlp.experts.down_proj"):
            for e in range(w.shape[0]):
                if name == "mixtral":
                    out[key.replace("mlp.experts.down_proj", f"block_sparse_moe.experts.{e}.w2.weight")] = w[e].clone()
                else:
                    out[key.replace("down_proj", f"{e}.down_proj.weight")] = w[e].clone()
        elif name == "mixtral" and key.endswith("mlp.gate.weight"):
            out[key.replace("mlp.gate", "block_sparse_moe.gate")] = w.clone()
        else:
            out[key] = w.clone()
    return out


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_per_expert_hub_checkpoint(tmp_path, name):
    """A Hub-style checkpoint (one tensor per expert) reads as the same experts and router: transformers loads the
    file into the same model (its checkpoint conversion is the reference for the names), and hf-flag's experts equal
    the model's own experts."""
    from safetensors.torch import save_file

    model = build(name)
    save_file(per_expert_checkpoint(name, model), str(tmp_path / "model.safetensors"))
    model.config.to_json_file(str(tmp_path / "config.json"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    for key, w in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], w, rtol=0, atol=0)
    with open_weights(tmp_path) as source:
        adapter = get_adapter(source.config, source.keys())
        layout = adapter.layout(source.config, source.keys())
        names = adapter.block_tensor_names(layout, 1)
        assert len([n for n in names if ".experts." in n]) == 3 * 3 and len(set(names)) == len(names)
        blk = adapter.block(source, layout, 1)
        reference = adapter.block(open_weights(model), adapter.layout(model.config, open_weights(model).keys()), 1)
    torch.testing.assert_close(blk.router, reference.router, rtol=0, atol=0)
    for mine, ref in zip(blk.experts, reference.experts, strict=True):
        for part in ("mlp_gate", "mlp_in", "mlp_out"):
            torch.testing.assert_close(getattr(mine, part), getattr(ref, part), rtol=0, atol=0)
    assert "{e}" in blk.names["experts_out"]


def test_moe_analysis_gives_each_expert_the_rows_of_a_dense_mlp():
    """Each routed expert's mlp / mlp_gate rows equal the rows of a dense Llama whose MLP holds that expert's
    weights (the dense path of the analysis as the reference); NaN in one expert is found and named."""
    from hf_flag import analyze
    from hf_flag.errors import NonFiniteWeightsError

    moe = build("mixtral")
    rows = analyze(moe, device="cpu", diagnostics={"mlp"}, full=True).rows  # full: every value computed
    assert {r.source for r in rows} == {f"expert {e} mlp.{p}" for e in range(3) for p in ("in", "gate")}
    for e in range(3):
        dense = build("llama")  # same sizes (LLAMA_LIKE): an expert's hidden size is intermediate_size
        with torch.no_grad():
            for i, layer in enumerate(dense.model.layers):
                experts = moe.model.layers[i].mlp.experts
                gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
                for linear, w in ((layer.mlp.gate_proj, gate), (layer.mlp.up_proj, up),
                                  (layer.mlp.down_proj, experts.down_proj[e])):
                    linear.weight.copy_(w)
                    linear.bias = None  # the tiny Llama has mlp_bias; the experts have none
        ref = {(r.kind, r.layer): r.values for r in analyze(dense, device="cpu", diagnostics={"mlp"},
                                                                full=True).rows}
        mine = [r for r in rows if r.source.startswith(f"expert {e} ")]
        assert len(mine) == len(ref) == 4
        for r in mine:
            for metric, value in ref[(r.kind, r.layer)].items():
                if value is None:  # a value full=True withholds (gl_kernel_dim_baseline where it is not provable)
                    assert r.values[metric] is None, (r.kind, metric)
                else:
                    assert r.values[metric] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), (r.kind, metric)
    with torch.no_grad():
        moe.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"layer 1.*model\.layers\.1\.mlp\.experts\.down_proj"):
        analyze(moe, device="cpu", diagnostics={"mlp"})
