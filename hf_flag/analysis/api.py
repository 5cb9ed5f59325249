"""Source + adapter + geometry -> one :class:`~hf_flag.report.Report` (the only place they meet).

Row kinds (names in :mod:`hf_flag.rows`, which every other part of hf-flag imports them from):

* pair rows, one pair ``W_l`` (n x k) -> ``W_next`` (m x n) sharing the hidden space R^n (MATH.md §2-§4):
  ``"mlp"`` (``mlp_in`` -> ``mlp_out`` through the activation; for a gated MLP ``mlp_in`` is the *up* projection),
  ``"mlp_gate"`` (gate -> ``mlp_out``; gated MLPs (SwiGLU, GeGLU) only), ``"vo"`` (per query head h: ``W_V`` of KV
  head ``kv_head_of(h)`` as a (head_dim x d) ``nn.Linear`` matrix -> ``W_O[h]`` as (d x head_dim); hidden space
  R^head_dim), ``"residual"`` (``mlp_out`` of block l -> ``mlp_in`` of block l+1; hidden space the residual stream),
  ``"linear_chain"`` (consecutive ``nn.Linear`` layers of a plain MLP chain).  A mixture-of-experts block gives
  ``"mlp"`` / ``"mlp_gate"`` rows for each routed expert (source ``"expert e mlp.in"``...) and for the shared
  expert (``"shared_expert mlp.in"``); its router has no row (MATH.md derives no pair for it).
  The first matrix of a pair is bias-augmented, ``[W_l | b_l]`` (MATH.md §2), for every value of the row.
  Values: ``commutator_ratio`` (kappa, §3) and ``commutator_ratio_normalized`` (sqrt 2 kappa in [0, 1]),
  ``imbalance_norm`` ||D||_F, ``relative_imbalance``, ``imbalance_diagonal_norm`` ||diag D||_2 (§2), each but
  ||diag D|| beside ``<metric>_baseline``, its root mean square over Haar rotations of the hidden basis of one
  side (closed forms from the Gram traces: ``geometry.baselines.commutator_haar_rms``, ``imbalance_haar_rms``,
  ``relative_imbalance_haar_rms``; §2, §3); kappa reads as alignment only where
  ``geometry.pairs.commutator_reading_holds`` (§3); unless ``cheap``: ``range_overlap`` (+ ``_baseline``: col(W_l)
  vs row(W_next), the companion for low-rank pairs, §3),
  ``subspace_score`` / ``basis_score`` (+ ``_baseline``; top-k transport window, k = min(k_in, m_out, ceil(n/2)), §4,
  ``intersection_dim`` (+ ``_baseline``, generic), ``intersection_soft`` (+ ``_baseline``, the Haar mean c^2 / n at
  the common cut c), ``flag_tau``, ``gl_kernel_dim`` (+ ``_baseline``, max(0, rank W_l - rank W_next): the value of
  all but at most 1e-3 of Haar rotations, ``None`` where the spectra spread past the cut,
  ``geometry.flags.gl_kernel_dim_generic``) (§4).
  ``intersection_*`` are ``None`` when the two partial flags share no cut below n (e.g. full-rank vo pairs).
  Details: flag cuts, rank matrix, permutation (nonzero entries), is_permutation, transport k, activation.
  ``cheap=True`` gives the pair rows only, with the five cheap values and the baselines of four of them (Gram
  factors, no SVD).
  Default report (``full=False``, issue #11): transformer pair rows read the leading singular subspaces the storage
  precision determines (``geometry.spectral``): transport scores at the largest cut determined on both sides
  (``None`` where there is none; the basis score also needs every cut below it), flags cut inside the windows,
  ``gl_kernel_dim`` and its baseline ``None`` (they need whole spectra), ``range_overlap`` from the Grams on the
  pairs where kappa does not read (MLP pairs, and every other pair whose weights are both below rank n at the
  storage cut; ``None`` where kappa reads), and the certificate ``window_in`` / ``window_out`` (leading
  singular vectors used, at most ``geometry.spectral.K_MAX``) and ``svd_residual_in`` / ``svd_residual_out`` (the
  partial SVD's largest relative residual over them).  A cut is read only where the partial SVD's residuals
  resolve it too (``geometry.spectral.read_cuts``; float32 computations that do not are redone in float64), and
  details ``tolerance`` states, per windowed value, how far it can be from exact singular vectors' value
  (``geometry.spectral.transport_tolerances``, ``soft_tolerance``).  ``full=True`` keeps the all-vectors analysis
  above.
* head rows (§1, §6): ``"head_overlap_q/k/v"`` (read subspaces col(W_*^h) of one layer, h < h'),
  ``"head_overlap_o"`` (write subspaces row(W_O^h)), ``"cross_layer_overlap_q/k/v"`` (write row(W_O^h) of layer l
  vs read col(W_*^h') of layer l+1, every (h, h')).  Grouped-query attention: K and V are compared as the n_kv KV
  heads they are stored as (for ``*_k`` / ``*_v`` kinds h' runs over KV heads).  Values ``overlap``,
  ``overlap_baseline`` (max(p, q)/d), ``overlap_zscore``.
* composition rows (§6, Elhage et al.): ``"composition_q/k/v"``, source head of layer l -> destination head of layer
  l' > l (``composition="all"``) or l' = l + 1 (``"adjacent"``); values ``score``, ``score_baseline`` (1/sqrt d).
  Weights are used as stored: LayerNorm is *not* folded in and weights are not centred (TransformerLens does both).

Embeddings and the LM head are never analysed, so tied embeddings need no special care.  A row belongs to the
shard of its ``layer``: ``layers=[0]`` and ``layers=[1]`` merged give the rows of ``layers=[0, 1]``.

Memory: blocks are read one tensor at a time through the adapter (``adapter.block_tensor_names``: a layer shard
reads only its own blocks, block l+1 and, for composition, later layers' attention); the per-layer pass holds one
block at a time: layer l's rows with layer l+1 are computed once block l+1 is read, from what block l carries (its
down projection, that weight's SVD and Gram, its ``o`` head bases), and each block's tensors are released after
their last row.  Each layer's head bases are computed once (shared by its within-layer rows and layer l-1's
cross-layer rows), as is each MLP weight's SVD (shared by the pairs it belongs to), Gram and squared norms; a
weight whose Grams run in a wider dtype (float32 weights, float64 Grams) is converted a slice at a time
(``geometry.pairs.CONVERT_CHUNK_BYTES``), never whole.  An analysis of weights read
from files fixes glibc's mmap threshold at 4 MiB for the process (``analysis.checks.bound_heap_growth``), so freed
weight-sized temporaries do not stay resident; an in-memory model (e.g. the Trainer callback's) leaves it alone.
Composition keeps at most :data:`COMPOSITION_CACHE_BYTES`: packed ``d x d`` Grams
of a chunk of source layers (each destination layer re-read once per chunk, attention tensors only; with
``diagnostics={"composition"}`` there is no per-layer pass), or, when five head sets of packed
Grams exceed it (very wide models), the tiled QR-reduced form over cached destination attention.  Each layer is
checked for NaN/Inf once (at its first read): :class:`NonFiniteWeightsError` names the tensor and the layer.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional, Union

import torch
from torch import nn

from hf_flag import __version__
from hf_flag.analysis import transformer
from hf_flag.analysis.chain import analyze_chain
from hf_flag.analysis.checks import resolve_device
from hf_flag.defaults import COMPOSITION_MODES
from hf_flag.errors import InputError
from hf_flag.geometry.angles import RANK_CUT_RULE
from hf_flag.geometry.baselines import COMMUTATOR_BASELINE_RULE
from hf_flag.geometry.flags import FLAG_TAU_RULE, GL_KERNEL_RTOL
from hf_flag.geometry.pairs import TRANSPORT_K_RULE
from hf_flag.geometry.spectral import WINDOW_RULE, WINDOW_TOLERANCE_RULE
from hf_flag.report import Report
from hf_flag.rows import sort_rows, summarize
from hf_flag.weights.sources import open_weights, provenance

__all__ = ["analyze"]


def analyze(model_or_path, *, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
            diagnostics: Optional[Iterable[str]] = None, layers: Optional[Iterable[int]] = None, cheap: bool = False,
            composition: str = "auto", allow_pickle: bool = False, progress: bool = False,
            name: Optional[str] = None, full: bool = False) -> Report:
    """Weight-only alignment report of a model (MATH.md §1-§4, §6); see the module docstring for the row kinds.

    model_or_path: an ``nn.Module`` / ``PreTrainedModel`` (a plain chain of ``nn.Linear`` is detected and gives
    ``"linear_chain"`` rows), a local folder, ``.safetensors`` / shard index, ``.gguf``, or a cached Hub id.
    device: default the in-memory model's device, else ``cuda`` when available, else ``cpu``; the model itself
    is never moved or cast (tensors are copied).  dtype: float64 or float32 for the analysis; default the
    precision policy (float32 for weights stored in float32 or coarser, float64 for float64; float64 with
    ``full``, which takes no float32: its pair rows are computed in float64 whatever ``dtype`` says, so
    ``full=True, dtype=torch.float32`` raises InputError rather than record a precision it did not use).
    full: today's all-vectors analysis (a thin SVD per weight: every singular vector, the GL kernel
    dimension); default: transformer pair rows from the leading singular subspaces the storage precision
    determines (``geometry.spectral``: windows ``window_in``/``window_out`` and residual certificates
    ``svd_residual_in``/``svd_residual_out`` in each row).  Linear chains always use the full analysis.
    diagnostics: subset of ``{"mlp", "vo", "residual", "heads", "composition"}`` (transformers, default all) or
    ``{"linear_chain"}`` (MLP chains).  layers: block (chain: pair) indices whose rows to compute.
    cheap: only the pair rows' commutator ratio and imbalance norms (no SVD, flags, transport, head overlaps,
    composition or baselines): for training callbacks.  composition: ``"auto"`` (default: every later layer
    where the estimated cost is small, ``analysis.heads.composition_estimate``, else adjacent layers; the
    estimate is printed with ``progress`` and kept in ``params["composition_estimate"]``), ``"all"``,
    ``"adjacent"`` or ``"none"``.  allow_pickle: permit ``.bin`` / ``.pt`` checkpoints (``weights_only=True``).
    Raises HfFlagError / ValueError (one line) for unreadable input, unknown architectures, bad options, and
    :class:`NonFiniteWeightsError` naming the tensor and layer when weights hold NaN/Inf.
    """
    start = time.perf_counter()
    if dtype is not None and dtype not in (torch.float64, torch.float32):
        raise InputError(f"dtype={dtype} is not supported; use torch.float32 or torch.float64, or leave it unset "
                         f"(float32 for weights stored in float32 or coarser, float64 otherwise)")
    if composition not in COMPOSITION_MODES:
        raise InputError(f"composition={composition!r}; use one of {list(COMPOSITION_MODES)}")
    layers = None if layers is None else list(layers)  # read twice (check_layers, params): not an iterator
    dev = resolve_device(device, model_or_path)
    source = open_weights(model_or_path, allow_pickle=allow_pickle)
    label = name or source.name
    source_provenance = provenance(source)
    try:
        if isinstance(model_or_path, nn.Module) and not source.config:
            report, facts = analyze_chain(model_or_path, label, device=dev, dtype=dtype or torch.float64,
                                          diagnostics=diagnostics, layers=layers, cheap=cheap)
            facts["dtype"] = dtype or torch.float64
        else:
            if full and dtype == torch.float32:
                raise InputError("full=True (--full) is the all-vectors analysis in float64 and takes no "
                                 "dtype=float32; leave dtype unset (or float64), or drop full for the default "
                                 "report, which computes in float32")
            report, facts = transformer.analyze_transformer(
                source, label, device=dev, dtype=dtype, diagnostics=diagnostics, layers=layers, cheap=cheap,
                composition=composition, progress=progress, full=full)
    finally:
        if source is not model_or_path:
            source.close()
    report.rows = sort_rows(report.rows)
    report.summary = summarize(report.rows)
    storage = facts.pop("storage")
    dtype = facts.pop("dtype")
    report.params = {
        "hf_flag_version": __version__, "torch_version": torch.__version__, "provenance": source_provenance,
        "dtype": str(dtype).removeprefix("torch."), "device": str(dev), "cheap": cheap,
        "composition": (facts.get("composition_estimate") or {}).get("used", composition),
        "composition_requested": composition, "full": full, "window_rule": None if full else WINDOW_RULE,
        **facts, "layers_requested": None if layers is None else sorted({int(i) for i in layers}),
        "storage_dtypes": sorted(storage), "storage_eps": max(storage.values(), default=0.0),
        "tolerances": {"flag_tau": f"per row (flag_tau): {FLAG_TAU_RULE}", "gl_kernel_rtol": GL_KERNEL_RTOL,
                       "rank_cut": RANK_CUT_RULE, "window_values": WINDOW_TOLERANCE_RULE},
        "commutator_baseline": COMMUTATOR_BASELINE_RULE, "transport_k": TRANSPORT_K_RULE, "bias_augmented": True,
        "layer_norm_folded": False,
        "embeddings_analysed": False,
        "composition_cache_bytes": facts.get("composition_cache_bytes", transformer.COMPOSITION_CACHE_BYTES),
        "elapsed_s": time.perf_counter() - start,
    }
    return report
