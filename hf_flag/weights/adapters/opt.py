"""OPT: separate q/k/v/out_proj ``nn.Linear`` with biases, fc1/fc2 MLP (MATH.md §6)."""
from hf_flag.weights.adapters.base import Adapter, AdapterSpec

SPEC = AdapterSpec(
    name="opt",
    stack="decoder.layers",
    attention="linear",
    mlp="linear",
    tensors={"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
             "o": "self_attn.out_proj.weight", "mlp_in": "fc1.weight", "mlp_out": "fc2.weight"},
    optional={"q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
              "o_bias": "self_attn.out_proj.bias", "b_in": "fc1.bias", "b_out": "fc2.bias"},
    canonical_prefix="model.",
)
ADAPTER = Adapter(SPEC)
MODEL_TYPES = ("opt",)
