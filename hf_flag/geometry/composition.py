"""Q-, K- and V-composition scores between attention heads, by the tiled trace form (MATH.md §6).

Elhage et al. (2021): ``score = ||L R||_F / (||L||_F ||R||_F)`` with ``L = W_V W_O`` of the source head and ``R``
taken from the destination head.  Heads use the ``x @ W`` convention of ``hf_flag.weights.blocks``.  The weights
are scored as given: unlike TransformerLens, no LayerNorm folding and no centring is done here (an adapter or
the caller may fold first).  Haar baseline: ``E[score^2] = 1/d`` (``baselines.composition_baseline``).
"""
from __future__ import annotations

from typing import Optional

import torch

from hf_flag.geometry.angles import check_matrix
from hf_flag.geometry.pairs import _safe_ratio

_KINDS = ("q", "k", "v")


def _heads(name: str, W: torch.Tensor, rows: Optional[int], cols: Optional[int]) -> None:
    check_matrix(name, W, where="composition_scores")
    if W.ndim != 3 or (rows is not None and W.shape[1] != rows) or (cols is not None and W.shape[2] != cols):
        want = f"(heads, {rows if rows is not None else 'rows'}, {cols if cols is not None else 'cols'})"
        raise ValueError(f"composition_scores: {name} must have shape {want}; got {tuple(W.shape)}")


def composition_scores(
    W_V: torch.Tensor, W_O: torch.Tensor, W_Q: torch.Tensor, W_K: torch.Tensor, *, kind: str,
    tile_size: Optional[int] = None, dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """All ``(H, H')`` composition scores from source heads to destination heads (MATH.md §6).

    Source: ``W_V`` (H, d, dh), ``W_O`` (H, dh, d), so ``L_h = W_V[h] W_O[h]``.  Destination: two
    ``(H', d, dh')`` tensors ``X = W_Q``, ``Y = W_K`` (KV heads already expanded to query heads) with
    ``R = X Y^T``:

    * ``kind="q"``: ``R = W_Q W_K^T`` (query side reads what the source wrote);
    * ``kind="k"``: ``R^T = W_K W_Q^T``;
    * ``kind="v"``: pass the destination's ``W_V`` as ``W_Q`` and ``W_O.transpose(-1, -2)`` as ``W_K``, so
      ``R = W_V W_O`` of the destination head.

    Exact trace form, never d x d: ``||L R||_F^2 = ||W_V M Y^T||_F^2 = tr(G_V M G_Y M^T)`` with ``M = W_O X``
    (dh x dh'), ``G_V = W_V^T W_V``, ``G_Y = Y^T Y``; ``||L||_F^2 = tr(G_V W_O W_O^T)``,
    ``||R||_F^2 = tr(X^T X G_Y)``.  Head pairs are processed ``tile_size`` at a time (default ``d // dh'``),
    so the working memory is O(d x dh) per tile.  A zero head scores 0.
    """
    if kind not in _KINDS:
        raise ValueError(f"composition_scores: kind must be one of {_KINDS}; got {kind!r}")
    _heads("W_V", W_V, None, None)
    H, d, dh = W_V.shape
    _heads("W_O", W_O, dh, d)
    if W_O.shape[0] != H:
        raise ValueError(f"composition_scores: W_O {tuple(W_O.shape)} and W_V {tuple(W_V.shape)} must have the "
                         f"same number of heads")
    _heads("W_Q", W_Q, d, None)
    _heads("W_K", W_K, d, W_Q.shape[2])
    if W_K.shape[0] != W_Q.shape[0]:
        raise ValueError(f"composition_scores: W_Q {tuple(W_Q.shape)} and W_K {tuple(W_K.shape)} must have the "
                         f"same number of heads (expand KV heads to query heads; for kind='v' pass "
                         f"W_O_dst.transpose(-1, -2) as W_K)")
    dev = W_V.device
    W_V, W_O = W_V.to(dtype), W_O.to(device=dev, dtype=dtype)
    X, Y = (W_Q, W_K) if kind != "k" else (W_K, W_Q)
    X, Y = X.to(device=dev, dtype=dtype), Y.to(device=dev, dtype=dtype)
    H2, dh2 = X.shape[0], X.shape[2]
    if tile_size is None:
        tile_size = max(1, d // dh2)
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"composition_scores: tile_size must be a positive int (head pairs per tile); "
                         f"got {tile_size!r}")

    G_V = W_V.mT @ W_V  # (H, dh, dh)
    G_Y = Y.mT @ Y  # (H', dh', dh')
    L2 = (G_V * (W_O @ W_O.mT)).sum(dim=(-2, -1))  # (H,) ; G symmetric so tr(G P) = sum(G * P)
    R2 = ((X.mT @ X) * G_Y).sum(dim=(-2, -1))  # (H',)

    td = min(H2, tile_size)
    ts = max(1, tile_size // td)
    num2 = torch.empty(H, H2, dtype=dtype, device=dev)
    for i in range(0, H, ts):
        for j in range(0, H2, td):
            M = W_O[i:i + ts, None] @ X[None, j:j + td]  # (ts, td, dh, dh')
            num2[i:i + ts, j:j + td] = ((G_V[i:i + ts, None] @ M) * (M @ G_Y[None, j:j + td])).sum(dim=(-2, -1))
    return _safe_ratio(num2.clamp_min(0).sqrt(), (L2[:, None] * R2[None, :]).sqrt())
