"""Head rows: head-subspace overlaps and streamed composition scores (MATH.md §1, §6).

The row kinds and values are documented in :mod:`hf_flag.analysis.api`; row kinds are passed in.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from hf_flag.analysis.checks import release_freed_memory
from hf_flag.geometry.baselines import composition_baseline, overlap_baseline, overlap_zscore
from hf_flag.geometry.composition import (CompositionGrams, composition_scores, destination_grams, packed_gram_bytes,
                                          scores_from_grams, source_grams)
from hf_flag.geometry.heads import overlap_from_bases
from hf_flag.report import Row


def overlap_rows(model: str, kind: str, layer: int, target_layer: int, X, Y, labels: tuple[str, str], *,
                 upper: bool) -> list[Row]:
    """Rows of the head-subspace overlaps of two ``geometry.heads.HeadBases`` (column spaces ``(H, d, r)`` vs
    ``(H', d, r')``; only h < h' when ``upper``), each beside its Haar baseline max(r, r')/d and z-score
    (MATH.md §1, §6)."""
    d, p, q = X.Q.shape[1], X.Q.shape[2], Y.Q.shape[2]
    overlaps = overlap_from_bases(X, Y)
    zscores = overlap_zscore(overlaps, p, q, d)
    base = float(overlap_baseline(p, q, d))
    # both (H, H') matrices read back in one transfer (float64 holds the overlaps' float32 exactly)
    overlaps, zscores = torch.stack([overlaps.to(torch.float64), zscores]).tolist()
    return [
        Row(model, kind, layer, target_layer, f"{labels[0]} {h}", f"{labels[1]} {g}",
            {"overlap": ov, "overlap_baseline": base, "overlap_zscore": zscores[h][g]})
        for h, row in enumerate(overlaps) for g, ov in enumerate(row) if not upper or h < g
    ]


def head_spaces(attn) -> dict[str, torch.Tensor]:
    """Per-head column spaces of a layer: reads ``q``/``k``/``v`` (``(H, d, dh)``) and writes ``o``
    (row(W_O^h) as ``W_O^T``) (MATH.md §6)."""
    return {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V, "o": attn.W_O.transpose(-1, -2)}


def kv_index(layout, device: torch.device) -> torch.Tensor:
    """KV head of each query head, ``[kv_head_of(h) for h in range(n_heads)]`` (grouped-query attention, §6)."""
    return torch.tensor([layout.kv_head_of(h) for h in range(layout.n_heads)], device=device)


def expand_kv(attn, layout) -> dict[str, torch.Tensor]:
    """Per-query-head W_Q, W_K, W_V, W_O (KV heads repeated as transformers' ``repeat_kv`` does)."""
    kv = kv_index(layout, attn.W_K.device)
    return {"Q": attn.W_Q, "K": attn.W_K.index_select(0, kv), "V": attn.W_V.index_select(0, kv), "O": attn.W_O}


def composition_targets(n_layers: int, sources: Sequence[int], mode: str) -> dict[int, list[int]]:
    """Destination layers of each source layer: every later layer (``"all"``) or the next one (``"adjacent"``)."""
    stop = {l: n_layers if mode == "all" else min(l + 2, n_layers) for l in sources}
    return {l: list(range(l + 1, stop[l])) for l in sources}


#: ``composition="auto"`` takes every later layer only when that costs at most this many multiply-adds of the
#: scores (``layer pairs * 3 H^2 * d (d + 1) / 2``, about 1 s on one CPU core: SmolLM2-135M's 435 layer pairs,
#: 1.8e10, took ~8 s) and yields at most :data:`AUTO_ALL_MAX_ROWS` rows; adjacent layers otherwise.  MiniLM
#: (4.8e8) gets all pairs; SmolLM2-135M (1.8e10), GPT-2 small (8.4e9) and Llama-7B (1.3e13) adjacent ones
AUTO_ALL_MAX_MACS = 2e9
AUTO_ALL_MAX_ROWS = 50_000


def composition_estimate(n_layers: int, n_heads: int, d_model: int, sources: Sequence[int]) -> dict:
    """Cost of the composition pass from ``sources`` before it runs, for ``"all"`` and ``"adjacent"``: layer
    pairs, rows (``3 H^2`` per layer pair) and multiply-adds of the scores (``3 H^2`` inner products of packed
    ``d x d`` Grams per layer pair), and the mode ``"auto"`` picks: ``"all"`` when the *whole model's* all-pairs
    pass is within :data:`AUTO_ALL_MAX_MACS` and :data:`AUTO_ALL_MAX_ROWS`, else ``"adjacent"`` (decided on the
    whole model, so every layer shard of one model makes the same choice)."""
    def cost(mode: str, layers: Sequence[int]) -> dict:
        pairs = sum(len(t) for t in composition_targets(n_layers, layers, mode).values())
        rows = 3 * n_heads * n_heads * pairs
        return {"layer_pairs": pairs, "rows": rows, "macs": float(rows) * d_model * (d_model + 1) / 2}

    whole = cost("all", range(n_layers))
    small = whole["macs"] <= AUTO_ALL_MAX_MACS and whole["rows"] <= AUTO_ALL_MAX_ROWS
    return {"all": cost("all", sources), "adjacent": cost("adjacent", sources), "auto": "all" if small else "adjacent"}


def contiguous_runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """``[0, 1, 2, 5, 6]`` -> ``[(0, 3), (5, 7)]``: half-open runs of consecutive sorted indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def destination_reads(dst: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(W_Q, W_K)`` arguments of :func:`~hf_flag.geometry.composition.composition_scores` per kind."""
    return {"q": (dst["Q"], dst["K"]), "k": (dst["Q"], dst["K"]), "v": (dst["V"], dst["O"].mT)}


def composition_rows(model: str, kinds: dict[str, str], layout, sources: Sequence[int], mode: str,
                     load_attention: Callable, *, budget_bytes: int, itemsize: int) -> Iterator[Row]:
    """Composition rows (MATH.md §6) from every source layer in ``sources`` to its destination layers; ``kinds``
    maps ``"q"``/``"k"``/``"v"`` to the row kind; ``load_attention(i)`` reads layer i's ``AttentionWeights``.

    When ``budget_bytes`` holds the packed ``d x d`` Grams of five head sets (:func:`gram_composition_rows`), each
    source layer's Grams are built once (a destination's once per chunk of sources) and every layer pair costs one
    matmul; otherwise (very wide models) the tiled QR-reduced form runs per layer pair
    (:func:`tiled_composition_rows`).
    Both are exact."""
    targets = composition_targets(layout.n_layers, sources, mode)
    gram = packed_gram_bytes(layout.n_heads, layout.d_model)  # the Grams are float64 whatever the analysis dtype
    if budget_bytes >= 5 * gram:  # one source layer + the destination reserve of gram_composition_rows
        yield from gram_composition_rows(model, kinds, layout, sources, targets, load_attention,
                                         budget_bytes=budget_bytes)
    else:
        yield from tiled_composition_rows(model, kinds, layout, sources, targets, load_attention,
                                          budget_bytes=budget_bytes, itemsize=itemsize)


def gram_composition_rows(model: str, kinds: dict[str, str], layout, sources: Sequence[int],
                          targets: dict[int, list[int]], load_attention: Callable, *,
                          budget_bytes: int) -> Iterator[Row]:
    """Composition rows through packed Grams (``geometry.composition.scores_from_grams``).

    Source layers are taken in chunks whose packed Grams (``H`` packed ``d x d`` Grams per layer) fill at most
    ``budget_bytes`` minus the four head sets reserved for one destination layer (its q/k/v Grams, built in place,
    and the ``d x d`` build temporaries of a quarter of the heads); each destination layer is then read once per
    chunk holding one of its sources, and scores against all of them in one ``(c H, T) x (T, 3 H)`` matmul.
    Memory: the chunk + that reserve (the Grams are float64)."""
    H = layout.n_heads
    gram = packed_gram_bytes(H, layout.d_model)
    chunk = max(1, (budget_bytes - 4 * gram) // gram)
    tile = max(1, H // 4)  # d x d build temporaries: a quarter of a head set's (unpacked) Grams
    base = composition_baseline(layout.d_model)
    order = "qkv"
    srcs = [l for l in sources if targets[l]]
    for start in range(0, len(srcs), chunk):
        group = srcs[start:start + chunk]
        packed, norm2 = None, None
        for j, l in enumerate(group):
            src = expand_kv(load_attention(l), layout)
            if packed is None:
                T = layout.d_model * (layout.d_model + 1) // 2  # packed length of a d x d Gram
                packed = src["V"].new_empty(len(group) * H, T, dtype=torch.float64)
                norm2 = packed.new_empty(len(group) * H)
            source_grams(src["V"], src["O"], tile_size=tile,
                         out=CompositionGrams(packed[j * H:(j + 1) * H], norm2[j * H:(j + 1) * H]))
            del src
        dst = CompositionGrams(packed.new_empty(3 * H, packed.shape[1]), norm2.new_empty(3 * H))
        for t in sorted({t for l in group for t in targets[l]}):
            reads = destination_reads(expand_kv(load_attention(t), layout))
            for k, (s, (X, Y)) in enumerate(reads.items()):  # one kind's Grams at a time, built in place
                destination_grams(X, Y, kind=s, tile_size=tile,
                                  out=CompositionGrams(dst.packed[k * H:(k + 1) * H], dst.norm2[k * H:(k + 1) * H]))
            del reads
            release_freed_memory()
            for a, b in contiguous_runs([j for j, l in enumerate(group) if t in targets[l]]):
                scores = scores_from_grams(CompositionGrams(packed[a * H:b * H], norm2[a * H:b * H]), dst).tolist()
                yield from (Row(model, kinds[order[c // H]], group[a + r // H], t, f"head {r % H}",
                                f"head {c % H}", {"score": sc, "score_baseline": base})
                            for r, row in enumerate(scores) for c, sc in enumerate(row))
        del dst, packed, norm2


def tiled_composition_rows(model: str, kinds: dict[str, str], layout, sources: Sequence[int],
                           targets: dict[int, list[int]], load_attention: Callable, *, budget_bytes: int,
                           itemsize: int) -> Iterator[Row]:
    """Composition rows by the tiled QR-reduced form (``geometry.composition.composition_scores``), for models
    whose packed Grams do not fit the budget.

    Destination layers' attention (KV heads unexpanded) is cached in chunks of at most ``budget_bytes`` (at least
    one layer); each source layer is read once per chunk holding one of its destinations, so memory is one chunk
    plus one source layer and the expanded heads of a group of destinations (a quarter of the budget).  Scores
    are computed in the dtype the attention is read in (the analysis dtype: float32 for the default report of
    coarse storage, MATH.md §4's precision policy), at least float32; kinds k and v multiply each destination
    KV head once (``shared``), not once per query head."""
    dests = sorted({t for ts in targets.values() for t in ts})
    per_layer = 2 * (layout.n_heads + layout.n_kv_heads) * layout.d_model * layout.head_dim * itemsize
    chunk = max(1, budget_bytes // per_layer)
    group = max(1, budget_bytes // (16 * layout.n_heads * layout.d_model * layout.head_dim * itemsize))
    base = composition_baseline(layout.d_model)
    for start in range(0, len(dests), chunk):
        cache = {t: load_attention(t) for t in dests[start:start + chunk]}
        for l in sources:
            ts = [t for t in targets[l] if t in cache]
            if ts:
                yield from _tiled_source_rows(model, kinds, layout, l, ts, cache, load_attention, group=group,
                                              baseline=base)
        del cache  # before the next chunk is read: one chunk resident at a time


def _tiled_source_rows(model: str, kinds: dict[str, str], layout, l: int, ts: list[int], cache: dict,
                       load_attention: Callable, *, group: int, baseline: float) -> Iterator[Row]:
    """:func:`tiled_composition_rows` from source layer ``l`` to its destinations ``ts`` (cached in ``cache``);
    its temporaries (the source's heads, a group's concatenated destination heads) are released when it ends,
    before the next source layer is read."""
    H = layout.n_heads
    src = expand_kv(cache[l] if l in cache else load_attention(l), layout)
    dtype = torch.promote_types(src["V"].dtype, torch.float32)
    for g in range(0, len(ts), group):
        attn = [cache[t] for t in ts[g:g + group]]  # `group` destination layers, KV heads unexpanded
        Q, O = (torch.cat([getattr(a, r) for a in attn]) for r in ("W_Q", "W_O"))
        K, V = (torch.cat([getattr(a, r) for a in attn]) for r in ("W_K", "W_V"))
        kv = torch.cat([kv_index(layout, K.device) + j * layout.n_kv_heads for j in range(len(attn))])
        reads = {"q": ((Q, K[kv]), None), "k": ((Q, K), kv), "v": ((V, O.mT), kv)}
        del attn, Q, O, K, V  # held by reads only: each kind's pair released after its scores
        for s in "qkv":
            (X, Y), shared = reads.pop(s)
            scores = composition_scores(src["V"], src["O"], X, Y, kind=s, dtype=dtype, shared=shared).tolist()
            del X, Y
            yield from (Row(model, kinds[s], l, ts[g + j // H], f"head {h}", f"head {j % H}",
                            {"score": sc, "score_baseline": baseline})
                        for h, row in enumerate(scores) for j, sc in enumerate(row))
