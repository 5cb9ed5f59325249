"""The :class:`WeightSource` interface: named tensors read one at a time, plus the model's config.

Every source (safetensors, GGUF, in-memory module, opt-in pickle) answers the same questions: which tensors exist,
their shapes, the dtype they are *stored* in and its relative precision (which sets the flag tolerance,
MATH.md §4), and the tensor itself, converted on request.  Sources never instantiate a model.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Union

import torch

from hf_flag.errors import WeightSourceError

DeviceLike = Union[str, torch.device, None]

#: safetensors header dtype codes -> torch dtype names (the names ``storage_dtype`` reports)
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the string form ``storage_dtype`` reports."""
    return str(dtype).removeprefix("torch.")


def float_dtype_eps(name: str) -> Optional[float]:
    """``torch.finfo(dtype).eps`` for a floating torch dtype name, 0.0 for exact (integer/bool) storage,
    ``None`` when ``name`` is not a torch dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        return None
    if dtype.is_floating_point:
        return float(torch.finfo(dtype).eps)
    return 0.0


def read_shard_index(index: Path) -> dict[str, Path]:
    """Tensor name -> shard path of a sharded checkpoint's index (``model.safetensors.index.json`` or
    ``pytorch_model.bin.index.json``); every listed shard must exist beside the index."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        mapping = {str(k): index.parent / str(v) for k, v in weight_map.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise WeightSourceError(f"shard index {str(index)!r} is not valid JSON with a 'weight_map' object; "
                                f"re-download or re-save it") from None
    for shard in sorted(set(mapping.values())):
        if not shard.is_file():
            raise WeightSourceError(f"shard index {str(index)!r} lists shard {shard.name!r}, which is missing; "
                                    f"download all shards into {str(index.parent)!r}")
    return mapping


class WeightSource(ABC):
    """Read-only access to a checkpoint's named tensors, lazily, one tensor at a time.

    Attributes: ``name`` (a label for reports: folder name, Hub id, file name or model class) and ``config``
    (the model's ``config.json`` as a dict; ``{}`` when there is none).  Use as a context manager, or call
    :meth:`close`, to release file handles.
    """

    name: str
    config: dict
    _closed: bool = False

    @abstractmethod
    def keys(self) -> list[str]:
        """Tensor names, in checkpoint order."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` as the model uses it (out x in for linear weights), without reading data."""

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its natural dtype (dequantised float32 for quantised storage)."""

    @abstractmethod
    def storage_dtype(self, name: str) -> str:
        """Storage dtype of ``name``: a torch dtype name (``"bfloat16"``, ``"float32"``) or a GGUF quantisation
        type (``"Q4_1"``, ``"Q8_0"``)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the stored tensors occupy (quantised size for GGUF)."""

    def storage_eps(self, name: str) -> float:
        """Relative precision of the stored values of ``name``: ``torch.finfo(dtype).eps`` for float storage,
        0.0 for integer storage (exact).  Quantised sources override this (MATH.md §4: tolerance ~ eps)."""
        eps = float_dtype_eps(self.storage_dtype(name))
        if eps is None:
            raise WeightSourceError(f"tensor {name!r} of {self.name!r} has storage dtype "
                                    f"{self.storage_dtype(name)!r} with no known precision; report this as a bug")
        return eps

    def get(self, name: str, dtype: Optional[torch.dtype] = None, device: DeviceLike = None) -> torch.Tensor:
        """Read tensor ``name`` (only this one), converted to ``dtype`` / moved to ``device`` when given.

        Low-precision storage is upcast exactly (bf16/fp16 -> float64 is lossless).  Without ``dtype`` the
        storage dtype is kept (float32 for dequantised GGUF tensors).  The result may share memory with the
        source (an in-memory module's parameter, a memory-mapped file): do not modify it in place.
        """
        if self._closed:
            raise WeightSourceError(f"weights {self.name!r} were closed; open them again with open_weights(...)")
        self._check_key(name)
        tensor = self._read(name)
        if dtype is None and device is None:
            return tensor
        return tensor.to(device=device, dtype=dtype)

    def _check_key(self, name: str) -> None:
        if name not in self:
            raise WeightSourceError(f"tensor {name!r} is not in {self.name!r}; list the available names with "
                                    f"open_weights(...).keys()")

    def __contains__(self, name: object) -> bool:
        return name in self._key_set()

    def _key_set(self) -> frozenset:
        cached = getattr(self, "_keys_cache", None)
        if cached is None:
            cached = frozenset(self.keys())
            self._keys_cache = cached
        return cached

    def __len__(self) -> int:
        return len(self.keys())

    def close(self) -> None:
        """Release file handles and memory maps.  Reading a tensor after ``close`` is an error; names, shapes
        and dtypes stay available."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        """Drop what :meth:`close` frees (nothing for in-memory sources)."""

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tensors={len(self)})"
