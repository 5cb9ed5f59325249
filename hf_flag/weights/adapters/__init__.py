"""Architecture adapters and their registry: ``config["model_type"]`` -> :class:`Adapter`.

The registry starts as the architecture table (``table.ARCHITECTURES``, one :class:`AdapterSpec` per model_type).
``get_adapter(config, keys)`` looks the model_type up; an unregistered model_type whose checkpoint looks like
Llama (layer-0 q/k/v/o_proj and gate/up/down_proj, config with hidden_size and num_attention_heads) gets the Llama
adapter as ``"llama-like(<model_type>)"``; anything else raises UnsupportedArchitectureError naming what is
missing.  Users add families with ``register_adapter(model_type, AdapterSpec(...))`` (see ``base.py`` for the
fields).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from hf_flag.errors import InputError, UnsupportedArchitectureError
from hf_flag.weights.adapters.base import REGISTER_HINT, Adapter, AdapterSpec, CheckpointLayout, GGUFLayout, config_dict
from hf_flag.weights.adapters.table import ARCHITECTURES, LLAMA

__all__ = ["Adapter", "AdapterSpec", "CheckpointLayout", "GGUFLayout", "get_adapter", "gguf_specs",
           "register_adapter", "registered_model_types"]

_REGISTRY: dict[str, Adapter] = {}
#: config keys the Llama-like fallback needs
FALLBACK_CONFIG_KEYS = ("hidden_size", "num_attention_heads")


def register_adapter(model_type: str, adapter: Union[Adapter, AdapterSpec], *, overwrite: bool = False) -> Adapter:
    """Register ``adapter`` (or an :class:`AdapterSpec`, wrapped) for ``config["model_type"] == model_type``.

    Re-registering a model_type raises ValueError unless ``overwrite=True``.  Returns the registered adapter.
    """
    if not isinstance(model_type, str) or not model_type:
        raise InputError(f"model_type {model_type!r} must be a non-empty string, as in config.json's model_type")
    if isinstance(adapter, AdapterSpec):
        adapter = Adapter(adapter)
    if not all(callable(getattr(adapter, m, None)) for m in ("layout", "block", "block_tensor_names")):
        raise InputError(f"adapter {adapter!r} for {model_type!r} lacks layout/block/block_tensor_names; pass an "
                         f"Adapter or AdapterSpec")
    if model_type in _REGISTRY and not overwrite and _REGISTRY[model_type] != adapter:
        raise InputError(f"model_type {model_type!r} already has the {_REGISTRY[model_type].name!r} adapter; pass "
                         f"overwrite=True to replace it")
    _REGISTRY[model_type] = adapter
    return adapter


def registered_model_types() -> list[str]:
    """The model_types with an adapter, sorted."""
    return sorted(_REGISTRY)


def gguf_specs() -> dict[str, AdapterSpec]:
    """model_type -> spec of every registered adapter that reads GGUF (its spec has a :class:`GGUFLayout`)."""
    specs = {mt: getattr(adapter, "spec", None) for mt, adapter in _REGISTRY.items()}
    return {mt: spec for mt, spec in specs.items() if isinstance(spec, AdapterSpec) and spec.gguf is not None}


def fallback_adapter(config: dict, keys: Optional[Iterable[str]]) -> Adapter:
    """The Llama adapter, named ``"llama-like(<model_type>)"``, for an unregistered model_type whose checkpoint has
    Llama's layer-0 q/k/v/o_proj and gate/up/down_proj tensors and whose config has hidden_size and
    num_attention_heads; else UnsupportedArchitectureError naming the model_type, what was missing and how to add
    an adapter."""
    model_type = config.get("model_type")
    missing_config = [k for k in FALLBACK_CONFIG_KEYS if config.get(k) is None]
    llama = Adapter(LLAMA)
    if keys is None:
        missing = "no tensor names to check (pass keys=source.keys())"
    elif missing_config:
        missing = f"config has no {' / '.join(missing_config)}"
    else:
        tensor = llama.missing_tensor(keys)
        if tensor is None:
            return llama.renamed(f"llama-like({model_type})")
        missing = f"no tensor matching {tensor}"
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no hf_flag adapter and is not Llama-like: {missing}; add an adapter with "
        f"{REGISTER_HINT}")


def get_adapter(config: Any, keys: Optional[Iterable[str]] = None) -> Adapter:
    """The adapter for ``config`` (a dict or PretrainedConfig); ``keys`` (the checkpoint's tensor names) enable the
    Llama-like fallback for unregistered model_types.  Raises UnsupportedArchitectureError otherwise."""
    config = config_dict(config)
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedArchitectureError(
            "config has no model_type; pass the model's config.json (or model.config), or register an adapter with "
            f"{REGISTER_HINT}")
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    return fallback_adapter(config, keys)


for _model_type, _spec in ARCHITECTURES.items():
    register_adapter(_model_type, _spec)
