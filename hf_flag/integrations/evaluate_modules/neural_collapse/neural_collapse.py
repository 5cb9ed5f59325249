"""neural_collapse: NC1-NC4 and the Level-2 / Level-3 alignment as an ``evaluate`` metric (MATH.md §5).

No mathematics here: the values are those of :mod:`hf_flag.geometry.collapse` (``neural_collapse``,
``classifier_collapse``, ``class_means``, ``level2_alignment``, ``level3_alignment``, and ``alignment_baselines``
for the ``_baseline`` keys); this module converts inputs and merges dicts.
"""
from __future__ import annotations

from typing import Any, Optional

import datasets
import evaluate
import numpy as np
import torch

from hf_flag.errors import InputError
from hf_flag.integrations.evaluate_modules._common import CITATION, has_pending_inputs

_DESCRIPTION = """\
Neural Collapse (Papyan, Han & Donoho 2020) of penultimate-layer features and a linear classifier: NC1 (within-class
variability collapse), NC2 (class means and classifier rows form a simplex ETF), NC3 (self-duality of classifier and
class means), NC4 (the classifier agrees with the nearest class mean), with the metric names of the reference
implementation rhubarbwu/neural-collapse, plus the Level-2 (subspace) and Level-3 (basis) alignment of the classifier
with the class means. A weight-only mode takes the classifier alone (no features).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): penultimate features, one vector of length p per sample.
    references (`list` of `int`): class labels in [0, C); every class must occur.
    classifier (array-like (C, p), optional, compute kwarg): last-layer weight, nn.Linear layout.
    bias (array-like (C,), optional, compute kwarg): last-layer bias (used by NC4).
    class_means (array-like (C, p), optional, compute kwarg): weight-only mode only, for Level-2/3.
    global_mean (array-like (p,), optional, compute kwarg): weight-only mode only (default: mean of class_means).
    n_classes (`int`, optional): C when it exceeds max(references) + 1 (then every class must still occur).
Returns:
    Feature mode: nc1_covariance_pinv, nc1_covariance_ratio, nc1_variability_cdnv, nc2_mean_norms_cv,
    nc2_interference_std, nc2_interference_error, nc2_simplex_etf_error; with a classifier also nc2_classifier_*,
    nc3_self_duality, nc3_self_duality_error, nc4_clf_ncc_agreement, level2_subspace_error, level2_max_angle,
    level3_basis_score, level3_subspace_score, level3_kappa.
    Weight-only mode (classifier, no predictions): nc2_classifier_*; with class_means also the level2_/level3_ keys
    and nc3_self_duality.
    Baselines: nc3_self_duality, level2_subspace_error, level3_subspace_score, level3_basis_score and level3_kappa
    come with `<key>_baseline`, their value for a classifier rotated at random (Haar) against the class means.
    The other keys measure the features or the classifier alone; their reference is the collapsed value (0 for
    NC1, NC2, nc3_self_duality_error and level2_max_angle; 1 for nc4_clf_ncc_agreement), not a random baseline.
Examples:
    >>> import evaluate
    >>> nc = evaluate.load("neural_collapse")  # doctest: +SKIP
    >>> nc.compute(predictions=[[1.0, 0.0], [-1.0, 0.0]], references=[0, 1])["nc1_covariance_pinv"]  # doctest: +SKIP
    0.0
"""


def _tensor(name: str, x: Any, dtype: torch.dtype) -> torch.Tensor:
    """Array-like -> tensor (keeps a tensor's device); ValueError naming ``name`` when it cannot be converted."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    try:
        return torch.as_tensor(np.asarray(x), dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"neural_collapse: {name} must be an array of numbers ({err}); pass a list, numpy array "
                         f"or tensor") from None


def alignment_values(classifier: torch.Tensor, class_means: torch.Tensor,
                     global_mean: Optional[torch.Tensor]) -> dict[str, float]:
    """Level-2 and Level-3 values of ``collapse.level2_alignment`` / ``level3_alignment``, kappa as ``level3_kappa``,
    with the Haar baselines of ``collapse.alignment_baselines``."""
    from hf_flag.geometry.collapse import alignment_baselines, level2_alignment, level3_alignment

    out = dict(level2_alignment(classifier, class_means, global_mean=global_mean))
    level3 = level3_alignment(classifier, class_means, global_mean=global_mean)
    out["level3_kappa"] = level3.pop("kappa")
    out.update(level3)
    out.update(alignment_baselines(classifier, class_means, global_mean=global_mean))
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NeuralCollapse(evaluate.Metric):
    """Neural Collapse NC1-NC4 and Level-2/3 alignment of features and a linear classifier."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://github.com/rhubarbwu/neural-collapse", "https://arxiv.org/abs/2008.08186"],
        )

    def compute(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> Optional[dict]:
        """Feature mode as every metric; ``compute(classifier=W[, class_means=M])`` alone is the weight-only mode."""
        if predictions is None and references is None and not has_pending_inputs(self):
            if kwargs.get("classifier") is None:
                raise InputError("neural_collapse: no input; pass predictions (features) and references (labels), "
                                 "or classifier=W for the weight-only mode")
            return self._compute(predictions=None, references=None, **kwargs)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions: Any = None, references: Any = None, classifier: Any = None, bias: Any = None,
                 class_means: Any = None, global_mean: Any = None, n_classes: Optional[int] = None) -> dict:
        from hf_flag.geometry.collapse import class_means as feature_means  # the argument is class_means
        from hf_flag.geometry.collapse import classifier_collapse, neural_collapse

        W = None if classifier is None else _tensor("classifier", classifier, torch.float64)
        if predictions is None:
            if class_means is None and global_mean is not None:
                raise InputError("neural_collapse: global_mean needs class_means in the weight-only mode")
            out = dict(classifier_collapse(W))
            if class_means is not None:
                gm = None if global_mean is None else _tensor("global_mean", global_mean, torch.float64)
                out.update(alignment_values(W, _tensor("class_means", class_means, torch.float64), gm))
            return out
        if class_means is not None or global_mean is not None:
            raise InputError("neural_collapse: class_means/global_mean are for the weight-only mode; with features "
                             "they are computed from predictions and references")
        H = _tensor("predictions", predictions, torch.float64)
        labels = _tensor("references", references, torch.int64)
        b = None if bias is None else _tensor("bias", bias, torch.float64)
        out = dict(neural_collapse(H, labels, W, classifier_bias=b, n_classes=n_classes))
        if W is not None:
            means = feature_means(H, labels, n_classes=n_classes)
            out.update(alignment_values(W.to(H.device), means, H.mean(dim=0)))
        return out
