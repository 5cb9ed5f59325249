"""``--max-disk``: a sharded Hub checkpoint read shard by shard, holding at most ``max_bytes`` of its shards on disk.

Tensor names, shapes and storage dtypes come from the shards' safetensors headers, read with HTTP range requests
(:func:`hub.safetensors_header`, errors mapped to one line like every Hub call), so the adapter and the analysis see
the whole model before any shard is downloaded.  Reading a tensor fetches its shard into huggingface_hub's cache
(``hf_hub_download`` at the pinned commit); when the shards this source fetched would exceed ``max_bytes``, the
least recently read ones are evicted first.  Eviction goes through huggingface_hub's cache manager
(``scan_cache_dir`` and ``HFCacheInfo.delete_files``): this commit's snapshot link is removed, and its blob only when
no other cached file (another revision's snapshot, another repo sharing it) links to it.  A shard that was already
in this snapshot before is read in place and never deleted.  Values are read from the same bytes as a full local copy, so results are identical; an evicted
shard that is read again is fetched again (the analysis reads blocks in layer order, and shards hold consecutive
layers, so with room for two shards the per-layer pass fetches each shard once).  :meth:`close` evicts every
shard this source fetched.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from hf_flag.errors import WeightSourceError
from hf_flag.weights import hub
from hf_flag.weights.safetensors_source import SafetensorsSource
from hf_flag.weights.weight_source import SAFETENSORS_DTYPES, WeightSource


class StreamingHubSource(WeightSource):
    """A Hub model's sharded safetensors, fetched one shard at a time within ``max_bytes`` (module docstring)."""

    def __init__(self, snapshot: hub.HubSnapshot, *, config: dict, max_bytes: int, sizes: dict[str, int]) -> None:
        self.name = snapshot.repo_id
        self.config = dict(config)
        self.snapshot = snapshot
        self.max_bytes = int(max_bytes)
        self.shards = hub.shard_names(snapshot.folder / hub.SAFETENSORS_INDEX)
        self.sizes = {s: int(sizes.get(s) or 0) for s in self.shards}
        too_big = [s for s in self.shards if self.sizes[s] > self.max_bytes]
        if too_big:
            s = max(too_big, key=self.sizes.get)
            raise WeightSourceError(f"--max-disk {self.max_bytes / 1e9:.3g} GB is smaller than shard {s!r} of Hub "
                                    f"model {self.name!r} ({self.sizes[s] / 1e9:.3g} GB); raise --max-disk to at "
                                    f"least that shard's size")
        self._info: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # tensor -> (shard, safetensors dtype, shape)
        for shard in self.shards:
            meta = hub.safetensors_header(snapshot.repo_id, snapshot.sha, shard)
            for tensor, info in sorted(meta.tensors.items(), key=lambda kv: kv[1].data_offsets[0]):
                self._info[tensor] = (shard, info.dtype, tuple(info.shape))
        self._open: OrderedDict[str, SafetensorsSource] = OrderedDict()  # least recently read first
        self._fetched: set[str] = set()  # shards this source downloaded (the only ones it deletes)
        self.held_bytes = 0
        self.peak_bytes = 0
        self.fetches: list[str] = []  # every download, in order (a shard evicted and read again appears twice)

    def keys(self) -> list[str]:
        return list(self._info)

    def shard_of(self, name: str) -> int:
        """Position (in :attr:`shards`, sorted file names: layer order) of the shard holding tensor ``name``."""
        self._check_key(name)
        return self.shards.index(self._info[name][0])

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_key(name)
        return self._info[name][2]

    def storage_dtype(self, name: str) -> str:
        self._check_key(name)
        return SAFETENSORS_DTYPES.get(self._info[name][1], self._info[name][1])

    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def _read(self, name: str) -> torch.Tensor:
        return self._shard(self._info[name][0]).get(name)

    def _shard(self, shard: str) -> SafetensorsSource:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self._cached(shard)
        if path is None:
            while self.held_bytes + self.sizes[shard] > self.max_bytes:
                victim = next((s for s in self._open if s in self._fetched), None)
                if victim is None:
                    break
                self._evict(victim)
            path = Path(hub.download(self.snapshot.repo_id, self.snapshot.sha, shard))
            self._fetched.add(shard)
            self.fetches.append(shard)
            self.held_bytes += self.sizes[shard]
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        self._open[shard] = SafetensorsSource(path, name=self.name, config=self.config)
        return self._open[shard]

    def _cached(self, shard: str) -> Optional[Path]:
        path = self.snapshot.folder / shard
        return path if path.exists() else None

    def _evict(self, shard: str) -> None:
        self._open.pop(shard).close()
        hub.delete_cached_file(self.snapshot.folder / shard)
        self._fetched.discard(shard)
        self.held_bytes -= self.sizes[shard]

    def _release(self) -> None:
        for shard in list(self._open):
            if shard in self._fetched:
                self._evict(shard)
            else:
                self._open.pop(shard).close()
