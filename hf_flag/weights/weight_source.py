"""The :class:`WeightSource` interface: named tensors read one at a time, plus the model's config.

Every source (safetensors, GGUF, in-memory module, opt-in pickle) answers the same questions: which tensors exist,
their shapes, the dtype they are *stored* in and its relative precision (which sets the flag tolerance,
MATH.md §4), and the tensor itself, converted on request.  Sources never instantiate a model.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import AbstractSet, Optional, Union

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
    """``torch.finfo(dtype).eps`` for a floating torch dtype name, ``None`` for any other name (integer or bool
    storage included: integers are no real-valued weight, see :func:`integer_weight_error`)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return None
    return float(torch.finfo(dtype).eps)


def is_integer_dtype(name: str) -> bool:
    """Whether ``name`` is a torch integer or bool dtype name (``"int8"``, ``"uint8"``, ``"int32"``, ...)."""
    dtype = getattr(torch, name, None)
    return isinstance(dtype, torch.dtype) and not dtype.is_floating_point and not dtype.is_complex


def integer_weight_error(source_name: str, name: str, dtype: str) -> WeightSourceError:
    """The one-line error for a tensor stored as integers: an integer-quantised weight (bitsandbytes int8 with its
    ``SCB`` scales, GPTQ/AWQ packed ``qweight``) whose real values need scales the analysis does not apply."""
    return WeightSourceError(f"tensor {name!r} of {source_name!r} is stored as {dtype}: an integer-quantised weight "
                             f"(e.g. bitsandbytes int8, GPTQ/AWQ packed int4) is not supported; dequantise it "
                             f"first (load it with its quantisation library and save a float16/bfloat16/float32 "
                             f"copy) and analyse that")


#: sibling tensors that scale a weight ``<module>.weight`` (``<module>.<suffix>``): FP8 block/row scales (DeepSeek's
#: ``weight_scale_inv``, compressed-tensors' and ModelOpt's ``weight_scale``, NVFP4's ``weight_scale_2`` and
#: ``weight_global_scale``, MLX/GPTQ-style ``scales``): the stored values are not the weight without them
WEIGHT_SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv", "weight_scale_2", "weight_global_scale", "scales")
#: activation scales beside a float8 weight (ModelOpt / compressed-tensors FP8 W8A8): a scaled-FP8 checkpoint
FLOAT8_SCALE_SUFFIXES = WEIGHT_SCALE_SUFFIXES + ("input_scale",)


def scale_sibling(name: str, dtype: str, keys: AbstractSet[str]) -> Optional[str]:
    """The first scale tensor stored beside weight ``name`` (``<module>.weight`` -> ``<module>.weight_scale``, ...)
    in ``keys``: :data:`WEIGHT_SCALE_SUFFIXES` for any storage, also ``input_scale`` for float8 storage; ``None``
    when there is none (plain float8 without scales is read as stored, at its eps)."""
    module, dot, leaf = name.rpartition(".")
    if leaf != "weight":
        return None
    suffixes = FLOAT8_SCALE_SUFFIXES if dtype.startswith("float8") else WEIGHT_SCALE_SUFFIXES
    return next((f"{module}{dot}{suffix}" for suffix in suffixes if f"{module}{dot}{suffix}" in keys), None)


def scaled_weight_error(source_name: str, name: str, dtype: str, scale: str) -> WeightSourceError:
    """The one-line error for a weight stored with a scale tensor beside it (FP8 with ``weight_scale_inv``,
    compressed-tensors / ModelOpt ``weight_scale``): its real values are the stored ones times scales the analysis
    does not apply."""
    return WeightSourceError(f"tensor {name!r} of {source_name!r} is stored as {dtype} with the scale tensor "
                             f"{scale!r} beside it: a scale-quantised weight (e.g. FP8 with weight_scale_inv, "
                             f"compressed-tensors or ModelOpt FP8) is not supported; dequantise it first (load it "
                             f"with its quantisation library and save a float16/bfloat16/float32 copy) and analyse "
                             f"that")


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
        """Relative precision of the stored values of ``name``: ``torch.finfo(dtype).eps`` for float storage (never
        0: float64 has 2.2e-16).  Integer storage raises :func:`integer_weight_error`, a weight with a scale tensor
        beside it :func:`scaled_weight_error`.  Quantised sources override
        this (MATH.md §4: tolerance ~ eps)."""
        dtype = self.storage_dtype(name)
        if is_integer_dtype(dtype):
            raise integer_weight_error(self.name, name, dtype)
        self._check_unscaled(name, dtype)
        eps = float_dtype_eps(dtype)
        if eps is None:
            raise WeightSourceError(f"tensor {name!r} of {self.name!r} has storage dtype "
                                    f"{self.storage_dtype(name)!r} with no known precision; report this as a bug")
        return eps

    def get(self, name: str, dtype: Optional[torch.dtype] = None, device: DeviceLike = None) -> torch.Tensor:
        """Read tensor ``name`` (only this one), converted to ``dtype`` / moved to ``device`` when given.

        Low-precision storage is upcast exactly (bf16/fp16 -> float64 is lossless).  Without ``dtype`` the
        storage dtype is kept (float32 for dequantised GGUF tensors).  The result may share memory with the
        source (an in-memory module's parameter, a memory-mapped file): do not modify it in place.  A tensor stored
        as integers is read as integers (``dtype`` None or an integer dtype); read as real values (a floating
        ``dtype``, as every analysis reads weights) it raises :func:`integer_weight_error`: its real values need
        scales stored elsewhere.  A weight with a scale tensor beside it (:func:`scale_sibling`, e.g. FP8 with
        ``weight_scale_inv``) read as real values raises :func:`scaled_weight_error` for the same reason.
        """
        if self._closed:
            raise WeightSourceError(f"weights {self.name!r} were closed; open them again with open_weights(...)")
        self._check_key(name)
        tensor = self._read(name)
        if dtype is not None and (dtype.is_floating_point or dtype.is_complex) and not (
                tensor.is_floating_point() or tensor.is_complex()):
            raise integer_weight_error(self.name, name, dtype_name(tensor.dtype))
        if dtype is not None and dtype.is_floating_point:
            self._check_unscaled(name, dtype_name(tensor.dtype))
        if dtype is None and device is None:
            return tensor
        return tensor.to(device=device, dtype=dtype)

    def _check_unscaled(self, name: str, dtype: str) -> None:
        """:func:`scaled_weight_error` when weight ``name`` has a scale tensor beside it (:func:`scale_sibling`)."""
        scale = scale_sibling(name, dtype, self._key_set())
        if scale is not None:
            raise scaled_weight_error(self.name, name, dtype, scale)

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
