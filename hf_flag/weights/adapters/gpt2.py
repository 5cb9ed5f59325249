"""GPT-2: fused ``Conv1D`` attention and MLP, stored in x out (MATH.md §6)."""
from hf_flag.weights.adapters.base import Adapter, AdapterSpec

SPEC = AdapterSpec(
    name="gpt2",
    stack="h",
    attention="conv1d_fused_qkv",  # c_attn (d, 3d) = [Q | K | V]; c_proj (d, d): W_O[h] = rows h d_h:(h+1) d_h
    mlp="conv1d",
    tensors={"qkv": "attn.c_attn.weight", "o": "attn.c_proj.weight",
             "mlp_in": "mlp.c_fc.weight", "mlp_out": "mlp.c_proj.weight"},
    optional={"qkv_bias": "attn.c_attn.bias", "o_bias": "attn.c_proj.bias",
              "b_in": "mlp.c_fc.bias", "b_out": "mlp.c_proj.bias"},
    canonical_prefix="transformer.",
)
ADAPTER = Adapter(SPEC)
MODEL_TYPES = ("gpt2",)
