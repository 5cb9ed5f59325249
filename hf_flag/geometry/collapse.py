"""Neural Collapse NC1-NC4 and the Level-2 / Level-3 alignment of a classifier with its class means (MATH.md §5).

Shapes: ``features`` (N, p), ``labels`` (N,) integers in [0, C), ``classifier`` W (C, p) (``nn.Linear``),
``class_means`` (C, p).  MATH.md's ``M`` is the p x C matrix of centred means ``[mu_c - mu_G]``.

Metric names follow the reference implementation rhubarbwu/neural-collapse (``neural_collapse.measure``):

=====================================  =====================================================================
key                                    meaning (reference function)
=====================================  =====================================================================
``nc1_covariance_pinv``                ``tr(Sigma_W Sigma_B^+) / C``, MATH.md §5 (``covariance_pinv``; the
                                       reference divides ``M^T M`` by the feature dim, we use ``Sigma_B =
                                       M M^T / C`` as MATH.md and Papyan et al. do)
``nc1_covariance_ratio``               ``tr Sigma_W / tr Sigma_B`` (``covariance_ratio``)
``nc1_variability_cdnv``               mean over class pairs of ``(V_c + V_c') / (2 ||mu_c - mu_c'||^2)``,
                                       ``V_c`` the mean squared distance to ``mu_c`` (``variability_cdnv``)
``nc2_mean_norms_cv``                  equinorm: std / mean of ``||mu_c - mu_G||`` (``mean_norms``)
``nc2_interference_std``               equiangularity: std of the pairwise cosines (``interference_grid``)
``nc2_interference_error``             mean ``|cos + 1/(C-1)|`` over class pairs
``nc2_simplex_etf_error``              ``||M^T M / ||.||_F - (I - 11^T/C)/sqrt(C-1)||_F`` (``simplex_etf_error``)
``nc2_classifier_*``                   the four quantities above for the classifier rows (weight-only)
``nc3_self_duality``                   ``||W^T/||W||_F - M/||M||_F||_F^2`` (MATH.md §5, Papyan's NC3)
``nc3_self_duality_error``             ``||W M / ||W M||_F - (I - 11^T/C)/sqrt(C-1)||_F`` (``self_duality_error``)
``nc4_clf_ncc_agreement``              fraction of samples where argmax(W h + b) = nearest class mean
                                       (``clf_ncc_agreement``; MATH.md's NC4 mismatch is 1 minus this)
=====================================  =====================================================================

Standard deviations are population ones (divide by the count).  A class mean equal to the global mean (or a zero
classifier row) makes the cosines undefined and raises ``ValueError``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from hf_flag.geometry.angles import check_dtype, check_matrix, orthonormal_basis, principal_angles, subspace_overlap
from hf_flag.geometry.baselines import overlap_baseline
from hf_flag.geometry.pairs import commutator_ratio, transport_scores


def _rows(name: str, X: torch.Tensor, where: str, dtype: torch.dtype, cols: Optional[int] = None) -> torch.Tensor:
    check_matrix(name, X, where=where)
    check_dtype(dtype, where=where)
    if X.ndim != 2 or (cols is not None and X.shape[1] != cols):
        raise ValueError(f"{where}: {name} must have shape (rows, {cols if cols is not None else 'p'}); "
                         f"got {tuple(X.shape)}")
    return X.to(dtype)


def _pair_mask(C: int, device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(C, C, dtype=torch.bool, device=device), diagonal=1)


def _etf_error(G: torch.Tensor) -> torch.Tensor:
    """``||G/||G||_F - (I - 11^T/C)/sqrt(C-1)||_F`` for a C x C cross-Gram ``G`` (MATH.md §5, NC2 matrix form)."""
    C = G.shape[-1]
    ideal = (torch.eye(C, dtype=G.dtype, device=G.device) - 1.0 / C) / math.sqrt(C - 1)
    return torch.linalg.matrix_norm(G / torch.linalg.matrix_norm(G) - ideal)


def _frame_geometry(X: torch.Tensor, name: str, where: str) -> dict[str, float]:
    """Equinorm, equiangularity and simplex-ETF error of the rows of ``X`` (C, p) (MATH.md §5, NC2)."""
    C = X.shape[0]
    norms = torch.linalg.vector_norm(X, dim=1)
    if bool((norms == 0).any()):
        raise ValueError(f"{where}: {name} has a zero row (class {int((norms == 0).nonzero()[0])}); "
                         f"its angles are undefined, drop that class")
    cos = ((X / norms[:, None]) @ (X / norms[:, None]).T)[_pair_mask(C, X.device)]
    return {
        "norms_cv": float(norms.std(correction=0) / norms.mean()),
        "interference_std": float(cos.std(correction=0)),
        "interference_error": float((cos + 1.0 / (C - 1)).abs().mean()),
        "etf_error": float(_etf_error(X @ X.T)),
    }


def classifier_collapse(classifier: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """Weight-only NC2 of a classifier W (C, p): equinorm, equiangularity and ETF error of its rows (MATH.md §5).

    Keys ``nc2_classifier_norms_cv``, ``nc2_classifier_interference_std``, ``nc2_classifier_interference_error``,
    ``nc2_classifier_etf_error``; rows are taken as they are (not centred), as in Papyan et al.
    """
    W = _rows("classifier", classifier, "classifier_collapse", dtype)
    if W.shape[0] < 2:
        raise ValueError(f"classifier_collapse: classifier {tuple(W.shape)} needs at least 2 classes (rows)")
    return {f"nc2_classifier_{k}": v for k, v in _frame_geometry(W, "classifier", "classifier_collapse").items()}


def _class_means(H: torch.Tensor, labels: torch.Tensor, n_classes: Optional[int], where: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(means (C, p), counts (C,), labels on H's device)`` of validated features ``H`` (N, p) (MATH.md §5)."""
    N = H.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.shape != (N,) or labels.is_floating_point():
        raise ValueError(f"{where}: labels must be an integer tensor of shape ({N},) matching features "
                         f"{tuple(H.shape)}; got {_describe(labels)}")
    if N == 0:
        raise ValueError(f"{where}: features {tuple(H.shape)} has no samples; pass at least one sample per class")
    if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, int)):
        raise ValueError(f"{where}: n_classes={n_classes!r} must be an int (the number of classes C) or None")
    labels = labels.to(H.device)
    C = int(labels.max()) + 1 if n_classes is None else n_classes
    if int(labels.min()) < 0 or int(labels.max()) >= C or C < 2:
        raise ValueError(f"{where}: labels must lie in [0, C) with C >= 2 classes; got range "
                         f"[{int(labels.min())}, {int(labels.max())}] and C = {C}")
    counts = torch.bincount(labels, minlength=C).to(H.dtype)
    if bool((counts == 0).any()):
        raise ValueError(f"{where}: class {int((counts == 0).nonzero()[0])} has no sample; pass n_classes or "
                         f"relabel so that every class in [0, C) occurs")
    means = torch.zeros(C, H.shape[1], dtype=H.dtype, device=H.device).index_add_(0, labels, H) / counts[:, None]
    return means, counts, labels


def class_means(features: torch.Tensor, labels: torch.Tensor, *, n_classes: Optional[int] = None,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Class means ``mu_c`` (C, p) of ``features`` (N, p) with integer ``labels`` in ``[0, C)`` (MATH.md §5), the
    ones :func:`neural_collapse` uses; pass them with ``features.mean(0)`` as ``global_mean`` to
    :func:`level2_alignment` / :func:`level3_alignment`.  Same label rules and errors as :func:`neural_collapse`."""
    return _class_means(_rows("features", features, "class_means", dtype), labels, n_classes, "class_means")[0]


def neural_collapse(
    features: torch.Tensor, labels: torch.Tensor, classifier: Optional[torch.Tensor] = None, *,
    classifier_bias: Optional[torch.Tensor] = None, n_classes: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """NC1-NC4 from penultimate features (MATH.md §5); keys in the module docstring.

    ``labels`` are ints in ``[0, C)`` with ``C = n_classes`` (default ``max(labels) + 1``); every class needs a
    sample.  ``mu_G`` is the mean of all samples, ``Sigma_W`` the within-class scatter divided by N.  NC1 uses
    the thin SVD of the p x C matrix ``M`` (rank ``<= C - 1``, see :func:`_mean_span`), never a p x p pseudo-inverse:
    ``tr(Sigma_W Sigma_B^+)/C = sum_j ||Z u_j||^2 / (N s_j^2)`` with ``Z`` the within-class residuals.
    Classifier-side keys (NC2 of W, NC3, NC4) only when ``classifier`` is given.
    """
    where = "neural_collapse"
    H = _rows("features", features, where, dtype)
    N, p = H.shape
    means, counts, labels = _class_means(H, labels, n_classes, where)
    C = means.shape[0]
    Mr = means - H.mean(dim=0)  # centred means, rows (C, p) = M^T
    Z = H - means[labels]  # within-class residuals

    U, s = _mean_span(Mr)
    nc1 = ((Z @ U).square().sum(0) / s.square()).sum() / N
    V_c = torch.zeros(C, dtype=dtype, device=H.device).index_add_(0, labels, Z.square().sum(1)) / counts
    pairs = _pair_mask(C, H.device)
    cdnv = ((V_c[:, None] + V_c[None, :]) / 2 / torch.cdist(means, means).square())[pairs].mean()
    out = {
        "nc1_covariance_pinv": float(nc1),
        "nc1_covariance_ratio": float((Z.square().sum() / N) / (Mr.square().sum() / C)),
        "nc1_variability_cdnv": float(cdnv),
    }
    geo = _frame_geometry(Mr, "centred class means", where)
    out.update({"nc2_mean_norms_cv": geo["norms_cv"], "nc2_interference_std": geo["interference_std"],
                "nc2_interference_error": geo["interference_error"], "nc2_simplex_etf_error": geo["etf_error"]})
    if classifier is None:
        return out
    W = _rows("classifier", classifier, where, dtype, cols=p).to(H.device)
    if W.shape[0] != C:
        raise ValueError(f"{where}: classifier {tuple(W.shape)} must have C = {C} rows (one per class)")
    b = torch.zeros(C, dtype=dtype, device=H.device) if classifier_bias is None else classifier_bias
    if not isinstance(b, torch.Tensor) or b.shape != (C,) or not bool(torch.isfinite(b).all()):
        raise ValueError(f"{where}: classifier_bias must be a finite tensor of shape ({C},); got {_describe(b)}")
    out.update(classifier_collapse(W, dtype=dtype))
    out["nc3_self_duality"] = float(_self_duality(W, Mr))
    out["nc3_self_duality_error"] = float(_etf_error(W @ Mr.T))
    ncc = torch.cdist(H, means).argmin(dim=1)
    clf = (H @ W.T + b.to(device=H.device, dtype=dtype)).argmax(dim=1)
    out["nc4_clf_ncc_agreement"] = float((ncc == clf).to(dtype).mean())
    return out


def _describe(x: object) -> object:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _self_duality(W: torch.Tensor, Mr: torch.Tensor) -> torch.Tensor:
    """NC3 ``||W^T/||W||_F - M/||M||_F||_F^2`` with ``Mr = M^T`` (MATH.md §5)."""
    return torch.linalg.matrix_norm(W / torch.linalg.matrix_norm(W) - Mr / torch.linalg.matrix_norm(Mr)).square()


def _mean_span(Mr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis (p x r) of span(M) and its singular values, ``r <= C - 1`` (MATH.md §5).

    Centred means satisfy a (weighted) linear relation, so ``rank M <= C - 1`` holds by construction; the C-th
    singular value is rounding noise from the centring (it scales with ``||mu_G||``, not ``||M||``) and is always
    dropped.  The others are kept when ``s > s_max * max(p, C) * eps`` (MATH.md §1 rank cut).
    """
    U, s, _ = torch.linalg.svd(Mr.T, full_matrices=False)
    r = min(Mr.shape[0] - 1, s.shape[0])
    keep = s[:r] > s[0] * max(Mr.shape) * torch.finfo(s.dtype).eps
    return U[:, :r][:, keep], s[:r][keep]


def _centred_pair(
    classifier: torch.Tensor, class_means: torch.Tensor, global_mean: Optional[torch.Tensor], where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, M^T)`` in float64: ``M^T`` = class means minus ``global_mean`` (default: the mean of the means)."""
    W = _rows("classifier", classifier, where, torch.float64)
    means = _rows("class_means", class_means, where, torch.float64, cols=W.shape[1]).to(W.device)
    if means.shape[0] != W.shape[0] or W.shape[0] < 2:
        raise ValueError(f"{where}: classifier {tuple(W.shape)} and class_means {tuple(means.shape)} need the same "
                         f"number C >= 2 of rows")
    if global_mean is None:
        mu = means.mean(dim=0)
    elif not isinstance(global_mean, torch.Tensor) or global_mean.is_complex() or \
            global_mean.shape != (W.shape[1],) or not bool(torch.isfinite(global_mean).all()):
        raise ValueError(f"{where}: global_mean must be a real finite tensor of shape ({W.shape[1]},); got "
                         f"{_describe(global_mean)}")
    else:
        mu = global_mean.to(device=W.device, dtype=torch.float64)
    return W, means - mu


def level2_alignment(
    classifier: torch.Tensor, class_means: torch.Tensor, *, global_mean: Optional[torch.Tensor] = None
) -> dict[str, float]:
    """Level-2 (subspace) alignment of ``col(W^T)`` with ``span(M)`` (MATH.md §5, §1).

    ``level2_subspace_error = 1 - ||P_{W^T} P_M||_F^2 / min(rank W, rank M)`` (= ``/(C-1)`` for C-1 independent
    centred means; 0 when aligned; ``rank M <= C - 1`` enforced as in NC1) and ``level2_max_angle``, the
    largest principal angle (radians, sine/cosine pairing, so ~1e-15 for aligned spans).  ``M`` = class means
    minus ``global_mean`` (default: their average, which is ``mu_G`` for balanced classes).
    ``level2_subspace_error_baseline``: its Haar value ``1 - max(rank W, rank M) / p`` (MATH.md §5, §1), e.g.
    ``1 - 10/64`` for a rank-10 classifier in p = 64.
    """
    W, Mr = _centred_pair(classifier, class_means, global_mean, "level2_alignment")
    QW, QM = orthonormal_basis(W.T), _mean_span(Mr)[0]
    angles = principal_angles(QW, QM, orthonormal=True)
    return {
        "level2_subspace_error": float(1.0 - subspace_overlap(QW, QM, orthonormal=True)),
        "level2_max_angle": float(angles.max()) if angles.numel() else math.pi / 2,
        "level2_subspace_error_baseline": 1.0 - overlap_baseline(QW.shape[-1], QM.shape[-1], W.shape[1]),
    }


def level3_alignment(
    classifier: torch.Tensor, class_means: torch.Tensor, *, global_mean: Optional[torch.Tensor] = None
) -> dict[str, float]:
    """Level-3 (basis) alignment of W (C, p) with M (MATH.md §5, §4).

    ``nc3_self_duality`` (0 iff ``W^T`` is a positive multiple of ``M``); ``level3_basis_score`` and
    ``level3_subspace_score``: the transport scores (MATH.md §4) of the pair ``W_l = M`` (p x C),
    ``W_next = W`` with ``k = rank M``; ``kappa``: the commutator ratio of that pair (MATH.md §3).  With a
    degenerate spectrum (a simplex ETF) kappa is 0 and the basis score depends on an arbitrary choice of singular
    vectors: only the self-duality then measures Level 3.
    """
    W, Mr = _centred_pair(classifier, class_means, global_mean, "level3_alignment")
    k = max(1, _mean_span(Mr)[1].numel())
    subspace, basis = transport_scores(Mr.T, W, k)
    return {
        "nc3_self_duality": float(_self_duality(W, Mr)),
        "level3_basis_score": float(basis),
        "level3_subspace_score": float(subspace),
        "kappa": float(commutator_ratio(Mr.T, W)),
    }


def alignment_baselines(
    classifier: torch.Tensor, class_means: torch.Tensor, *, global_mean: Optional[torch.Tensor] = None
) -> dict[str, float]:
    """Haar-null values of the classifier-vs-class-means keys: what W rotated by a Haar-random ``O`` in O(p)
    (``W -> W O``, its spectrum kept, its alignment with ``M`` destroyed) gives (MATH.md §1, §3, §4, §5).

    ``nc3_self_duality_baseline = 2`` (``E<W O, M^T> = 0`` as ``E O = 0``, both terms unit norm);
    ``level2_subspace_error_baseline = 1 - max(rank W, rank M) / p`` (``baselines.overlap_baseline``);
    ``level3_subspace_score_baseline = k / p`` and ``level3_basis_score_baseline = 1 / p`` with ``k = rank M``
    (``baselines.transport_baselines``); ``level3_kappa_baseline`` = ``pairs.commutator_baseline`` of the pair
    ``(M, W)`` (closed-form root mean square).  Means, except kappa's root mean square; exact, no sampling.
    ``level2_max_angle``, ``nc3_self_duality_error`` and the feature-only keys (NC1, NC2, NC4) have no
    closed-form Haar value here: their reference is the collapsed value (0; 1 for NC4).
    """
    from hf_flag.geometry.baselines import overlap_baseline, transport_baselines
    from hf_flag.geometry.pairs import commutator_baseline

    W, Mr = _centred_pair(classifier, class_means, global_mean, "alignment_baselines")
    p = W.shape[1]
    rank_m = _mean_span(Mr)[1].numel()
    subspace, basis = transport_baselines(max(1, rank_m), p)
    return {
        "nc3_self_duality_baseline": 2.0,
        "level2_subspace_error_baseline": 1.0 - overlap_baseline(orthonormal_basis(W.T).shape[-1], rank_m, p),
        "level3_subspace_score_baseline": subspace,
        "level3_basis_score_baseline": basis,
        "level3_kappa_baseline": float(commutator_baseline(Mr.T, W)),
    }
