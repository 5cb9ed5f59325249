"""Input checks of the analysis: NaN/Inf guards, option and layer checks, device choice, freed-memory release."""
from __future__ import annotations

import functools
from dataclasses import fields
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from hf_flag.errors import InputError, NonFiniteWeightsError
from hf_flag.geometry.angles import all_finite


def block_tensors(block) -> list[torch.Tensor]:
    """Every attention and MLP tensor of a block (every expert's and the router of a mixture of experts)."""
    parts = [p for p in (block.attention, block.mlp, *block.experts) if p is not None]
    tensors = [t for p in parts for f in fields(p) if isinstance(t := getattr(p, f.name), torch.Tensor)]
    return tensors + ([] if block.router is None else [block.router])


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf, from its minimum and maximum (NaN propagates through both): no
    tensor-sized temporaries, unlike ``torch.isfinite(t).all()`` (a full ``abs`` copy and three boolean masks)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    return all(bool(torch.isfinite(v)) for v in torch.aminmax(t))


def check_finite(block, source, names: Sequence[str], where: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the checkpoint tensor (of ``names``) that holds NaN/Inf."""
    if all(all_finite(t) for t in block_tensors(block)):
        return
    bad = next((n for n in names if not all_finite(source.get(n))), ", ".join(names))
    raise NonFiniteWeightsError(f"{where}: tensor {bad!r} holds NaN/Inf values; repair or re-export the checkpoint")


#: glibc's ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h)
M_MMAP_THRESHOLD = -3
#: allocations of at least this many bytes get their own mapping, unmapped when freed (:func:`bound_heap_growth`)
MMAP_THRESHOLD_BYTES = 4 << 20


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op where there is none).

    glibc serves allocations below its dynamic mmap threshold (which rises to the largest freed block, up to
    32 MiB) from the heap and keeps their pages after they are freed, so a long pass of tensor temporaries leaves
    ~100 MiB resident that no tensor uses; the analysis trims between passes and after each composition layer.
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def bound_heap_growth() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES` for this process (``mallopt``; a no-op without
    glibc), so that every tensor of 4 MiB or more is its own mapping, returned to the OS when it is freed.

    glibc otherwise raises the threshold to the largest block freed so far (up to 32 MiB): after the first
    16-32 MiB weight temporaries are freed, later ones come from the heap, whose freed pages stay resident and
    fragment; on a d = 1024 checkpoint that held ~1.5 blocks more at the per-layer pass's peak than its live
    tensors (``benchmarks/bench_lazy_rss.py``, BENCHMARKS.md "Memory").  Fixing it disables glibc's dynamic
    adjustment for the rest of the process: allocations of 4-32 MiB then cost a mapping and its page faults
    each (SmolLM2's default report: +0.4 s system time on 23 s; at 1 MiB it was +3 s; above 32 MiB glibc maps
    anyway)."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@functools.lru_cache(maxsize=None)
def _libc_function(name: str):
    import ctypes
    import ctypes.util

    lib = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(lib), name, None) if lib else None


def resolve_device(device: Union[str, torch.device, None], model) -> torch.device:
    """``device``, else the in-memory model's own device, else ``cuda`` when available, else ``cpu``; ValueError
    naming ``device`` when it is no torch device or CUDA (or that CUDA index) is not available here."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device={device!r}: CUDA is not available here; use device='cpu'")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use 'cuda:0'..'cuda:{torch.cuda.device_count() - 1}'")
        return dev
    if isinstance(model, nn.Module):
        param = next((p for p in model.parameters() if not p.is_meta), None)
        if param is not None:
            return param.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_choice(name: str, given: Optional[Iterable[str]], allowed: Sequence[str]) -> frozenset:
    """``given`` (default: all of ``allowed``) as a frozenset, or ValueError naming what is allowed."""
    chosen = frozenset(allowed if given is None else ([given] if isinstance(given, str) else given))
    if not chosen or not chosen <= set(allowed):
        raise InputError(f"{name}={sorted(chosen)} is not a non-empty subset of {list(allowed)} for this model")
    return chosen


def check_layers(layers: Optional[Iterable[int]], n: int) -> list[int]:
    """Sorted unique layer indices within ``0..n-1`` (default: all), or ValueError."""
    if layers is None:
        return list(range(n))
    try:
        chosen = sorted({int(i) for i in layers})
    except (TypeError, ValueError) as exc:
        raise InputError(f"layers={layers!r}: give integer layer indices, e.g. [0, 1]") from exc
    bad = [i for i in chosen if not 0 <= i < n]
    if bad or not chosen:
        raise InputError(f"layers={bad or chosen} is out of range: this model has {n} layers/pairs, use 0..{n - 1}")
    return chosen
