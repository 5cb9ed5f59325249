"""The geometry core: pure functions on tensors (MATH.md §1-§6). No I/O, no knowledge of models.

Import from the submodules for the full API; the names below are the ones most users need.
"""
from hf_flag.geometry.angles import (chordal_distance, geodesic_distance, orthonormal_basis, principal_angles,
                                     projection_distance, projection_kernel, subspace_overlap)
from hf_flag.geometry.baselines import (commutator_haar_rms, composition_baseline, intersection_baseline,
                                        overlap_baseline, overlap_zscore, projection_kernel_moments,
                                        transport_baselines)
from hf_flag.geometry.collapse import level2_alignment, level3_alignment, neural_collapse
from hf_flag.geometry.composition import composition_scores
from hf_flag.geometry.dynamics import fit_decay_rate, predicted_decay_rate
from hf_flag.geometry.flags import FlagRelativePosition, flag_relative_position, gl_invariant_kernel_dim
from hf_flag.geometry.heads import head_overlap_baseline, head_overlap_matrix
from hf_flag.geometry.pairs import (commutator_baseline, commutator_ratio, commutator_reading_holds, imbalance,
                                    imbalance_diagonal_norm, imbalance_norm, range_overlap_from_svd,
                                    relative_imbalance, transport_matrix, transport_scores)

__all__ = [
    "chordal_distance", "geodesic_distance", "orthonormal_basis", "principal_angles", "projection_distance",
    "projection_kernel", "subspace_overlap", "commutator_haar_rms", "composition_baseline", "intersection_baseline",
    "overlap_baseline", "overlap_zscore", "projection_kernel_moments", "transport_baselines", "level2_alignment",
    "level3_alignment", "neural_collapse", "composition_scores", "fit_decay_rate", "predicted_decay_rate",
    "FlagRelativePosition", "flag_relative_position", "gl_invariant_kernel_dim", "head_overlap_baseline",
    "head_overlap_matrix",
    "commutator_baseline", "commutator_ratio", "commutator_reading_holds", "range_overlap_from_svd", "imbalance", "imbalance_diagonal_norm", "imbalance_norm",
    "relative_imbalance", "transport_matrix", "transport_scores",
]
