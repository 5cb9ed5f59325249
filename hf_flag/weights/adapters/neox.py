"""GPT-NeoX / Pythia: ``query_key_value`` (n_h 3 d_h, d) interleaved per head (MATH.md §6).

transformers' ``GPTNeoXAttention`` views the projection as ``(..., n_heads, 3 * head_dim)`` and chunks the last
axis into q, k, v, so the rows are ordered (head, {q, k, v}, head_dim).
"""
from hf_flag.weights.adapters.base import Adapter, AdapterSpec

SPEC = AdapterSpec(
    name="gpt_neox",
    stack="layers",
    attention="neox_fused_interleaved",
    mlp="linear",
    tensors={"qkv": "attention.query_key_value.weight", "o": "attention.dense.weight",
             "mlp_in": "mlp.dense_h_to_4h.weight", "mlp_out": "mlp.dense_4h_to_h.weight"},
    optional={"qkv_bias": "attention.query_key_value.bias", "o_bias": "attention.dense.bias",
              "b_in": "mlp.dense_h_to_4h.bias", "b_out": "mlp.dense_4h_to_h.bias"},
    canonical_prefix="gpt_neox.",
)
ADAPTER = Adapter(SPEC)
MODEL_TYPES = ("gpt_neox",)
