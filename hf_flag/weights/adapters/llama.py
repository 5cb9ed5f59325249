"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) and the config-driven Llama-like fallback (MATH.md §6).

Separate q/k/v/o_proj ``nn.Linear`` with grouped-query attention (``num_key_value_heads``) and ``head_dim`` from
the config when it sets one (not ``hidden_size / num_attention_heads``); gate/up/down MLP.  Optional: Qwen2's
q/k/v biases, ``attention_bias`` / ``mlp_bias`` biases, Qwen3's per-head ``q_norm`` / ``k_norm`` (recorded, not
read: an RMSNorm after the projection leaves col(W_Q[h]) unchanged).
"""
from typing import Any, Iterable, Mapping, Optional

from hf_flag.errors import UnsupportedArchitectureError
from hf_flag.weights.adapters.base import REGISTER_HINT, Adapter, AdapterSpec

SPEC = AdapterSpec(
    name="llama",
    stack="layers",
    attention="linear",
    mlp="gated",
    tensors={"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
             "o": "self_attn.o_proj.weight", "mlp_gate": "mlp.gate_proj.weight", "mlp_in": "mlp.up_proj.weight",
             "mlp_out": "mlp.down_proj.weight"},
    optional={"q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
              "o_bias": "self_attn.o_proj.bias", "b_gate": "mlp.gate_proj.bias", "b_in": "mlp.up_proj.bias",
              "b_out": "mlp.down_proj.bias", "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"},
    grouped_query=True,
    canonical_prefix="model.",
)
ADAPTER = Adapter(SPEC)
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
FALLBACK_CONFIG_KEYS = ("hidden_size", "num_attention_heads")


def fallback_adapter(config: Mapping[str, Any], keys: Optional[Iterable[str]]) -> Adapter:
    """The Llama adapter, named ``"llama-like(<model_type>)"``, for an unregistered model_type whose checkpoint has
    Llama's layer-0 q/k/v/o_proj and gate/up/down_proj tensors and whose config has hidden_size and
    num_attention_heads; else UnsupportedArchitectureError naming the model_type, what was missing and how to add
    an adapter."""
    model_type = config.get("model_type")
    missing_config = [k for k in FALLBACK_CONFIG_KEYS if config.get(k) is None]
    if keys is None:
        missing = "no tensor names to check (pass keys=source.keys())"
    elif missing_config:
        missing = f"config has no {' / '.join(missing_config)}"
    else:
        tensor = ADAPTER.missing_tensor(keys)
        if tensor is None:
            return ADAPTER.renamed(f"llama-like({model_type})")
        missing = f"no tensor matching {tensor}"
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no hf_flag adapter and is not Llama-like: {missing}; add an adapter with "
        f"{REGISTER_HINT}")
