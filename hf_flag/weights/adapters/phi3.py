"""Phi-3: fused ``qkv_proj`` = [Q; K; V] rows and ``gate_up_proj`` = [gate; up] rows (MATH.md §6)."""
from hf_flag.weights.adapters.base import Adapter, AdapterSpec

SPEC = AdapterSpec(
    name="phi3",
    stack="layers",
    attention="phi3_fused",
    mlp="phi3_fused",
    tensors={"qkv": "self_attn.qkv_proj.weight", "o": "self_attn.o_proj.weight",
             "gate_up": "mlp.gate_up_proj.weight", "mlp_out": "mlp.down_proj.weight"},
    optional={"qkv_bias": "self_attn.qkv_proj.bias", "o_bias": "self_attn.o_proj.bias",
              "gate_up_bias": "mlp.gate_up_proj.bias", "b_out": "mlp.down_proj.bias"},
    grouped_query=True,
    canonical_prefix="model.",
)
ADAPTER = Adapter(SPEC)
MODEL_TYPES = ("phi3",)
