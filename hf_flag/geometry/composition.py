"""Q-, K- and V-composition scores between attention heads, tiled (MATH.md §6).

Elhage et al. (2021): ``score = ||L R||_F / (||L||_F ||R||_F)`` with ``L = W_V W_O`` of the source head and ``R``
taken from the destination head.  Heads use the ``x @ W`` convention of ``hf_flag.weights.blocks``.  The weights
are scored as given: unlike TransformerLens, no LayerNorm folding and no centring is done here (an adapter or
the caller may fold first).  Haar baseline: ``E[score^2] = 1/d`` (``baselines.composition_baseline``).

Two exact routes to the same score: :func:`composition_scores` (one layer pair, cost ``H H' d dh^2`` in one
matmul after thin QRs of the heads, memory about ``d x d`` per tile) and :func:`source_grams` /
:func:`destination_grams` / :func:`scores_from_grams` (packed ``d x d`` Grams built once per layer, ``H d^2 dh``,
then ``H H' d^2 / 2`` per layer pair: cheaper when every layer meets many others, as in all-pairs composition, at
``d^2 / 2`` floats per head).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from hf_flag.geometry.angles import check_dtype, check_matrix
from hf_flag.geometry.pairs import safe_ratio

__all__ = ["composition_scores", "CompositionGrams", "source_grams", "destination_grams", "scores_from_grams",
           "packed_gram_bytes"]

_KINDS = ("q", "k", "v")


def _heads(name: str, W: torch.Tensor, rows: Optional[int], cols: Optional[int]) -> None:
    check_matrix(name, W, where="composition_scores")
    if W.ndim != 3 or (rows is not None and W.shape[1] != rows) or (cols is not None and W.shape[2] != cols):
        want = f"(heads, {rows if rows is not None else 'rows'}, {cols if cols is not None else 'cols'})"
        raise ValueError(f"composition_scores: {name} must have shape {want}; got {tuple(W.shape)}")


def _check_source(W_V: torch.Tensor, W_O: torch.Tensor) -> None:
    """Source heads: ``W_V`` (H, d, dh) and ``W_O`` (H, dh, d), finite."""
    _heads("W_V", W_V, None, None)
    H, d, dh = W_V.shape
    _heads("W_O", W_O, dh, d)
    if W_O.shape[0] != H:
        raise ValueError(f"composition_scores: W_O {tuple(W_O.shape)} and W_V {tuple(W_V.shape)} must have the "
                         f"same number of heads")


def _check_destination(W_Q: torch.Tensor, W_K: torch.Tensor, kind: str, d: Optional[int]) -> None:
    """Destination heads: ``W_Q``, ``W_K`` (H', d, dh'), finite; ``kind`` in q/k/v."""
    if kind not in _KINDS:
        raise ValueError(f"composition_scores: kind must be one of {_KINDS}; got {kind!r}")
    _heads("W_Q", W_Q, d, None)
    _heads("W_K", W_K, W_Q.shape[1], W_Q.shape[2])
    if W_K.shape[0] != W_Q.shape[0]:
        raise ValueError(f"composition_scores: W_Q {tuple(W_Q.shape)} and W_K {tuple(W_K.shape)} must have the "
                         f"same number of heads (expand KV heads to query heads; for kind='v' pass "
                         f"W_O_dst.transpose(-1, -2) as W_K)")


def _check_shared(W_Q: torch.Tensor, W_K: torch.Tensor, kind: str, d: int, shared: torch.Tensor) -> None:
    """Grouped destination heads: the shared tensor (``W_K`` for ``kind="k"``, ``W_Q`` for ``"v"``) holds KV heads,
    ``shared[g]`` names destination head g's."""
    if kind not in ("k", "v"):
        raise ValueError(f"composition_scores: shared KV heads apply to kind 'k' or 'v' (the projection they share); "
                         f"got kind={kind!r}")
    X, Y = (W_K, W_Q) if kind == "k" else (W_Q, W_K)
    _heads("W_Q", W_Q, d, None)
    _heads("W_K", W_K, W_Q.shape[1], W_Q.shape[2])
    if not isinstance(shared, torch.Tensor) or shared.dtype != torch.int64 or shared.ndim != 1 or \
            shared.numel() != Y.shape[0] or (shared.numel() and not 0 <= int(shared.min()) <= int(shared.max())
                                             < X.shape[0]):
        raise ValueError(f"composition_scores: shared must be an int64 tensor of {Y.shape[0]} KV head indices in "
                         f"[0, {X.shape[0]}) (one per destination head); got {shared!r}")


def composition_scores(
    W_V: torch.Tensor, W_O: torch.Tensor, W_Q: torch.Tensor, W_K: torch.Tensor, *, kind: str,
    tile_size: Optional[int] = None, dtype: torch.dtype = torch.float64, shared: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """All ``(H, H')`` composition scores from source heads to destination heads (MATH.md §6).

    Source: ``W_V`` (H, d, dh), ``W_O`` (H, dh, d), so ``L_h = W_V[h] W_O[h]``.  Destination: two
    ``(H', d, dh')`` tensors ``X = W_Q``, ``Y = W_K`` (KV heads already expanded to query heads) with
    ``R = X Y^T``:

    * ``kind="q"``: ``R = W_Q W_K^T`` (query side reads what the source wrote);
    * ``kind="k"``: ``R^T = W_K W_Q^T``;
    * ``kind="v"``: pass the destination's ``W_V`` as ``W_Q`` and ``W_O.transpose(-1, -2)`` as ``W_K``, so
      ``R = W_V W_O`` of the destination head.

    Exact, never d x d: with the thin QR factors ``W_V[h] = Q R_h`` and ``Y[g] = Q' R'_g`` (orthonormal ``Q``,
    ``Q'`` drop out of Frobenius norms), ``||L_h R_g||_F = ||R_h W_O[h] X[g] R'_g^T||_F = ||P_h Z_g||_F`` with
    ``P_h = R_h W_O[h]`` (dh x d) and ``Z_g = X[g] R'_g^T`` (d x dh'); ``||L_h||_F = ||P_h||_F`` and
    ``||R_g||_F = ||Z_g||_F``.  Every head pair's ``P_h Z_g`` comes from one ``(H dh) x d x (H' dh')`` matmul,
    ``tile_size`` head pairs at a time (default ``d^2 / (dh dh')``, so a tile holds about ``d x d`` numbers).
    ``dtype``: the precision to compute in (float32 for the default report of coarse storage, §4's precision
    policy; the score is a ratio of sums of squares, no cancellation).  A zero head scores 0.
    ``shared`` (grouped-query attention, ``kind`` "k" or "v"): ``W_K`` (kind "k") or ``W_Q`` (kind "v": the
    destination's ``W_V``) holds the KV heads unexpanded and destination head g uses KV head ``shared[g]``; the
    matmul then runs over the KV heads (``P_h X_c``), each destination head's ``R'_g^T`` applied after.
    """
    _check_source(W_V, W_O)
    H, d, dh = W_V.shape
    if shared is None:
        _check_destination(W_Q, W_K, kind, d)
    else:
        _check_shared(W_Q, W_K, kind, d, shared)
    check_dtype(dtype, where="composition_scores")
    dev = W_V.device
    W_V, W_O = W_V.to(dtype), W_O.to(device=dev, dtype=dtype)
    X, Y = (W_Q, W_K) if kind != "k" else (W_K, W_Q)
    X, Y = X.to(device=dev, dtype=dtype), Y.to(device=dev, dtype=dtype)
    H2, dh2 = Y.shape[0], Y.shape[2]
    if tile_size is None:
        tile_size = max(1, d * d // max(1, dh * dh2))
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"composition_scores: tile_size must be a positive int (head pairs per tile); "
                         f"got {tile_size!r}")

    P = torch.linalg.qr(W_V, mode="r").R @ W_O  # (H, r, d), r = min(d, dh)
    R_Y = torch.linalg.qr(Y, mode="r").R  # (H', r', dh')
    X_g = X if shared is None else X[shared.to(dev)]  # (H', d, dh'): destination head g's X
    L2 = P.square().sum(dim=(-2, -1))
    R2 = ((R_Y @ (X_g.mT @ X_g)) * R_Y).sum(dim=(-2, -1))  # ||X_g R'_g^T||^2 = tr(R' X^T X R'^T)
    r, r2 = P.shape[1], R_Y.shape[1]
    ts = max(1, tile_size // H2)  # source heads per tile (all destination heads at once)
    num2 = torch.empty(H, H2, dtype=dtype, device=dev)
    if shared is None:
        Z_all = (X @ R_Y.mT).permute(1, 0, 2).reshape(d, H2 * r2)  # Z_g = X_g R'_g^T side by side
    else:
        X_all = X.permute(1, 0, 2).reshape(d, X.shape[0] * dh2)  # the KV heads side by side
    for i in range(0, H, ts):
        if shared is None:
            N = P[i:i + ts].reshape(-1, d) @ Z_all  # (ts r, H' r'): block (h, g) is P_h Z_g
            N = N.reshape(-1, r, H2, r2)
        else:  # (ts r, n_kv dh'): block (h, c) is P_h X_c; then P_h X_{shared[g]} R'_g^T
            N = (P[i:i + ts].reshape(-1, d) @ X_all).reshape(-1, r, X.shape[0], dh2)[:, :, shared.to(dev)]
            N = torch.einsum("hagc,gbc->hagb", N, R_Y)
        num2[i:i + ts] = N.square().sum(dim=(1, 3))
    return safe_ratio(num2.sqrt(), (L2[:, None] * R2[None, :]).sqrt())


class CompositionGrams(NamedTuple):
    """Packed ``d x d`` Grams of one side of the composition score (MATH.md §6), reusable across layer pairs.

    ``packed``: ``(H, d (d + 1) / 2)``, the upper triangle of each head's Gram with off-diagonal entries scaled by
    sqrt 2, so ``<G_h, G'_g>_F = packed[h] . packed'[g]``; ``norm2``: ``(H,)`` traces, i.e. squared Frobenius
    norms of ``L_h`` (source) or ``R_g`` (destination).
    """

    packed: torch.Tensor
    norm2: torch.Tensor


def packed_gram_bytes(heads: int, d: int, dtype: torch.dtype = torch.float64) -> int:
    """Bytes of the :class:`CompositionGrams` of ``heads`` heads in R^d (what a cache of them costs)."""
    return heads * (d * (d + 1) // 2) * dtype.itemsize


def _pack(F: torch.Tensor, G: torch.Tensor, tile_size: Optional[int],
          out: Optional[CompositionGrams] = None) -> CompositionGrams:
    """Packed Grams ``F[h] G[h] F[h]^T`` (``F``: (H, d, r), ``G``: (H, r, r) symmetric), ``tile_size`` heads at a
    time (the full ``d x d`` temporaries of a tile are the only unpacked memory), written into ``out`` if given."""
    H, d = F.shape[0], F.shape[1]
    rows, cols = torch.triu_indices(d, d, device=F.device)
    flat = rows * d + cols
    weight = torch.full(flat.shape, math.sqrt(2.0), dtype=F.dtype, device=F.device).masked_fill_(rows == cols, 1.0)
    step = H if tile_size is None else tile_size
    if out is None:
        out = CompositionGrams(torch.empty(H, flat.numel(), dtype=F.dtype, device=F.device),
                               torch.empty(H, dtype=F.dtype, device=F.device))
    elif tuple(out.packed.shape) != (H, flat.numel()) or tuple(out.norm2.shape) != (H,):
        raise ValueError(f"composition grams: out holds packed {tuple(out.packed.shape)} and norm2 "
                         f"{tuple(out.norm2.shape)}; {H} heads in R^{d} need {(H, flat.numel())} and {(H,)}")
    for i in range(0, H, step):
        full = F[i:i + step] @ (G[i:i + step] @ F[i:i + step].mT)  # (tile, d, d)
        packed = out.packed[i:i + step]
        torch.index_select(full.reshape(full.shape[0], d * d), 1, flat, out=packed)  # no (tile, T) temporaries
        packed.mul_(weight)
    out.norm2.copy_((G * (F.mT @ F)).sum(dim=(-2, -1)))  # tr(F G F^T) = <G, F^T F>
    return out


def _tile(tile_size: Optional[int]) -> Optional[int]:
    if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 1):
        raise ValueError(f"composition grams: tile_size must be a positive int (heads per tile); got {tile_size!r}")
    return tile_size


def source_grams(W_V: torch.Tensor, W_O: torch.Tensor, *, tile_size: Optional[int] = None,
                 dtype: torch.dtype = torch.float64, out: Optional[CompositionGrams] = None) -> CompositionGrams:
    """Packed ``L_h^T L_h = W_O^T (W_V^T W_V) W_O`` of source heads ``W_V`` (H, d, dh), ``W_O`` (H, dh, d)
    (MATH.md §6).  Cost ``H d^2 dh``; pair with :func:`destination_grams` through :func:`scores_from_grams`.
    ``out``: tensors (``(H, d (d + 1) / 2)``, ``(H,)``, ``dtype``) to write into, e.g. slices of a cache."""
    _check_source(W_V, W_O)
    check_dtype(dtype, where="source_grams")
    W_V, W_O = W_V.to(dtype), W_O.to(device=W_V.device, dtype=dtype)
    return _pack(W_O.mT, W_V.mT @ W_V, _tile(tile_size), out)


def destination_grams(W_Q: torch.Tensor, W_K: torch.Tensor, *, kind: str, tile_size: Optional[int] = None,
                      dtype: torch.dtype = torch.float64, out: Optional[CompositionGrams] = None
                      ) -> CompositionGrams:
    """Packed ``R_g R_g^T = X (Y^T Y) X^T`` of destination heads, with ``X, Y`` as in :func:`composition_scores`
    (``kind="k"`` swaps them; for ``kind="v"`` pass the destination's ``W_V`` and ``W_O^T``) (MATH.md §6);
    ``out`` as in :func:`source_grams`."""
    _check_destination(W_Q, W_K, kind, None)
    check_dtype(dtype, where="destination_grams")
    X, Y = (W_Q, W_K) if kind != "k" else (W_K, W_Q)
    X, Y = X.to(dtype), Y.to(device=X.device, dtype=dtype)
    return _pack(X, Y.mT @ Y, _tile(tile_size), out)


def scores_from_grams(source: CompositionGrams, destination: CompositionGrams) -> torch.Tensor:
    """``(H, H')`` composition scores ``sqrt(<L_h^T L_h, R_g R_g^T>) / (||L_h|| ||R_g||)`` from packed Grams: one
    ``(H, T) x (T, H')`` matmul, ``T = d (d + 1) / 2`` (MATH.md §6; ``||L R||_F^2 = tr(L^T L R R^T)``).  Equals
    :func:`composition_scores`; cheaper when each side's Grams are reused across many layer pairs."""
    if source.packed.shape[-1] != destination.packed.shape[-1]:
        raise ValueError(f"scores_from_grams: packed Grams of width {source.packed.shape[-1]} and "
                         f"{destination.packed.shape[-1]} come from different model dimensions d")
    num2 = source.packed @ destination.packed.mT
    return safe_ratio(num2.clamp_min(0).sqrt(), (source.norm2[:, None] * destination.norm2[None, :]).sqrt())
