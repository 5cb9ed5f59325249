"""Architecture adapters and their registry: ``config["model_type"]`` -> :class:`Adapter`.

``get_adapter(config, keys)`` looks the model_type up; an unregistered model_type whose checkpoint looks like
Llama (layer-0 q/k/v/o_proj and gate/up/down_proj, config with hidden_size and num_attention_heads) gets the Llama
adapter as ``"llama-like(<model_type>)"``; anything else raises UnsupportedArchitectureError.  Users add families
with ``register_adapter(model_type, Adapter(AdapterSpec(...)))`` (see ``base.py`` for the spec fields).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from hf_flag.errors import UnsupportedArchitectureError
from hf_flag.weights.adapters import bert, gpt2, llama, neox, opt, phi3
from hf_flag.weights.adapters.base import Adapter, AdapterSpec, CheckpointLayout, config_dict

__all__ = ["Adapter", "AdapterSpec", "CheckpointLayout", "get_adapter", "register_adapter",
           "registered_model_types"]

_REGISTRY: dict[str, Adapter] = {}


def register_adapter(model_type: str, adapter: Union[Adapter, AdapterSpec], *, overwrite: bool = False) -> Adapter:
    """Register ``adapter`` (or an :class:`AdapterSpec`, wrapped) for ``config["model_type"] == model_type``.

    Re-registering a model_type raises ValueError unless ``overwrite=True``.  Returns the registered adapter.
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type {model_type!r} must be a non-empty string, as in config.json's model_type")
    if isinstance(adapter, AdapterSpec):
        adapter = Adapter(adapter)
    if not all(callable(getattr(adapter, m, None)) for m in ("layout", "block", "block_tensor_names")):
        raise ValueError(f"adapter {adapter!r} for {model_type!r} lacks layout/block/block_tensor_names; pass an "
                         f"Adapter or AdapterSpec")
    if model_type in _REGISTRY and not overwrite and _REGISTRY[model_type] != adapter:
        raise ValueError(f"model_type {model_type!r} already has the {_REGISTRY[model_type].name!r} adapter; pass "
                         f"overwrite=True to replace it")
    _REGISTRY[model_type] = adapter
    return adapter


def registered_model_types() -> list[str]:
    """The model_types with an adapter, sorted."""
    return sorted(_REGISTRY)


def get_adapter(config: Any, keys: Optional[Iterable[str]] = None) -> Adapter:
    """The adapter for ``config`` (a dict or PretrainedConfig); ``keys`` (the checkpoint's tensor names) enable the
    Llama-like fallback for unregistered model_types.  Raises UnsupportedArchitectureError otherwise."""
    config = config_dict(config)
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedArchitectureError(
            "config has no model_type; pass the model's config.json (or model.config), or register an adapter with "
            "hf_flag.weights.adapters.register_adapter(model_type, adapter)")
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    return llama.fallback_adapter(config, keys)


for _family in (gpt2, neox, opt, llama, phi3, bert):
    for _model_type in _family.MODEL_TYPES:
        register_adapter(_model_type, _family.ADAPTER)
