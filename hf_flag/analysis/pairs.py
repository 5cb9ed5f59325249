"""Pair rows' values: one pair ``W_l`` (n x k) -> ``W_next`` (m x n) sharing the hidden space R^n (MATH.md §2-§4).

The row kinds and values are documented in :mod:`hf_flag.analysis.api`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from hf_flag.geometry.angles import default_rtol, thin_svd
from hf_flag.geometry.baselines import intersection_soft_baseline, transport_baselines
from hf_flag.geometry.flags import flag_position_from_svd, gl_kernel_dim_from_product_rank, gl_kernel_dim_generic
from hf_flag.geometry.pairs import (GramCut, WeightNorms, augment, commutator_reading_of_pairs, gram_cut,
                                    gram_pair_values, imbalance_diagonal_from_norms, normalized_commutator_ratio,
                                    pair_gram_sides, pair_product, pair_values_from_svd, product_rank_rtol,
                                    range_overlap_from_grams, transport_k, transport_scores_from_matrix, weight_gram,
                                    weight_norms)
from hf_flag.geometry.spectral import (K_MAX, PartialSVD, certified_partial_svd, gram_dtype, last_cut, soft_tolerance,
                                       transport_tolerances, transport_window)
from hf_flag.report import Row
from hf_flag.rows import KAPPA_READS

#: a thin SVD ``(U, s, Vh)`` as returned by :func:`hf_flag.geometry.angles.thin_svd`
ThinSVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def flag_details(flag) -> dict:
    """JSON-sized facts of a flag relative position: cuts, rank matrix, the block permutation as its nonzero
    entries ``[a, b, P_ab]``, and whether it is a (partial) permutation (MATH.md §4)."""
    P = flag.permutation
    return {"cuts_left": flag.cuts_left, "cuts_right": flag.cuts_right, "rank_matrix": flag.rank_matrix.tolist(),
            "permutation": [[a, b, int(P[a, b])] for a, b in P.nonzero().tolist()],
            "is_permutation": flag.is_permutation, "permutation_word": flag.permutation_word,
            "intersection_cut": flag.intersection_cut}


def flag_values(flag) -> dict[str, Optional[float]]:
    """Scalar values of a flag relative position at its largest common cut ``c`` (``None`` when there is none),
    the soft count beside its Haar mean ``c^2 / n`` (MATH.md §1, §4)."""
    c = flag.intersection_cut
    soft = None if c is None else float(flag.soft_matrix[flag.cuts_left.index(c), flag.cuts_right.index(c)])
    return {"intersection_dim": None if c is None else float(flag.intersection_dim),
            "intersection_dim_baseline": None if c is None else float(flag.intersection_baseline),
            "intersection_soft": soft,
            "intersection_soft_baseline": None if c is None else intersection_soft_baseline(c, c, flag.n),
            "flag_tau": float(flag.tau)}


def pair_geometry_values(W_l: torch.Tensor, W_next: torch.Tensor, *, storage_eps: float,
                         svd_l: Optional[ThinSVD] = None, svd_next: Optional[ThinSVD] = None
                         ) -> list[tuple[dict, dict]]:
    """(values, details) of a batch of full pair rows (``W_l`` (B, n, k) bias-augmented, ``W_next`` (B, m, n)):
    every value of a full pair row.

    One thin SVD per weight (``svd_l``, ``svd_next``: pass them when the weight belongs to several pairs, e.g.
    ``mlp_out`` in the mlp, mlp_gate and residual pairs) serves everything:
    :func:`~hf_flag.geometry.pairs.pair_values_from_svd` gives kappa, its closed-form Haar RMS, the imbalance
    norms (``||diag D||`` from the weights' row and column norms), the transport matrix and the product's rank
    (MATH.md §2-§4); transport scores, flags and the GL kernel dimension read those (§4).  Rank cuts (flags,
    range_overlap) at the MATH.md §1 cut of the storage precision ``storage_eps``, as the reading's."""
    svd_l = thin_svd(W_l) if svd_l is None else svd_l
    svd_next = thin_svd(W_next) if svd_next is None else svd_next
    v = pair_values_from_svd(W_l, W_next, svd_l, svd_next, storage_eps=storage_eps)
    n, k = W_l.shape[-2], transport_k(W_l.shape[-2], W_l.shape[-1], W_next.shape[-2])
    sub_base, basis_base = transport_baselines(k, n)
    subspace, basis = transport_scores_from_matrix(v.transport, k)
    rank_rtol = (default_rtol(W_l, storage_eps), default_rtol(W_next, storage_eps))  # §1 cut of the storage
    gl_rtol = product_rank_rtol(rank_rtol)  # the GL kernel dimension's ranks, as pair_values_from_svd's product's
    h = host_columns({**kappa_columns(v, v.imbalance_diagonal_norm), "range_overlap": v.range_overlap,
                      "range_overlap_baseline": v.range_overlap_baseline, "subspace_score": subspace,
                      "basis_score": basis, "product_rank": v.product_rank})
    # flags and ranks per pair on host copies (one transfer per factor and batch)
    (U, s_l, _), (_, s_next, Vh), T = host(svd_l), host(svd_next), v.transport.cpu()
    out = []
    for i in range(W_l.shape[0]):
        gl_baseline = gl_kernel_dim_generic(s_l[i], s_next[i], n, rtol=gl_rtol)  # None: spectra spread past the cut
        flag = flag_position_from_svd(U[i], s_l[i], Vh[i], s_next[i], n=n, rank_rtol=rank_rtol,
                                      storage_eps=storage_eps, transport=T[i])
        values = {**kappa_values(h, i), "range_overlap": h["range_overlap"][i],
                  "range_overlap_baseline": h["range_overlap_baseline"][i],
                  "subspace_score": h["subspace_score"][i], "subspace_score_baseline": sub_base,
                  "basis_score": h["basis_score"][i], "basis_score_baseline": basis_base, **flag_values(flag),
                  "gl_kernel_dim": float(gl_kernel_dim_from_product_rank(s_l[i], int(h["product_rank"][i]),
                                                                         rtol=gl_rtol)),
                  "gl_kernel_dim_baseline": gl_baseline if gl_baseline is None else float(gl_baseline)}
        out.append((values, {"transport_k": k, **flag_details(flag)}))
    return out


def host(svd: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Host copies (``.cpu()``) of an SVD's ``U``, ``s``, ``Vh``: the per-pair work on them (flags, ranks) then
    reads nothing back from the device (issue #11)."""
    return tuple(x.cpu() for x in svd[:3])


def host_columns(columns: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Value columns (one value per batch member, all on one device) read back in one transfer: stacked in float64
    (exact for float32 and integer columns, so each value equals ``float(column[i])``) and converted by one
    ``.tolist()``; no device read per pair or head (issue #11)."""
    table = torch.stack([c.reshape(-1).to(torch.float64) for c in columns.values()]).tolist()
    return dict(zip(columns, table))


def kappa_columns(v, diagonal: torch.Tensor) -> dict[str, torch.Tensor]:
    """Kappa, the imbalance norms and their Haar RMS of a batch (``v``: a
    :class:`~hf_flag.geometry.pairs.GramPairValues` or :class:`~hf_flag.geometry.pairs.SpectralPairValues`) and
    ``||diag D||`` (``diagonal``), for :func:`host_columns`."""
    return {"commutator_ratio": v.commutator_ratio, "commutator_haar_rms": v.commutator_haar_rms,
            "imbalance_norm": v.imbalance_norm, "imbalance_haar_rms": v.imbalance_haar_rms,
            "relative_imbalance": v.relative_imbalance, "relative_imbalance_haar_rms": v.relative_imbalance_haar_rms,
            "imbalance_diagonal_norm": diagonal}


def kappa_values(h: dict[str, list[float]], i: int) -> dict[str, float]:
    """Batch member ``i``'s kappa, sqrt(2) kappa and imbalance values beside their baselines (MATH.md §2, §3), from
    the host columns of :func:`kappa_columns`."""
    kappa, base = h["commutator_ratio"][i], h["commutator_haar_rms"][i]
    return {"commutator_ratio": kappa, "commutator_ratio_normalized": normalized_commutator_ratio(kappa),
            "commutator_ratio_normalized_baseline": normalized_commutator_ratio(base),
            "imbalance_norm": h["imbalance_norm"][i], "imbalance_norm_baseline": h["imbalance_haar_rms"][i],
            "relative_imbalance": h["relative_imbalance"][i],
            "relative_imbalance_baseline": h["relative_imbalance_haar_rms"][i],
            "imbalance_diagonal_norm": h["imbalance_diagonal_norm"][i], "commutator_ratio_baseline": base}


def gram_values(W_l: torch.Tensor, W_next: torch.Tensor, *, storage_eps: float,
                gram: Optional["PairGrams"] = None) -> list[tuple[dict, dict]]:
    """(values, details) per batch member of the cheap rows: kappa, sqrt(2) kappa, kappa's Haar RMS, ||D||,
    relative imbalance and ||diag D|| from one set of Gram factors of ``(W_l, W_next)`` (no SVD; MATH.md §2, §3),
    in :func:`~hf_flag.geometry.spectral.gram_dtype` of the storage precision (the default report's policy: float32
    Grams of bf16 or quantised weights, float64 otherwise), from the pair's shared Grams ``gram``
    (:class:`PairGrams`) when given; details: whether kappa reads (``commutator_reading_holds``) at the storage
    cut, from the same Grams' rank cuts (:func:`~hf_flag.geometry.pairs.gram_cut`)."""
    exact = gram_dtype(storage_eps, W_l.dtype)
    side_l, side_next = pair_gram_sides(W_l, W_next)
    gram = PairGrams.unshared(W_l, W_next) if gram is None else gram
    product = pair_product(W_l, W_next, exact) if side_l == "cols" else None  # C = W_next W_l when n is large
    norms = (gram.norms("l", exact), gram.norms("next", exact))
    g = gram_pair_values(W_l, W_next, dtype=exact, gram_l=gram.gram("l", side_l, exact),
                         gram_next=gram.gram("next", side_next, exact), product=product, norms=norms)
    cuts: tuple[Optional[GramCut], Optional[GramCut]] = (None, None)
    if side_l == "rows":  # n small: the shared Grams are the hidden-side B and A whose ranks decide the reading
        rtol = (default_rtol(W_l, storage_eps), default_rtol(W_next, storage_eps))
        cuts = (gram.cut("l", side_l, exact, rtol[0], None), gram.cut("next", side_next, exact, rtol[1], None))
    reads = commutator_reading_of_pairs(W_l, W_next, storage_eps=storage_eps, cuts=cuts)
    columns = {
        "commutator_ratio": g.commutator_ratio,
        "commutator_ratio_normalized": normalized_commutator_ratio(g.commutator_ratio),
        "commutator_ratio_normalized_baseline": normalized_commutator_ratio(g.commutator_haar_rms),
        "commutator_ratio_baseline": g.commutator_haar_rms, "imbalance_norm": g.imbalance_norm,
        "imbalance_norm_baseline": g.imbalance_haar_rms, "relative_imbalance": g.relative_imbalance,
        "relative_imbalance_baseline": g.relative_imbalance_haar_rms,
        "imbalance_diagonal_norm": imbalance_diagonal_from_norms(*norms),
    }
    h = host_columns(columns)
    return [({m: col[i] for m, col in h.items()}, {KAPPA_READS: reads[i]}) for i in range(W_l.shape[0])]


class PairGrams:
    """The Grams of a pair's two weights (:func:`~hf_flag.geometry.pairs.weight_gram`) and their rank cuts with
    Cholesky factors (:func:`~hf_flag.geometry.pairs.gram_cut`), from ``cache`` or computed once and stored there
    (MATH.md §1, §3): key ``keys[which] + ("gram", side, dtype)`` resp. ``+ ("cut", side, dtype, rtol)``, ``which``
    ``"l"`` or ``"next"``; ``weights[which]()`` gives that weight (bias-augmented, batched) when it is needed."""

    def __init__(self, cache: dict, keys: dict[str, tuple], weights: dict[str, Callable[[], torch.Tensor]]):
        self.cache, self.keys, self.weights = cache, keys, weights

    @classmethod
    def unshared(cls, W_l: torch.Tensor, W_next: torch.Tensor) -> "PairGrams":
        """Grams of one pair ``W_l``, ``W_next`` (bias-augmented, batched) that no other pair shares."""
        return cls({}, {"l": ("l",), "next": ("next",)}, {"l": lambda: W_l, "next": lambda: W_next})

    def gram(self, which: str, side: str, dtype: torch.dtype) -> torch.Tensor:
        key = self.keys[which] + ("gram", side, dtype)
        if key not in self.cache:
            self.cache[key] = weight_gram(self.weights[which](), side, dtype=dtype)
        return self.cache[key]

    def norms(self, which: str, dtype: torch.dtype) -> WeightNorms:
        """The weight's squared row, column and Frobenius norms in ``dtype``
        (:func:`~hf_flag.geometry.pairs.weight_norms`), cached: kappa's Haar RMS and ``||diag D||`` of every pair
        the weight belongs to read them."""
        key = self.keys[which] + ("norms", dtype)
        if key not in self.cache:
            self.cache[key] = weight_norms(self.weights[which](), dtype)
        return self.cache[key]

    def eigh(self, which: str, side: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``torch.linalg.eigh`` of :meth:`gram`, cached: a window SVD on the small Gram
        (:func:`~hf_flag.geometry.spectral.partial_svd`) and range_overlap's kept eigenvectors share it."""
        key = self.keys[which] + ("eigh", side, dtype)
        if key not in self.cache:
            self.cache[key] = torch.linalg.eigh(self.gram(which, side, dtype))
        return self.cache[key]

    def cached_eigh(self, which: str, side: str, dtype: torch.dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`eigh` when it is already in the cache, else ``None``."""
        return self.cache.get(self.keys[which] + ("eigh", side, dtype))

    def decided(self, which: str, side: str, dtype: torch.dtype, rtol: float, top: Optional[torch.Tensor]
                ) -> tuple[GramCut, torch.Tensor]:
        """``(cut, G)``: :func:`~hf_flag.geometry.pairs.gram_cut` of :meth:`gram` at ``rtol`` (``top`` the
        weight's ``sigma_1`` when known), and the Gram it was decided on: the float64 Gram where ``dtype`` leaves
        it unresolved (as :func:`~hf_flag.geometry.pairs.resolved_gram_cut`)."""
        key = self.keys[which] + ("cut", side, dtype, rtol, top is None)
        if key not in self.cache:
            G = self.gram(which, side, dtype)
            cut = gram_cut(G, rtol, top=top)
            if not cut.resolved:  # decided again on the float64 Gram (the weight is read only then)
                G = weight_gram(self.weights[which](), side, dtype=torch.float64)
                cut = gram_cut(G, rtol, top=top)
            self.cache[key] = cut, G
        return self.cache[key]

    def cut(self, which: str, side: str, dtype: torch.dtype, rtol: float, top: Optional[torch.Tensor]) -> GramCut:
        """The cut of :meth:`decided`."""
        return self.decided(which, side, dtype, rtol, top)[0]


def pair_rows(model: str, kind: str, ids: Sequence[tuple[int, int, str, str]], W_l: torch.Tensor,
              b_l: Optional[torch.Tensor], W_next: torch.Tensor, *, activation: str, cheap: bool,
              storage_eps: float, svd_l=None, svd_next=None, window: bool = False,
              gram: Optional[PairGrams] = None) -> list[Row]:
    """Rows ``[W_l | b_l]`` -> ``W_next`` for a batch (leading dim) of pairs; ``ids``: (layer, target_layer,
    source, target) per batch member; ``svd_l``, ``svd_next``: SVDs of ``[W_l | b_l]`` and ``W_next`` when
    cached (``weight_svd``: thin, or partial with ``window``).  ``window``: the default report's values on the
    storage-precision windows (:func:`pair_window_values`), in the weights' dtype, with ``gram`` the pair's shared
    Grams.  Whether kappa reads (``commutator_reading_holds``,
    :func:`~hf_flag.geometry.pairs.commutator_reading_of_pairs`) is decided at the rank cut of the storage
    precision ``storage_eps``.  See :mod:`hf_flag.analysis.api` for the values."""
    W_aug = augment(W_l, b_l)
    if window and not cheap:
        svd_l = window_svd(W_aug, storage_eps) if svd_l is None else svd_l
        svd_next = window_svd(W_next, storage_eps) if svd_next is None else svd_next
        out = pair_window_values(W_aug, W_next, storage_eps=storage_eps, dtype=W_l.dtype, svd_l=svd_l,
                                 svd_next=svd_next, gram=gram)
        return [Row(model, kind, *i, values, {**details, "activation": activation}) for i, (values, details) in
                zip(ids, out)]
    if cheap:
        return [Row(model, kind, *i, values, {**details, "activation": activation}) for i, (values, details) in
                zip(ids, gram_values(W_aug, W_next, storage_eps=storage_eps, gram=gram))]
    # full: one thin SVD per weight serves the values and the reading's ranks
    svd_l = thin_svd(W_aug) if svd_l is None else svd_l
    svd_next = thin_svd(W_next) if svd_next is None else svd_next
    out = pair_geometry_values(W_aug, W_next, storage_eps=storage_eps, svd_l=svd_l, svd_next=svd_next)
    reads = commutator_reading_of_pairs(W_aug, W_next, storage_eps=storage_eps, s_l=svd_l[1], s_next=svd_next[1])
    return [Row(model, kind, *i, values, {**details, "activation": activation, KAPPA_READS: r})
            for i, (values, details), r in zip(ids, out, reads)]


def single(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A single pair's bias with the batch dim of :func:`pair_rows` added."""
    return None if bias is None else bias[None]


def window_svd(W: torch.Tensor, storage_eps: float, gram: Optional[torch.Tensor] = None,
               gram_eigh: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> PartialSVD:
    """The storage-precision window of ``W`` (..., rows, cols), in ``W``'s dtype
    (:func:`~hf_flag.geometry.spectral.partial_svd`): ``K_MAX + 1`` leading singular values (one closes the last
    cut), the window's triplets with vectors and residuals.  ``gram``: ``W``'s small Gram (``W W^T`` when
    ``rows <= cols``, else ``W^T W``; :func:`~hf_flag.geometry.pairs.weight_gram`) when it is shared with kappa's
    Gram factors; ``gram_eigh``: its eigendecomposition, when shared with range_overlap."""
    return certified_partial_svd(W, min(K_MAX + 1, min(W.shape[-2:])), dtype=W.dtype, storage_eps=storage_eps,
                                 gram=gram, gram_eigh=gram_eigh)


def small_gram_side(W: torch.Tensor) -> str:
    """The side (:func:`~hf_flag.geometry.pairs.weight_gram`) of ``W``'s small Gram, the one
    :func:`window_svd` takes: ``"rows"`` when ``rows <= cols``, else ``"cols"``."""
    return "rows" if W.shape[-2] <= W.shape[-1] else "cols"


def pair_window_values(W_l: torch.Tensor, W_next: torch.Tensor, *, storage_eps: float, dtype: torch.dtype,
                       svd_l, svd_next, gram: Optional[PairGrams] = None) -> list[tuple[dict, dict]]:
    """(values, details) of a batch of default-report pair rows (``W_l`` (B, n, k) bias-augmented, ``W_next``
    (B, m, n)) from the leading windows of both weights (:mod:`hf_flag.geometry.spectral`, MATH.md §2-§4).

    ``svd_l``, ``svd_next``: :class:`~hf_flag.geometry.spectral.PartialSVD` of the two weights.  Kappa, its Haar
    RMS and the imbalance norms are exact (Gram factors, :func:`~hf_flag.geometry.pairs.gram_pair_values`, in
    :func:`~hf_flag.geometry.spectral.gram_dtype`); transport scores on the largest cut read on both sides
    (:func:`~hf_flag.geometry.spectral.read_cuts`: determined by the storage and resolved by the computation;
    ``None`` when there is none; the basis score also ``None`` unless every cut up to it is read); flags cut inside
    the windows (the last cut read); details ``tolerance``: per windowed value, its bound from exact singular
    vectors' value (:func:`~hf_flag.geometry.spectral.transport_tolerances`,
    :func:`~hf_flag.geometry.spectral.soft_tolerance`).  The certificate: ``window_in`` / ``window_out``
    (singular vectors used) and ``svd_residual_in`` / ``svd_residual_out`` (largest relative residual of the
    triplets used).  The GL kernel
    dimension needs whole spectra: ``None`` here (``full=True`` computes it).  ``range_overlap`` (with its
    baseline) comes from the shared Grams (:func:`~hf_flag.geometry.pairs.range_overlap_from_grams`) on the
    pairs where kappa does not read: the low-rank pairs (both weights' shorter sides below n: the MLP pairs) and
    every other pair whose two weights are both below rank n at the storage cut (n small, or one weight's shorter
    side n and that weight rank-deficient); ``None`` where kappa reads
    (``full=True`` computes it everywhere).  Rank cuts (range_overlap, flags, the reading
    ``commutator_reading_holds`` in the details) at the storage precision (MATH.md §1,
    :func:`~hf_flag.geometry.angles.default_rtol` with ``storage_eps``); the Grams' cuts
    (:func:`~hf_flag.geometry.pairs.gram_cut`) take ``lambda_max = sigma_1^2`` from the partial SVDs.  ``gram``:
    the pair's shared Grams and cuts (:class:`PairGrams`), or ``None`` to compute them here."""
    exact = gram_dtype(storage_eps, dtype)
    side_l, side_next = pair_gram_sides(W_l, W_next)
    gram = PairGrams.unshared(W_l, W_next) if gram is None else gram
    shared = (gram.gram("l", side_l, exact), gram.gram("next", side_next, exact))
    product = pair_product(W_l, W_next, exact) if side_l == "cols" else None  # C = W_next W_l when n is large
    norms = (gram.norms("l", exact), gram.norms("next", exact))
    g = gram_pair_values(W_l, W_next, dtype=exact, gram_l=shared[0], gram_next=shared[1], product=product,
                         norms=norms)
    diagonal = imbalance_diagonal_from_norms(*norms)
    n = W_l.shape[-2]
    rank_rtol = (default_rtol(W_l, storage_eps), default_rtol(W_next, storage_eps))
    tops = (svd_l.s[..., 0], svd_next.s[..., 0])
    # cuts read: determined by the storage and computed to the same angle (MATH.md §4, spectral.read_cuts)
    bounds_l, bounds_n = svd_l.computation_bounds(), svd_next.computation_bounds()
    det_l, det_n = (p.read_cuts(storage_eps=storage_eps, bounds=b)
                    for p, b in ((svd_l, bounds_l), (svd_next, bounds_n)))
    w_l, w_n = last_cut(det_l), last_cut(det_n)
    cert_l, cert_n = svd_l.certificate(w_l), svd_next.certificate(w_n)
    T = svd_next.Vh.to(torch.float64) @ svd_l.U.to(torch.float64)  # one side may have been recomputed in float64
    both: Optional[tuple[list, list]] = None  # (range_overlap, baseline) where some pair is not read by kappa
    cut_next = None
    if side_l == "rows":  # n small: the shared Grams are the hidden-side B = W_l W_l^T, A = W_next^T W_next
        cut_l = gram.cut("l", side_l, exact, rank_rtol[0], tops[0])
        if not bool(cut_l.full.all()):
            cut_next = gram.cut("next", side_next, exact, rank_rtol[1], tops[1])
        reads = commutator_reading_of_pairs(W_l, W_next, storage_eps=storage_eps, cuts=(cut_l, cut_next))
        if not all(reads):  # both weights below rank n at the storage cut: the range overlap reads instead (§3)
            (cut_l, g_l), (cut_next, g_next) = (gram.decided("l", side_l, exact, rank_rtol[0], tops[0]),
                                                gram.decided("next", side_next, exact, rank_rtol[1], tops[1]))
            eighs = tuple(None if bool(cut.full.all()) or G.dtype != exact else gram.eigh(which, side, exact)
                          for cut, G, which, side in ((cut_l, g_l, "l", side_l), (cut_next, g_next, "next", side_next)))
            both = tuple(v.tolist() for v in range_overlap_from_grams(
                W_l, W_next, rtol=rank_rtol, gram_l=g_l, gram_next=g_next, cuts=(cut_l, cut_next), eighs=eighs))
    else:  # n large (above an outer dim): the shared Grams are G_Q = W_l^T W_l and G_P = W_next W_next^T
        # Only a weight whose shorter side is n can have rank n (none in the low-rank pairs, the MLP pairs: nothing
        # is computed for them); where neither has it, kappa does not read and the range overlap does (§3).
        reads = commutator_reading_of_pairs(W_l, W_next, storage_eps=storage_eps)
        if not all(reads):
            cut_l, g_l = gram.decided("l", side_l, exact, rank_rtol[0], tops[0])
            cut_next, g_next = gram.decided("next", side_next, exact, rank_rtol[1], tops[1])
            both = tuple(v.tolist() for v in range_overlap_from_grams(
                W_l, W_next, rtol=rank_rtol, gram_l=g_l, gram_next=g_next, product=product,
                cuts=(cut_l, cut_next), eighs=(gram.cached_eigh("l", side_l, exact),
                                               gram.cached_eigh("next", side_next, exact))))
    overlap = tuple([None if r or both is None else v for v, r in zip(column, reads)]
                    for column in (both or ([None] * len(reads), [None] * len(reads))))
    h = host_columns({**kappa_columns(g, diagonal), "window_in": w_l, "window_out": w_n, "svd_residual_in": cert_l,
                      "svd_residual_out": cert_n})
    # scores and flags per pair on host copies (one transfer per factor and batch)
    (U, s_l, _), (_, s_next, Vh), T = host(svd_l), host(svd_next), T.cpu()
    det_l, det_n, bounds_l, bounds_n = det_l.cpu(), det_n.cpu(), bounds_l.cpu(), bounds_n.cpu()
    out = []
    for i in range(W_l.shape[0]):
        a, b = int(h["window_in"][i]), int(h["window_out"][i])
        k, basis_ok = transport_window(det_l[i], det_n[i], n)
        scores = {"subspace_score": None, "subspace_score_baseline": None, "basis_score": None,
                  "basis_score_baseline": None}
        tolerance: dict[str, float] = {}  # |value - exact singular vectors' value| bounds (spectral.py)
        if k:
            sub_base, basis_base = transport_baselines(k, n)
            T_k = T[i, :k, :k]
            scores.update(subspace_score=float(T_k.square().sum()) / k, subspace_score_baseline=sub_base)
            tolerance["subspace_score"], basis_tolerance = transport_tolerances(bounds_l[i], bounds_n[i], k)
            if basis_ok:
                scores.update(basis_score=float(torch.diagonal(T_k).square().sum()) / k,
                              basis_score_baseline=basis_base)
                tolerance["basis_score"] = basis_tolerance
        flag = flag_position_from_svd(U[i, :, :a], _closed(s_l[i], a), Vh[i, :b], _closed(s_next[i], b), n=n,
                                      rank_rtol=rank_rtol, storage_eps=storage_eps, transport=T[i, :b, :a],
                                      truncated=True)
        values = {**kappa_values(h, i), **scores, **flag_values(flag),
                  "range_overlap": overlap[0][i], "range_overlap_baseline": overlap[1][i],
                  "gl_kernel_dim": None, "gl_kernel_dim_baseline": None,
                  **{m: h[m][i] for m in ("window_in", "window_out", "svd_residual_in", "svd_residual_out")}}
        if flag.intersection_cut is not None:
            tolerance["intersection_soft"] = soft_tolerance(bounds_l[i], bounds_n[i], flag.intersection_cut)
        out.append((values, {"transport_k": k, **flag_details(flag), KAPPA_READS: reads[i],
                             "tolerance": tolerance}))
    return out


def _closed(s: torch.Tensor, w: int) -> torch.Tensor:
    """``sigma_1 .. sigma_{w+1}`` of one batch member's leading values ``s`` (``sigma_{w+1} = 0`` past an
    exhausted spectrum)."""
    s = s[: w + 1]
    return s if s.numel() == w + 1 else torch.cat([s, s.new_zeros(w + 1 - s.numel())])
