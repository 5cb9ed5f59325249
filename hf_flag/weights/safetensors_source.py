"""safetensors checkpoints (single file, several files, or a sharded ``*.safetensors.index.json``), read lazily.

At open time only the JSON headers are read and checked against the file sizes, so a truncated download or a
corrupted header fails immediately with one line; tensors are read later, one at a time, with an explicit
``os.preadv`` of exactly their bytes (offsets from the validated header) into a fresh ``torch.empty`` buffer.
Nothing is memory-mapped, so the file's pages never count in the process's resident set (a mapped file would
leave every page read resident until it is closed) and the other tensors' bytes are never touched.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch

from hf_flag.errors import WeightSourceError
from hf_flag.weights.weight_source import SAFETENSORS_DTYPES, WeightSource, read_shard_index

#: bytes per element of the safetensors dtype codes whose size is checked against the data offsets
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header size


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # data offsets relative to the data section, which starts at byte ``base`` of the file
    end: int
    base: int


def _corrupt(path: Path, what: str) -> WeightSourceError:
    return WeightSourceError(f"safetensors file {str(path)!r} is corrupted or truncated ({what}); re-download or "
                             f"re-save it")


def read_safetensors_header(path: Path) -> dict[str, _Entry]:
    """Parse and validate the header of one safetensors file without reading tensor data.

    Checks: the 8-byte length prefix, valid JSON, each entry's dtype/shape/offsets consistent, and the file long
    enough for the largest declared data offset (a truncated file fails here, not at the first read).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"file has {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(_MAX_HEADER, size - 8):
            raise _corrupt(path, f"header length {n} exceeds the file size {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_size = size - 8 - n
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise _corrupt(path, f"header entry {name!r} lacks dtype/shape/data_offsets") from None
        if not 0 <= begin <= end:
            raise _corrupt(path, f"tensor {name!r} has data offsets [{begin}, {end}]")
        if dtype in _ITEMSIZE and end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise _corrupt(path, f"tensor {name!r} declares shape {list(shape)} {dtype} but {end - begin} bytes")
        if end > data_size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {end} but the data section has {data_size} bytes")
        entries[name] = _Entry(path, dtype, shape, begin, end, 8 + n)
    return entries


class SafetensorsSource(WeightSource):
    """Lazy reader over one or more safetensors files.

    ``files``: a ``.safetensors`` file, a ``*.safetensors.index.json`` shard index, or a list of safetensors
    files whose tensors are merged (a name in two files is an error).
    """

    def __init__(self, files: Union[Path, str, Sequence[Union[Path, str]]], *, name: str | None = None,
                 config: dict | None = None) -> None:
        paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
        if not paths:
            raise WeightSourceError("no safetensors files given; pass a .safetensors file or a shard index")
        for p in paths:
            if not p.is_file():
                raise WeightSourceError(f"safetensors file {str(p)!r} does not exist; check the path")
        self.name = name or paths[0].name
        self.config = dict(config or {})
        self._entries = self._index_entries(paths[0]) if paths[0].name.endswith(".json") else self._merge(paths)
        self._handles: dict[Path, int] = {}  # open file descriptors

    @staticmethod
    def _merge(paths: list[Path]) -> dict[str, _Entry]:
        merged: dict[str, _Entry] = {}
        for p in paths:
            for key, entry in sorted(read_safetensors_header(p).items(), key=lambda kv: kv[1].begin):
                if key in merged:
                    raise WeightSourceError(f"tensor {key!r} appears in both {merged[key].file.name!r} and "
                                            f"{p.name!r}; pass one file or a shard index")
                merged[key] = entry
        return merged

    @staticmethod
    def _index_entries(index: Path) -> dict[str, _Entry]:
        pairs = list(read_shard_index(index).items())
        headers = {shard: read_safetensors_header(shard) for shard in sorted({s for _, s in pairs})}
        for key, shard in pairs:
            if key not in headers[shard]:
                raise WeightSourceError(f"shard index {str(index)!r} puts tensor {key!r} in {shard.name!r}, which "
                                        f"does not contain it; re-download the checkpoint")
        order = {shard: i for i, shard in enumerate(headers)}
        pairs.sort(key=lambda kv: (order[kv[1]], headers[kv[1]][kv[0]].begin))
        return {key: headers[shard][key] for key, shard in pairs}

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_key(name)
        return self._entries[name].shape

    def storage_dtype(self, name: str) -> str:
        self._check_key(name)
        code = self._entries[name].dtype
        return SAFETENSORS_DTYPES.get(code, code.lower())

    def nbytes(self) -> int:
        return sum(e.end - e.begin for e in self._entries.values())

    def files(self) -> list[Path]:
        """The safetensors files this source reads, in order."""
        return sorted({e.file for e in self._entries.values()})

    def _fd(self, file: Path) -> int:
        if file not in self._handles:
            self._handles[file] = os.open(file, os.O_RDONLY)
        return self._handles[file]

    def _read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype = getattr(torch, SAFETENSORS_DTYPES.get(entry.dtype, ""), None)
        if not isinstance(dtype, torch.dtype):
            raise WeightSourceError(f"tensor {name!r} of {self.name!r} has safetensors dtype {entry.dtype!r}, which "
                                    f"hf-flag cannot read; convert it to a float dtype")
        buffer = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
        try:
            pread_into(self._fd(entry.file), buffer, entry.base + entry.begin)
        except OSError as exc:
            raise _corrupt(entry.file, f"reading {name!r} failed: {exc}") from None
        return buffer.view(dtype).reshape(entry.shape)

    def _release(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()


def pread_into(fd: int, buffer: torch.Tensor, offset: int) -> None:
    """Fill the contiguous CPU uint8 tensor ``buffer`` with the file bytes at ``offset`` (``os.preadv``, repeated
    for partial reads); ``OSError`` when the file ends first."""
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"file ends {len(view) - done} bytes before the tensor does")
        done += got
