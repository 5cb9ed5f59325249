"""``"linear_chain"`` rows of a plain MLP: consecutive ``nn.Linear`` layers as pairs (MATH.md §2-§4)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from hf_flag.analysis.checks import check_choice, check_layers
from hf_flag.analysis.pairs import pair_rows, single
from hf_flag.defaults import CHAIN_DIAGNOSTICS
from hf_flag.errors import InputError, NonFiniteWeightsError
from hf_flag.report import Report, Row
from hf_flag.rows import KIND_LINEAR_CHAIN
from hf_flag.weights.adapters.mlp import linear_chain


def analyze_chain(module: nn.Module, name: str, *, device: torch.device, dtype: torch.dtype,
                  diagnostics: Optional[Iterable[str]], layers: Optional[Iterable[int]],
                  cheap: bool) -> tuple[Report, dict]:
    """``"linear_chain"`` rows of consecutive ``nn.Linear`` layers of a plain MLP (pair i: layer i -> i + 1)."""
    diag = check_choice("diagnostics", diagnostics, CHAIN_DIAGNOSTICS)
    chain = linear_chain(module, dtype=dtype, device=device)
    if len(chain) < 2:
        raise InputError(f"model {name!r} has {len(chain)} nn.Linear layer(s); a linear chain needs at least 2")
    sel = check_layers(layers, len(chain) - 1)
    rows: list[Row] = []
    for i in sel:
        a, b = chain[i], chain[i + 1]
        W_l, W_next, bias = a.weight, b.weight, a.bias
        for layer, tensors in ((a, (W_l, bias)), (b, (W_next,))):
            if not all(bool(torch.isfinite(t).all()) for t in tensors if t is not None):
                raise NonFiniteWeightsError(f"layer {layer.name!r}: weight or bias holds NaN/Inf values; repair "
                                            f"the model")
        rows += pair_rows(name, KIND_LINEAR_CHAIN, [(i, i + 1, a.name, b.name)], W_l[None], single(bias),
                          W_next[None], activation=a.activation_after, cheap=cheap,
                          storage_eps=max(a.storage_eps, b.storage_eps))
    layout = {"n_layers": len(chain), "widths": [chain[0].weight.shape[1]] + [c.weight.shape[0] for c in chain],
              "activations": [c.activation_after for c in chain]}
    storage = {c.storage_dtype: c.storage_eps for c in chain}
    return Report(model=name, architecture="linear_chain", layout=layout, rows=rows), {
        "diagnostics": sorted(diag), "layers": sel, "storage": storage}
