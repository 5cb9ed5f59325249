"""Rows of a transformer read through its adapter, streaming blocks (MATH.md §2-§4, §6; the row kinds and the
memory policy are documented in :mod:`hf_flag.analysis.api`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import math
import sys

import torch
from tqdm.auto import tqdm

from hf_flag.analysis.checks import (bound_heap_growth, check_choice, check_finite, check_layers,
                                    release_freed_memory)
from hf_flag.analysis.heads import composition_estimate, composition_rows, head_spaces, kv_index, overlap_rows
from hf_flag.analysis.pairs import PairGrams, pair_rows, single, small_gram_side, window_svd
from hf_flag.defaults import TRANSFORMER_DIAGNOSTICS
from hf_flag.geometry.angles import thin_svd
from hf_flag.geometry.heads import head_bases
from hf_flag.geometry.pairs import augment
from hf_flag.geometry.spectral import DENSE_GRAM_MAX, K_MAX, compute_dtype, gram_dtype
from hf_flag.report import Report, Row
from hf_flag.rows import (COMPOSITION_KINDS, CROSS_LAYER_KINDS, HEAD_OVERLAP_KINDS, KIND_MLP, KIND_MLP_GATE,
                          KIND_RESIDUAL, KIND_VO)
from hf_flag.weights.adapters import get_adapter
from hf_flag.weights.module_source import ModuleSource

#: memory budget (bytes) of the composition pass: packed Grams of a chunk of source layers plus one destination
#: layer's (``analysis.heads.gram_composition_rows``), or cached attention for the tiled fallback.  256 MiB holds
#: 17 source layers of SmolLM2-135M (d = 576, 9 heads: 12 MiB each) or 5 of a d = 768, 12-head model.  Larger
#: budgets re-read fewer layers; peak memory is about this plus two float64 blocks.
COMPOSITION_CACHE_BYTES = 256 * 2**20

HEAD_LABELS = {"q": "head", "k": "kv_head", "v": "kv_head", "o": "head"}


def layer_bases(cache: dict, layer: int, attn) -> dict:
    """Head bases (``geometry.heads.head_bases``, in the analysis dtype) of ``layer``'s q/k/v/o spaces, from
    ``cache`` (key ``(layer, "heads")``) or computed once and stored there: layer l+1's bases serve its cross-layer
    rows and then its own."""
    key = (layer, "heads")
    if key not in cache:
        cache[key] = {s: head_bases(X, dtype=torch.promote_types(X.dtype, torch.float32))
                      for s, X in head_spaces(attn).items()}
    return cache[key]


def weight_svd(cache: dict, layer: int, name: str, W: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               storage_eps: Optional[float] = None):
    """SVD of the MLP weight ``[W | bias]`` of ``layer`` (batch dim 1), from ``cache`` (key
    ``(layer, name, bias is not None)``) or computed once and stored there: ``mlp_out`` serves the mlp, mlp_gate
    and residual pairs, ``mlp_in`` of layer l+1 its own mlp pair and layer l's residual pair (MATH.md §4).
    Thin and in float64 (``full=True``), or the window's partial SVD in the weights' dtype given ``storage_eps``
    (:func:`~hf_flag.analysis.pairs.window_svd`) on the weight's small Gram, cached under the key its pairs'
    :func:`pair_grams` read (so kappa's Gram factors and the window share one Gram)."""
    key = (layer, name, bias is not None)
    if key not in cache:
        W_aug = augment(W[None], single(bias))
        if storage_eps is None:
            cache[key] = thin_svd(W_aug)
        else:
            grams = PairGrams(cache, {"l": key}, {"l": lambda: W_aug})
            side, dtype = small_gram_side(W_aug), gram_dtype(storage_eps, W.dtype)
            dense = dtype == W.dtype and K_MAX + 1 < min(W_aug.shape[-2:]) <= DENSE_GRAM_MAX  # partial_svd's eigh route
            eigh = grams.eigh("l", side, dtype) if dense else None
            cache[key] = window_svd(W_aug, storage_eps, gram=grams.gram("l", side, dtype), gram_eigh=eigh)
    return cache[key]


def pair_grams(cache: dict, left: tuple, right: tuple) -> PairGrams:
    """The shared Grams and rank cuts (:class:`~hf_flag.analysis.pairs.PairGrams`) of a pair whose ``"l"`` weight is
    ``left = (layer, name, W, bias)`` and ``"next"`` weight ``right``, stored in ``cache`` under keys
    ``(layer, name, bias is not None, "gram", side, dtype)`` and ``(..., "cut", side, dtype, rtol)``.  A Llama
    block's ``W_down W_down^T`` and its Cholesky factor serve its mlp, mlp_gate and residual pairs and its window
    (:func:`weight_svd`), ``W_up^T W_up`` its mlp pair, the previous block's residual pair and its window
    (MATH.md §3)."""
    def weight(side: tuple) -> Callable[[], torch.Tensor]:
        _, _, W, bias = side
        return lambda: augment(W[None], single(bias))

    keys = {which: (layer, name, bias is not None) for which, (layer, name, _, bias) in (("l", left),
                                                                                          ("next", right))}
    return PairGrams(cache, keys, {"l": weight(left), "next": weight(right)})


def block_mlps(block) -> list[tuple[str, object]]:
    """(label prefix, MLPWeights) of every MLP of a block: the dense MLP (``""``); in a mixture-of-experts block
    each routed expert (``"expert e "``) and the shared expert, if any (``"shared_expert "``)."""
    dense = [] if block.mlp is None else [("shared_expert " if block.experts else "", block.mlp)]
    return dense + [(f"expert {e} ", m) for e, m in enumerate(block.experts)]


@dataclass
class Carried:
    """What layer l's rows with layer l+1 (residual pair, cross-layer overlaps) need once block l is released:
    its down projection (raw, with its bias) and storage precision; its ``o`` head bases, window SVD and Gram
    stay in the cache (keys ``(l, ...)``) until block l+1's rows are done."""

    index: int
    storage_eps: float
    mlp_out: Optional[torch.Tensor]  # None when the block has no (dense or shared) MLP
    b_out: Optional[torch.Tensor]
    heads: bool  # the block has attention: its o bases are cached


def layer_rows(model: str, layout, block, *, prev: Optional[Carried], next_eps: Optional[float],
               diagnostics: frozenset, cheap: bool, cache: dict, window: bool = False, own: bool = True
               ) -> tuple[list[Row], Carried]:
    """The rows of ``block`` (layer l; only with ``own``) and, given ``prev`` (layer l-1, carried), the rows from
    layer l-1 to l; composition excepted.  Returns them and what layer l's rows with layer l+1 need
    (:class:`Carried`).

    ``block``'s tensors are released as soon as their last row is computed (attention after its head rows, the
    up projection after the mlp pair, the gate after its pair), so that at most one raw block
    and one carried down projection are resident whatever the depth (issue #11, ``bench_lazy_rss.py``); the
    residual pair from l-1 comes first (before block l's head and vo rows), so the carried down projection and
    its cached Gram and window are released before block l's own rows; the mlp pair comes before the gate pair
    (each weight's cache entries go after its last pair); the carried down projection's rank cut keeps its flags,
    not its Cholesky factor (read only where the cut is not full, where there is none).
    ``next_eps``: block l+1's storage precision when it has rows with layer l (``None`` otherwise): a weight's
    window SVD is cached at the finest precision of the blocks whose pairs read it (MATH.md §4).
    ``cache``: head bases (:func:`layer_bases`), weight SVDs (:func:`weight_svd`) and Grams (:func:`pair_grams`)
    keyed ``(layer, ...)``; entries of layers before l are dropped once the rows from l-1 are done, and of
    layer l's head bases only ``o`` is kept.  ``window``: the default report's pair values on storage-precision
    windows (partial SVDs)."""
    l, mlp, attn = block.index, block.mlp, block.attention
    # a cached weight's windows are read at its block's storage_eps (mlp pairs) and at the coarser of two blocks'
    # (residual pair): its window SVD takes the finest, so its triplets cover every window read
    eps = block.storage_eps if next_eps is None else min(block.storage_eps, next_eps)
    svd = (lambda *args, at=eps: weight_svd(cache, *args, storage_eps=at if window else None)) if not cheap else \
        (lambda *args, at=eps: None)
    pair = dict(cheap=cheap, storage_eps=block.storage_eps, window=window)
    rows: list[Row] = []
    units, mlp_rows = block_mlps(block), own and "mlp" in diagnostics
    for _, m in units if not mlp_rows else ():  # no gate pair: the gates go before the residual pair
        m.mlp_gate = m.b_gate = None
    if "residual" in diagnostics and prev is not None and prev.mlp_out is not None and mlp is not None:
        p, finest = prev.index, min(prev.storage_eps, block.storage_eps)
        rows += pair_rows(model, KIND_RESIDUAL, [(p, l, "mlp.out", "mlp.in")], prev.mlp_out[None],
                          single(prev.b_out), mlp.mlp_in[None], activation="identity",
                          svd_l=svd(p, "mlp.out", prev.mlp_out, prev.b_out, at=finest),
                          svd_next=svd(l, "mlp.in", mlp.mlp_in, at=finest), cheap=cheap,
                          storage_eps=max(prev.storage_eps, block.storage_eps), window=window,
                          gram=pair_grams(cache, (p, "mlp.out", prev.mlp_out, prev.b_out),
                                          (l, "mlp.in", mlp.mlp_in, None)))
    if prev is not None:
        prev.mlp_out = prev.b_out = None
    for old in [k for k in cache if k[0] < l and k[1] != "heads"]:  # layer l-1's o bases: for the head rows
        del cache[old]
    heads = "heads" in diagnostics and not cheap
    if heads and attn is not None:
        here = layer_bases(cache, l, attn)
        for s in "qkvo" if own else "":
            rows += overlap_rows(model, HEAD_OVERLAP_KINDS[s], l, l, here[s], here[s], (HEAD_LABELS[s],) * 2,
                                 upper=True)
        if prev is not None and prev.heads:
            o = cache[(prev.index, "heads")]["o"]
            for s in "qkv":
                rows += overlap_rows(model, CROSS_LAYER_KINDS[s], prev.index, l, o, here[s],
                                     ("head", HEAD_LABELS[s]), upper=False)
            del o
        cache[(l, "heads")] = {"o": here["o"]}  # q/k/v bases are not read again
        del here
    if own and "vo" in diagnostics and attn is not None:
        kv = kv_index(layout, attn.W_V.device)
        W_v = attn.W_V.index_select(0, kv).transpose(-1, -2)  # (H, head_dim, d): nn.Linear layout
        b_v = None if attn.b_V is None else attn.b_V.index_select(0, kv)
        ids = [(l, l, f"head {h}", f"head {h}") for h in range(layout.n_heads)]
        rows += pair_rows(model, KIND_VO, ids, W_v, b_v, attn.W_O.transpose(-1, -2), activation="identity", **pair)
        del W_v, b_v
    block.attention = attn = None
    for old in [k for k in cache if k[0] < l]:
        del cache[old]
    for unit, m in units if mlp_rows else ():  # the mlp pair first: its up projection goes before the gate pair
        rows += pair_rows(model, KIND_MLP, [(l, l, f"{unit}mlp.in", f"{unit}mlp.out")], m.mlp_in[None],
                          single(m.b_in), m.mlp_out[None], activation=m.activation,
                          svd_l=svd(l, f"{unit}mlp.in", m.mlp_in, m.b_in), svd_next=svd(l, f"{unit}mlp.out", m.mlp_out),
                          gram=pair_grams(cache, (l, f"{unit}mlp.in", m.mlp_in, m.b_in),
                                          (l, f"{unit}mlp.out", m.mlp_out, None)), **pair)
        for done in [k for k in cache if k[:2] == (l, f"{unit}mlp.in")]:
            del cache[done]
        m.mlp_in = m.b_in = None  # read by no later row (the residual pair from l-1 came first)
        if m.mlp_gate is not None:
            down = (l, f"{unit}mlp.out", m.mlp_out, None)
            rows += pair_rows(model, KIND_MLP_GATE, [(l, l, f"{unit}mlp.gate", f"{unit}mlp.out")], m.mlp_gate[None],
                              single(m.b_gate), m.mlp_out[None], activation=m.activation,
                              svd_l=svd(l, f"{unit}mlp.gate", m.mlp_gate, m.b_gate),
                              svd_next=svd(l, f"{unit}mlp.out", m.mlp_out),
                              gram=pair_grams(cache, (l, f"{unit}mlp.gate", m.mlp_gate, m.b_gate), down), **pair)
            for done in [k for k in cache if k[:2] == (l, f"{unit}mlp.gate")]:
                del cache[done]
        m.mlp_gate = m.b_gate = None
    for done in [k for k in cache if k[1] not in ("mlp.out", "heads")]:  # the rows with l+1 read only these
        del cache[done]
    for key in [k for k in cache if k[3:4] == ("cut",)]:  # the residual pair reads a factor only where none is
        cut, G = cache[key]  # (a cut not full at every member; pair_window_values), so it is not carried
        cache[key] = cut._replace(factor=None), G
    carried = Carried(l, block.storage_eps, None if mlp is None else mlp.mlp_out, None if mlp is None else mlp.b_out,
                      heads and (l, "heads") in cache)
    block.mlp, block.experts, block.router = None, (), None
    return rows, carried


def per_layer_rows(model: str, layout, layers: Sequence[int], load: Callable, storage_eps: Callable, *,
                   diagnostics: frozenset, cheap: bool, progress: bool, window: bool = False) -> list[Row]:
    """:func:`layer_rows` of every layer in ``layers``, streaming blocks: ``load(i)`` reads block i,
    ``storage_eps(i)`` its storage precision without reading it.  Each block is read once and released before
    the next is read; layer l's rows with layer l+1 are computed with block l+1 (read for them alone when l+1 is
    not in ``layers``) from what :class:`Carried` keeps of block l."""
    rows: list[Row] = []
    need_next = "residual" in diagnostics or ("heads" in diagnostics and not cheap)
    cache: dict = {}
    chosen = set(layers)
    with progress_bar(len(layers), progress, model) as bar:
        prev: Optional[Carried] = None
        for i in layers:
            has_next = need_next and i + 1 < layout.n_layers
            own, prev = layer_rows(model, layout, load(i), prev=prev if prev is not None and prev.index == i - 1
                                   else None, next_eps=storage_eps(i + 1) if has_next else None,
                                   diagnostics=diagnostics, cheap=cheap, cache=cache, window=window)
            rows += own
            if has_next and i + 1 not in chosen:  # block i+1 read for layer i's rows with it only
                rows += layer_rows(model, layout, load(i + 1), prev=prev, next_eps=None, diagnostics=diagnostics,
                                   cheap=cheap, cache=cache, window=window, own=False)[0]
            if not has_next:
                prev = None
            bar.update()
    return rows


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar on stderr (disabled unless ``enabled``)."""
    return tqdm(total=total, disable=not enabled, desc=desc, unit="layer", leave=False)


def model_compute_dtype(source, adapter, layout, layers: Sequence[int], requested: Optional[torch.dtype],
                        full: bool) -> torch.dtype:
    """The compute precision: ``requested``; else float64 for ``full`` (today's analysis); else the precision
    policy (:func:`~hf_flag.geometry.spectral.compute_dtype`) of the finest storage among the analysed blocks'
    tensors (float32 for float32, bf16, fp16 and quantised weights)."""
    if requested is not None or full:
        return requested or torch.float64
    names = {n for i in layers for n in adapter.block_tensor_names(layout, i)}
    return compute_dtype(min((source.storage_eps(n) for n in names), default=0.0))


def composition_budget(source, adapter, layout, layers: Sequence[int], dtype: torch.dtype, full: bool) -> int:
    """Memory budget of the composition pass: :data:`COMPOSITION_CACHE_BYTES` for ``full``; otherwise at most one
    block (the largest analysed block's tensors in the compute ``dtype``), so that the default report's peak stays
    within a few blocks whatever the depth (issue #11; ``benchmarks/bench_lazy_rss.py``)."""
    if full:
        return COMPOSITION_CACHE_BYTES
    block = max((sum(math.prod(source.shape(n)) for n in adapter.block_tensor_names(layout, i)) for i in layers),
                default=0)
    return min(COMPOSITION_CACHE_BYTES, block * dtype.itemsize)


def analyze_transformer(source, name: str, *, device: torch.device, dtype: Optional[torch.dtype],
                        diagnostics: Optional[Iterable[str]], layers: Optional[Iterable[int]], cheap: bool,
                        composition: str, progress: bool, full: bool = True) -> tuple[Report, dict]:
    """Rows of a transformer read through its adapter, streaming blocks (see the module docstring).
    ``dtype`` ``None``: :func:`model_compute_dtype`; ``composition="auto"``: all layer pairs where
    :func:`~hf_flag.analysis.heads.composition_estimate` finds the cost small, adjacent ones otherwise (the
    estimate is printed to stderr with ``progress``).  Weights read from files (not an in-memory module, e.g. the
    Trainer callback's) fix the process's mmap threshold first (:func:`~hf_flag.analysis.checks.bound_heap_growth`)."""
    if not isinstance(source, ModuleSource):
        bound_heap_growth()
    keys = source.keys()
    adapter = get_adapter(source.config, keys)
    layout = adapter.layout(source.config, keys)
    diag = check_choice("diagnostics", diagnostics, TRANSFORMER_DIAGNOSTICS)
    sel = check_layers(layers, layout.n_layers)
    storage: dict[str, float] = {}
    checked: set[tuple[int, bool]] = set()  # (layer, mlp read too) already checked for NaN/Inf
    dtype = model_compute_dtype(source, adapter, layout, sel, dtype, full)

    def load(i: int, mlp: bool = True):
        block = adapter.block(source, layout, i, dtype=dtype, device=device, mlp=mlp)
        if (i, True) not in checked and (i, mlp) not in checked:  # first read: check it once
            names = adapter.block_tensor_names(layout, i, mlp=mlp)
            check_finite(block, source, names, f"layer {i}")
            storage.update({source.storage_dtype(n): source.storage_eps(n) for n in names})
            checked.add((i, mlp))
        return block

    rows: list[Row] = []
    if diag - {"composition"}:  # the per-layer pass (composition alone reads only attention, below)
        rows += per_layer_rows(name, layout, sel, load, lambda i: adapter.block_storage_eps(source, layout, i),
                               diagnostics=diag, cheap=cheap, progress=progress,
                               window=not full)
        release_freed_memory()
    estimate, budget = None, composition_budget(source, adapter, layout, sel, dtype, full)
    if "composition" in diag and composition != "none" and not cheap:
        estimate = composition_estimate(layout.n_layers, layout.n_heads, layout.d_model, sel)
        chosen = estimate["auto"] if composition == "auto" else composition
        if progress:
            print(f"hf-flag: {name}: composition {chosen}" + (" (auto)" if composition == "auto" else "") +
                  "; estimate: " + ", ".join(f"{m} {e['layer_pairs']} layer pairs, {e['rows']} rows, "
                                             f"{e['macs']:.1e} multiply-adds" for m, e in estimate.items()
                                             if m != "auto"), file=sys.stderr, flush=True)
        estimate["used"] = composition = chosen
        rows += composition_rows(name, COMPOSITION_KINDS, layout, sel, composition,
                                 lambda i: load(i, mlp=False).attention,
                                 budget_bytes=budget, itemsize=dtype.itemsize)
    report = Report(model=name, architecture=layout.architecture, layout=layout.to_dict(), rows=rows)
    return report, {"diagnostics": sorted(diag), "layers": sel, "storage": storage, "dtype": dtype,
                    "composition_estimate": estimate, "composition_cache_bytes": budget}
