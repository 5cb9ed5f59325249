"""In-memory models (``nn.Module`` / ``PreTrainedModel``) as a :class:`WeightSource`."""
from __future__ import annotations

import torch
from torch import nn

from hf_flag.errors import WeightSourceError
from hf_flag.weights.weight_source import WeightSource, dtype_name


def _module_config(module: nn.Module) -> dict:
    """``module.config.to_dict()`` for transformers models, ``{}`` for plain modules."""
    config = getattr(module, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, dict):
        return dict(config)
    return {}


class ModuleSource(WeightSource):
    """A view of ``module.state_dict()`` (parameters and buffers, no copies), named as the state dict names them.

    ``get`` without ``dtype``/``device`` returns the parameter's own (detached) storage; the storage dtype is the
    parameter's dtype.  Parameters on the ``meta`` device (offloaded or not yet materialised) cannot be read.
    """

    def __init__(self, module: nn.Module, *, name: str | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise WeightSourceError(f"model of type {type(module).__name__} is not a torch.nn.Module; pass a "
                                    f"module, a local path, or a cached Hub id")
        self.module = module
        self.config = _module_config(module)
        self.name = name or type(module).__name__  # not config _name_or_path: the checkpoint it was loaded from
        self._tensors: dict[str, torch.Tensor] = module.state_dict(keep_vars=False)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_key(name)
        return tuple(self._tensors[name].shape)

    def _read(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        if tensor.is_meta:
            raise WeightSourceError(f"tensor {name!r} of {self.name!r} is on the meta device (offloaded or not "
                                    f"loaded); load the model with real weights or pass its checkpoint path")
        return tensor

    def storage_dtype(self, name: str) -> str:
        self._check_key(name)
        return dtype_name(self._tensors[name].dtype)

    def nbytes(self) -> int:
        """Bytes of the distinct storages (tied weights counted once)."""
        seen: dict[tuple, int] = {}
        for t in self._tensors.values():
            if t.is_meta:
                continue
            key = (t.device, t.untyped_storage().data_ptr())
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return sum(seen.values())
