"""The architecture table: ``config["model_type"]`` -> :class:`AdapterSpec`, one entry per family (MATH.md §6).

As peft keeps its target-module mappings, every family hf-flag reads is one entry here: the per-layer tensor name
of each role (role names are the same in every family, see ``base.py``), the storage layouts and, where llama.cpp
writes the family to GGUF, its :class:`GGUFLayout`.  Adding a family is one entry (or, from user code, one
``register_adapter(model_type, AdapterSpec(...))`` call).

GGUF layouts follow llama.cpp's ``convert_hf_to_gguf.py`` (the model class named in each comment, its
``model_arch`` and ``modify_tensors``) and transformers' ``modeling_gguf_pytorch_utils.TENSOR_PROCESSORS``, which
undoes the same reorderings; the transforms themselves are in ``gguf_source.GGUF_TRANSFORMS``.  GGUF stores no
activation: each layout names its family's (the default of the family's transformers config class).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from hf_flag.weights.adapters.base import AdapterSpec, GGUFLayout

#: llama.cpp ``LlamaModel.modify_tensors`` permutes the rows of q_proj / k_proj (weight and bias) for its rotary
#: kernel; transformers' ``LlamaTensorProcessor`` undoes it for GGUF architecture "llama"
ROPE_PERMUTED = ((r"\.attn_q\.(weight|bias)$", "unpermute_q"), (r"\.attn_k\.(weight|bias)$", "unpermute_k"))
#: llama.cpp ``GemmaModel`` / ``Gemma2Model`` / ``Gemma3Model.modify_tensors`` store RMSNorm gains as 1 + w;
#: transformers' ``Gemma2TensorProcessor`` subtracts the 1 from every "norm.weight"
GEMMA_NORMS = ((r"norm\.weight$", "minus_one"),)
#: Gemma's and Starcoder2's MLP activation (transformers' ``hidden_act`` / ``hidden_activation`` default)
GELU_TANH = "gelu_pytorch_tanh"

_LLAMA_ROLES = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
                "o": "self_attn.o_proj.weight"}
_LLAMA_BIASES = {"q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
                 "v_bias": "self_attn.v_proj.bias", "o_bias": "self_attn.o_proj.bias"}
_QK_NORMS = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}

#: Llama-family decoders: separate q/k/v/o_proj with grouped-query attention and ``head_dim`` from the config when
#: it sets one; gate/up/down MLP; optional biases (Qwen2's q/k/v, ``attention_bias`` / ``mlp_bias``) and per-head
#: q/k RMSNorms (Qwen3, Gemma 3: recorded, not read).
LLAMA = AdapterSpec(
    name="llama",
    stack="layers",
    attention="linear",
    mlp="gated",
    tensors={**_LLAMA_ROLES, "mlp_gate": "mlp.gate_proj.weight", "mlp_in": "mlp.up_proj.weight",
             "mlp_out": "mlp.down_proj.weight"},
    optional={**_LLAMA_BIASES, "mlp_gate_bias": "mlp.gate_proj.bias", "mlp_in_bias": "mlp.up_proj.bias",
              "mlp_out_bias": "mlp.down_proj.bias", **_QK_NORMS},
    grouped_query=True,
    canonical_prefix="model.",
)

#: Mixture-of-experts decoders (Mixtral, Qwen2-MoE): Llama attention, then a router ``mlp.gate`` (n_experts, d)
#: and experts stacked as transformers >= 5 holds them (``mlp.experts.gate_up_proj`` (E, 2 f, d) rows [gate; up],
#: ``mlp.experts.down_proj`` (E, d, f)) or as GGUF stores them (gguf-py names the stacked ``ffn_gate_exps`` /
#: ``ffn_up_exps`` ``mlp.experts.gate_proj`` / ``up_proj``); Qwen2-MoE adds a shared expert and its scalar gate.
MOE = AdapterSpec(
    name="moe",
    stack="layers",
    attention="linear",
    mlp="moe",
    tensors={**_LLAMA_ROLES, "router": "mlp.gate.weight", "experts_out": "mlp.experts.down_proj"},
    optional={**_LLAMA_BIASES, **_QK_NORMS, "experts_gate_up": "mlp.experts.gate_up_proj",
              "experts_gate": "mlp.experts.gate_proj", "experts_in": "mlp.experts.up_proj",
              "shared_gate": "mlp.shared_expert.gate_proj.weight", "shared_in": "mlp.shared_expert.up_proj.weight",
              "shared_out": "mlp.shared_expert.down_proj.weight", "shared_router": "mlp.shared_expert_gate.weight"},
    grouped_query=True,
    canonical_prefix="model.",
)

#: Mixture-of-experts checkpoints as published on the Hub, one tensor per expert (transformers >= 5 stacks them on
#: load): Mixtral's block_sparse_moe w1 (gate), w3 (up), w2 (down) and Qwen2-MoE's per-expert gate/up/down_proj
MIXTRAL_PER_EXPERT = replace(
    MOE, tensors={**_LLAMA_ROLES, "router": "block_sparse_moe.gate.weight",
                  "experts_out": "block_sparse_moe.experts.{e}.w2.weight"},
    optional={**_LLAMA_BIASES, "experts_gate": "block_sparse_moe.experts.{e}.w1.weight",
              "experts_in": "block_sparse_moe.experts.{e}.w3.weight"})
QWEN2_MOE_PER_EXPERT = replace(
    MOE, tensors={**_LLAMA_ROLES, "router": "mlp.gate.weight", "experts_out": "mlp.experts.{e}.down_proj.weight"},
    optional={**MOE.optional, "experts_gate": "mlp.experts.{e}.gate_proj.weight",
              "experts_in": "mlp.experts.{e}.up_proj.weight"})

_BERT = AdapterSpec(  # BERT-style encoders; the bert. / roberta. prefix of task models is found in the checkpoint
    name="bert",
    stack="encoder.layer",
    attention="linear",
    mlp="linear",
    tensors={"q": "attention.self.query.weight", "k": "attention.self.key.weight",
             "v": "attention.self.value.weight", "o": "attention.output.dense.weight",
             "mlp_in": "intermediate.dense.weight", "mlp_out": "output.dense.weight"},
    optional={"q_bias": "attention.self.query.bias", "k_bias": "attention.self.key.bias",
              "v_bias": "attention.self.value.bias", "o_bias": "attention.output.dense.bias",
              "mlp_in_bias": "intermediate.dense.bias", "mlp_out_bias": "output.dense.bias"},
)


def falcon_kv_heads(config: Mapping[str, Any]) -> int:
    """Falcon's key/value head count as transformers' ``FalconAttention`` derives it: ``num_kv_heads`` for the new
    decoder architecture (or neither multi-query nor new), 1 for multi-query."""
    if config.get("new_decoder_architecture") or not config.get("multi_query", True):
        return int(config.get("num_kv_heads") or config["num_attention_heads"])
    return 1


ARCHITECTURES: dict[str, AdapterSpec] = {
    # GPT-2: fused Conv1D attention and MLP, stored in x out; llama.cpp GPT2Model transposes the four matrices to
    # nn.Linear layout (transformers' GPT2TensorProcessor transposes back)
    "gpt2": AdapterSpec(
        name="gpt2", stack="h", attention="conv1d_fused_qkv", mlp="conv1d",
        tensors={"qkv": "attn.c_attn.weight", "o": "attn.c_proj.weight",
                 "mlp_in": "mlp.c_fc.weight", "mlp_out": "mlp.c_proj.weight"},
        optional={"qkv_bias": "attn.c_attn.bias", "o_bias": "attn.c_proj.bias",
                  "mlp_in_bias": "mlp.c_fc.bias", "mlp_out_bias": "mlp.c_proj.bias"},
        canonical_prefix="transformer.",
        gguf=GGUFLayout("gpt2", ((r"\.(attn_qkv|attn_output|ffn_up|ffn_down)\.weight$", "transpose"),),
                        activation="gelu_new")),
    # GPT-NeoX / Pythia: query_key_value rows (head, {q, k, v}, head_dim), i.e. grouped with n_kv = n_heads;
    # llama.cpp GPTNeoXModel.modify_tensors reorders them to [Q; K; V] (undone as transformers' Bloom processor does)
    "gpt_neox": AdapterSpec(
        name="gpt_neox", stack="layers", attention="fused_qkv_grouped", mlp="linear",
        tensors={"qkv": "attention.query_key_value.weight", "o": "attention.dense.weight",
                 "mlp_in": "mlp.dense_h_to_4h.weight", "mlp_out": "mlp.dense_4h_to_h.weight"},
        optional={"qkv_bias": "attention.query_key_value.bias", "o_bias": "attention.dense.bias",
                  "mlp_in_bias": "mlp.dense_h_to_4h.bias", "mlp_out_bias": "mlp.dense_4h_to_h.bias"},
        canonical_prefix="gpt_neox.",
        gguf=GGUFLayout("gptneox", ((r"\.attn_qkv\.(weight|bias)$", "group_qkv"),), activation="gelu")),
    # OPT: separate q/k/v/out_proj with biases, fc1/fc2 MLP (no GGUF converter in llama.cpp)
    "opt": AdapterSpec(
        name="opt", stack="decoder.layers", attention="linear", mlp="linear",
        tensors={"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
                 "o": "self_attn.out_proj.weight", "mlp_in": "fc1.weight", "mlp_out": "fc2.weight"},
        optional={"q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
                  "v_bias": "self_attn.v_proj.bias", "o_bias": "self_attn.out_proj.bias",
                  "mlp_in_bias": "fc1.bias", "mlp_out_bias": "fc2.bias"},
        canonical_prefix="model."),
    # llama.cpp LlamaModel (arch "llama", also Mistral's): q/k rows permuted
    "llama": replace(LLAMA, gguf=GGUFLayout("llama", ROPE_PERMUTED, activation="silu")),
    "mistral": replace(LLAMA, gguf=GGUFLayout("llama", ROPE_PERMUTED, activation="silu")),
    # llama.cpp Qwen2Model / Qwen3Model: stored as in the checkpoint
    "qwen2": replace(LLAMA, gguf=GGUFLayout("qwen2", activation="silu")),
    "qwen3": replace(LLAMA, gguf=GGUFLayout("qwen3", activation="silu")),
    # Gemma, Gemma 2, Gemma 3 (text): Llama names, head_dim from the config (256 with hidden 640-3072), gelu-tanh
    # gated MLP; Gemma 3's q/k norms recorded; soft-capping and the extra sandwich norms do not touch the weights read
    "gemma": replace(LLAMA, name="gemma", gguf=GGUFLayout("gemma", GEMMA_NORMS, activation=GELU_TANH)),
    "gemma2": replace(LLAMA, name="gemma", gguf=GGUFLayout("gemma2", GEMMA_NORMS, activation=GELU_TANH)),
    "gemma3_text": replace(LLAMA, name="gemma", gguf=GGUFLayout("gemma3", GEMMA_NORMS, activation=GELU_TANH)),
    # StableLM: Llama names (q/k/v biases with use_qkv_bias); llama.cpp StableLMModel stores them as they are
    "stablelm": replace(LLAMA, name="stablelm", gguf=GGUFLayout("stablelm", activation="silu")),
    # Starcoder2: q/k/v/o with biases, plain c_fc / c_proj MLP; llama.cpp StarCoder2Model stores them as they are
    "starcoder2": AdapterSpec(
        name="starcoder2", stack="layers", attention="linear", mlp="linear",
        tensors={**_LLAMA_ROLES, "mlp_in": "mlp.c_fc.weight", "mlp_out": "mlp.c_proj.weight"},
        optional={**_LLAMA_BIASES, "mlp_in_bias": "mlp.c_fc.bias", "mlp_out_bias": "mlp.c_proj.bias"},
        grouped_query=True, canonical_prefix="model.", gguf=GGUFLayout("starcoder2", activation=GELU_TANH)),
    # Falcon: fused query_key_value in kv groups (see falcon_kv_heads); llama.cpp FalconModel.modify_tensors
    # rearranges it to [Q; K; V] (a bias, which Falcon checkpoints do not have, is regrouped the same way).  From
    # GGUF: head_count_kv is the key/value head count (1 for multi-query; llama.cpp's loader defaults it to
    # head_count), and group_qkv regroups the rows into head_count_kv groups, which is transformers' new-architecture
    # layout (multi-query is its one-group case), so the config read says so
    "falcon": AdapterSpec(
        name="falcon", stack="h", attention="fused_qkv_grouped", mlp="linear",
        tensors={"qkv": "self_attention.query_key_value.weight", "o": "self_attention.dense.weight",
                 "mlp_in": "mlp.dense_h_to_4h.weight", "mlp_out": "mlp.dense_4h_to_h.weight"},
        optional={"qkv_bias": "self_attention.query_key_value.bias", "o_bias": "self_attention.dense.bias",
                  "mlp_in_bias": "mlp.dense_h_to_4h.bias", "mlp_out_bias": "mlp.dense_4h_to_h.bias"},
        kv_heads=falcon_kv_heads, canonical_prefix="transformer.",
        gguf=GGUFLayout("falcon", ((r"\.attn_qkv\.(weight|bias)$", "group_qkv"),), activation="gelu",
                        config_keys={"attention.head_count_kv": "num_kv_heads"},
                        config={"new_decoder_architecture": True})),
    # Phi-3: fused qkv_proj [Q; K; V] and gate_up_proj [gate; up]; llama.cpp Phi3MiniModel keeps both fused
    "phi3": AdapterSpec(
        name="phi3", stack="layers", attention="fused_qkv", mlp="fused_gate_up",
        tensors={"qkv": "self_attn.qkv_proj.weight", "o": "self_attn.o_proj.weight",
                 "mlp_gate_up": "mlp.gate_up_proj.weight", "mlp_out": "mlp.down_proj.weight"},
        optional={"qkv_bias": "self_attn.qkv_proj.bias", "o_bias": "self_attn.o_proj.bias",
                  "mlp_gate_up_bias": "mlp.gate_up_proj.bias", "mlp_out_bias": "mlp.down_proj.bias"},
        grouped_query=True, canonical_prefix="model.", gguf=GGUFLayout("phi3", activation="silu")),
    # Mixtral (llama.cpp writes it as arch "llama", q/k permuted, experts stacked) and Qwen2-MoE (arch "qwen2moe")
    "mixtral": replace(MOE, gguf=GGUFLayout("llama", ROPE_PERMUTED, activation="silu"),
                       alternatives=(MIXTRAL_PER_EXPERT,)),
    "qwen2_moe": replace(MOE, gguf=GGUFLayout("qwen2moe", ((r"\.ffn_gate_inp_shexp\.weight$", "as_row"),),
                                               activation="silu"), alternatives=(QWEN2_MOE_PER_EXPERT,)),
    # BERT-style encoders (BERT, RoBERTa, XLM-RoBERTa, MiniLM); llama.cpp BertModel / RobertaModel /
    # XLMRobertaModel write all three as arch "bert" (the "bert." prefix stripped), tensors as they are
    "bert": replace(_BERT, gguf=GGUFLayout("bert", activation="gelu")),
    "roberta": replace(_BERT, gguf=GGUFLayout("bert", activation="gelu")),
    "xlm-roberta": replace(_BERT, gguf=GGUFLayout("bert", activation="gelu")),
}
