"""Plain MLP chains: the ``nn.Linear`` layers of an ``nn.Sequential`` (nested or not) in order, with the activation
between consecutive layers, as :class:`~hf_flag.weights.blocks.LinearLayer` (out x in, MATH.md §2-§4).

From a module the activations are read off the activation modules between two Linear layers (ReLU -> "relu",
GELU -> "gelu" / "gelu_tanh", Tanh -> "tanh", LeakyReLU -> "leaky_relu", none -> "identity"; dropout, identity and
flatten are skipped; other modules are named by their lower-cased class name and several are joined with "+").
Inside a custom (non-Sequential) module whose forward is not visible, two Linear layers with nothing registered
between them get "unknown" (the forward may apply a functional activation).  From a checkpoint without its module,
every activation is "unknown".
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from hf_flag.errors import InputError
from hf_flag.weights.blocks import LinearLayer
from hf_flag.weights.weight_source import dtype_name

_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu", nn.Tanh: "tanh", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.SiLU: "silu",
    nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.Softplus: "softplus", nn.Mish: "mish",
    nn.Hardtanh: "hardtanh", nn.ReLU6: "relu6", nn.PReLU: "prelu", nn.Softsign: "softsign",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Tanhshrink: "tanhshrink",
}
_TRANSPARENT = (nn.Identity, nn.Dropout, nn.AlphaDropout, nn.Flatten)


def activation_name(module: nn.Module) -> str:
    """Name of an activation module (``nn.GELU(approximate="tanh")`` -> ``"gelu_tanh"``)."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else f"gelu_{module.approximate}"
    return next((n for t, n in _ACTIVATIONS.items() if isinstance(module, t)), type(module).__name__.lower())


def _leaves(module: nn.Module, prefix: str, ordered: bool) -> Iterator[tuple[str, nn.Module, bool]]:
    """Leaf modules in registration order as (state-dict name, module, every container is a Sequential)."""
    children = list(module.named_children())
    if not children:
        yield prefix, module, ordered
        return
    ordered = ordered and isinstance(module, nn.Sequential)
    for name, child in children:
        yield from _leaves(child, f"{prefix}.{name}" if prefix else name, ordered)


def _check_chain(layers: list[LinearLayer]) -> list[LinearLayer]:
    if not layers:
        raise InputError("linear_chain found no 2-D Linear weights; pass an nn.Sequential of nn.Linear layers")
    for a, b in zip(layers, layers[1:]):
        if a.weight.shape[0] != b.weight.shape[1]:
            raise InputError(f"layers {a.name!r} (out {a.weight.shape[0]}) and {b.name!r} (in {b.weight.shape[1]}) "
                             f"do not chain; linear_chain needs consecutive Linear layers with matching sizes")
    return layers


def _module_chain(module: nn.Module, dtype: Optional[torch.dtype], device: Any) -> list[LinearLayer]:
    leaves = list(_leaves(module, "", True))
    linear_at = [j for j, (_, m, _) in enumerate(leaves) if isinstance(m, nn.Linear)]
    layers = []
    for pos, j in enumerate(linear_at):
        end = linear_at[pos + 1] if pos + 1 < len(linear_at) else len(leaves)
        between = [activation_name(m) for _, m, _ in leaves[j + 1:end] if not isinstance(m, _TRANSPARENT)]
        certain = end == len(leaves) or (leaves[j][2] and leaves[end][2])
        name, linear, _ = leaves[j]
        layers.append(LinearLayer(
            name=name,
            weight=linear.weight.detach().to(dtype=dtype, device=device),
            bias=None if linear.bias is None else linear.bias.detach().to(dtype=dtype, device=device),
            activation_after="+".join(between) or ("identity" if certain else "unknown"),
            storage_dtype=dtype_name(linear.weight.dtype),
            storage_eps=float(torch.finfo(linear.weight.dtype).eps),
        ))
    return _check_chain(layers)


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _source_chain(source: Any, dtype: Optional[torch.dtype], device: Any) -> list[LinearLayer]:
    keys = set(source.keys())
    weights = sorted((k for k in keys if k.endswith(".weight") and len(source.shape(k)) == 2), key=_natural_key)
    layers = []
    for w in weights:
        b = w[: -len("weight")] + "bias"
        layers.append(LinearLayer(
            name=w[: -len(".weight")],
            weight=source.get(w, dtype=dtype, device=device),
            bias=source.get(b, dtype=dtype, device=device) if b in keys else None,
            activation_after="unknown",
            storage_dtype=source.storage_dtype(w),
            storage_eps=source.storage_eps(w),
        ))
    if layers:
        layers[-1].activation_after = "identity"
    return _check_chain(layers)


def linear_chain(source_or_module: Union[nn.Module, Any], *, dtype: Optional[torch.dtype] = torch.float64,
                 device: Optional[Union[torch.device, str]] = None) -> list[LinearLayer]:
    """The Linear layers of an MLP chain in order, out x in, in ``dtype`` on ``device`` (``None`` keeps them).

    ``source_or_module``: an ``nn.Module`` (an ``nn.Sequential``, nested Sequentials, or a module whose Linear
    children are registered in forward order), a WeightSource of one (its module is used when it has one), or a
    WeightSource of a checkpoint (layers in natural name order, activations "unknown").  Raises ValueError when
    there is no Linear layer or consecutive layers do not chain (out of one != in of the next).
    """
    module = source_or_module if isinstance(source_or_module, nn.Module) else getattr(source_or_module, "module", None)
    if isinstance(module, nn.Module):
        return _module_chain(module, dtype, device)
    if not all(callable(getattr(source_or_module, m, None)) for m in ("keys", "shape", "get")):
        raise InputError(f"linear_chain got a {type(source_or_module).__name__}; pass an nn.Module or "
                         f"hf_flag.weights.sources.open_weights(...) of one")
    return _source_chain(source_or_module, dtype, device)
