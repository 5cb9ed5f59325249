"""BERT-style encoders (BERT, RoBERTa, XLM-RoBERTa, MiniLM): separate query/key/value with biases (MATH.md §6).

The ``bert.`` / ``roberta.`` prefix of task models is found in the checkpoint, so a bare ``BertModel`` (keys
``encoder.layer.N...``, as in all-MiniLM-L6-v2) and a ``BertForMaskedLM`` read the same way.
"""
from hf_flag.weights.adapters.base import Adapter, AdapterSpec

SPEC = AdapterSpec(
    name="bert",
    stack="encoder.layer",
    attention="linear",
    mlp="linear",
    tensors={"q": "attention.self.query.weight", "k": "attention.self.key.weight",
             "v": "attention.self.value.weight", "o": "attention.output.dense.weight",
             "mlp_in": "intermediate.dense.weight", "mlp_out": "output.dense.weight"},
    optional={"q_bias": "attention.self.query.bias", "k_bias": "attention.self.key.bias",
              "v_bias": "attention.self.value.bias", "o_bias": "attention.output.dense.bias",
              "b_in": "intermediate.dense.bias", "b_out": "output.dense.bias"},
)
ADAPTER = Adapter(SPEC)
MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
