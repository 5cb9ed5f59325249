"""PyTorch pickle checkpoints (``.bin`` / ``.pt`` / ``.pth``), opt-in only.

Reached only through ``open_weights(..., allow_pickle=True)``.  Files are loaded with
``torch.load(weights_only=True, mmap=True)``: the restricted unpickler (no arbitrary code) and memory-mapped
storages, so a shard's tensors are paged in only when read.  Shards of a ``pytorch_model.bin.index.json`` are
loaded on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch

from hf_flag.errors import WeightSourceError
from hf_flag.weights.weight_source import WeightSource, dtype_name, read_shard_index


def _state_dict_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint: the object itself, or its ``state_dict`` / ``model`` entry."""
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return {str(k): v for k, v in inner.items()}
    raise WeightSourceError(f"pickle checkpoint {str(path)!r} does not hold a dict of tensors (a state_dict); "
                            f"save model.state_dict() or convert the checkpoint to safetensors")


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # UnpicklingError (disallowed global), RuntimeError (legacy/truncated zip), OSError
        raise WeightSourceError(f"pickle checkpoint {str(path)!r} cannot be loaded safely "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                f"convert it to safetensors") from None
    return _state_dict_of(obj, path)


class TorchPickleSource(WeightSource):
    """State dicts saved with ``torch.save``: one file, several files (merged), or a ``*.bin.index.json``."""

    def __init__(self, target: Union[Path, str, Sequence[Union[Path, str]]], *, name: str | None = None,
                 config: dict | None = None) -> None:
        paths = [Path(target)] if isinstance(target, (str, Path)) else [Path(p) for p in target]
        if not paths or not all(p.is_file() for p in paths):
            raise WeightSourceError(f"pickle checkpoint {[str(p) for p in paths]!r} does not exist; check the path")
        self.name = name or paths[0].name
        self.config = dict(config or {})
        self._shards: dict[Path, dict[str, torch.Tensor]] = {}
        if paths[0].name.endswith(".json"):
            self._where = read_shard_index(paths[0])
        else:
            self._where = {}
            for p in paths:
                for key in self._shard(p):
                    if key in self._where:
                        raise WeightSourceError(f"tensor {key!r} appears in both {self._where[key].name!r} and "
                                                f"{p.name!r}; pass one file or a shard index")
                    self._where[key] = p

    def _shard(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._shards:
            self._shards[path] = _load(path)
        return self._shards[path]

    def _tensor(self, name: str) -> torch.Tensor:
        self._check_key(name)
        tensors = self._shard(self._where[name])
        if name not in tensors:
            raise WeightSourceError(f"shard {self._where[name].name!r} does not contain tensor {name!r} although "
                                    f"its index says so; re-download the checkpoint")
        return tensors[name]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def storage_dtype(self, name: str) -> str:
        return dtype_name(self._tensor(name).dtype)

    def _read(self, name: str) -> torch.Tensor:
        return self._tensor(name)

    def nbytes(self) -> int:
        return sum(self._tensor(k).numel() * self._tensor(k).element_size() for k in self._where)

    def _release(self) -> None:
        self._shards.clear()
