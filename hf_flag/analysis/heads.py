"""Head rows: head-subspace overlaps and streamed composition scores (MATH.md §1, §6).

Helpers of :mod:`hf_flag.analyze` (which documents the row kinds and values); row kinds are passed in.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from hf_flag.report import Row


def overlap_rows(model: str, kind: str, layer: int, target_layer: int, X: torch.Tensor, Y: torch.Tensor,
                 labels: tuple[str, str], *, upper: bool) -> list[Row]:
    """Rows of the head-subspace overlaps of column spaces ``X: (H, d, r)`` vs ``Y: (H', d, r')`` (only h < h'
    when ``upper``), each beside its Haar baseline max(r, r')/d and z-score (MATH.md §1, §6)."""
    from hf_flag.geometry.baselines import overlap_baseline, overlap_zscore
    from hf_flag.geometry.heads import head_overlap_matrix

    d, p, q = X.shape[1], X.shape[2], Y.shape[2]
    overlaps = head_overlap_matrix(X, Y)
    zscores = overlap_zscore(overlaps, p, q, d).tolist()
    base = float(overlap_baseline(p, q, d))
    return [
        Row(model, kind, layer, target_layer, f"{labels[0]} {h}", f"{labels[1]} {g}",
            {"overlap": ov, "overlap_baseline": base, "overlap_zscore": zscores[h][g]})
        for h, row in enumerate(overlaps.tolist()) for g, ov in enumerate(row) if not upper or h < g
    ]


def expand_kv(attn, layout) -> dict[str, torch.Tensor]:
    """Per-query-head W_Q, W_K, W_V, W_O (KV heads repeated as transformers' ``repeat_kv`` does)."""
    kv = torch.tensor([layout.kv_head_of(h) for h in range(layout.n_heads)], device=attn.W_K.device)
    return {"Q": attn.W_Q, "K": attn.W_K.index_select(0, kv), "V": attn.W_V.index_select(0, kv), "O": attn.W_O}


def composition_targets(n_layers: int, sources: Sequence[int], mode: str) -> dict[int, list[int]]:
    """Destination layers of each source layer: every later layer (``"all"``) or the next one (``"adjacent"``)."""
    stop = {l: n_layers if mode == "all" else min(l + 2, n_layers) for l in sources}
    return {l: list(range(l + 1, stop[l])) for l in sources}


def composition_rows(model: str, kinds: dict[str, str], layout, sources: Sequence[int], mode: str,
                     load_attention: Callable, *,
                     budget_bytes: int, itemsize: int) -> Iterator[Row]:
    """Composition rows (MATH.md §6) from every source layer in ``sources`` to its destination layers; ``kinds``
    maps ``"q"``/``"k"``/``"v"`` to the row kind.

    Destination layers' attention (KV heads unexpanded) is cached in chunks of at most ``budget_bytes`` (at least
    one layer); each source layer is read once per chunk holding one of its destinations, so memory is one chunk
    plus one source layer and the expanded heads of a group of destinations (a quarter of the budget).  ``load_attention(i)`` reads layer i's ``AttentionWeights``."""
    from hf_flag.geometry.baselines import composition_baseline
    from hf_flag.geometry.composition import composition_scores

    targets = composition_targets(layout.n_layers, sources, mode)
    dests = sorted({t for ts in targets.values() for t in ts})
    per_layer = 2 * (layout.n_heads + layout.n_kv_heads) * layout.d_model * layout.head_dim * itemsize
    chunk = max(1, budget_bytes // per_layer)
    group = max(1, budget_bytes // (16 * layout.n_heads * layout.d_model * layout.head_dim * itemsize))
    base = composition_baseline(layout.d_model)
    H = layout.n_heads
    for start in range(0, len(dests), chunk):
        cache = {t: load_attention(t) for t in dests[start:start + chunk]}
        for l in sources:
            ts = [t for t in targets[l] if t in cache]
            if not ts:
                continue
            src = expand_kv(cache[l] if l in cache else load_attention(l), layout)
            for g in range(0, len(ts), group):
                dst = [expand_kv(cache[t], layout) for t in ts[g:g + group]]
                dst = {r: torch.cat([d[r] for d in dst]) for r in "QKVO"}  # heads of `group` destination layers
                reads = {"q": (dst["Q"], dst["K"]), "k": (dst["Q"], dst["K"]), "v": (dst["V"], dst["O"].mT)}
                for s, (X, Y) in reads.items():
                    scores = composition_scores(src["V"], src["O"], X, Y, kind=s).tolist()
                    yield from (Row(model, kinds[s], l, ts[g + j // H], f"head {h}", f"head {j % H}",
                                    {"score": sc, "score_baseline": base})
                                for h, row in enumerate(scores) for j, sc in enumerate(row))
