"""Source + adapter + geometry -> one :class:`~hf_flag.report.Report` (the only place they meet).

Row kinds (module constants below; other parts of hf-flag use these names):

* pair rows, one pair ``W_l`` (n x k) -> ``W_next`` (m x n) sharing the hidden space R^n (MATH.md §2-§4):
  ``"mlp"`` (``mlp_in`` -> ``mlp_out`` through the activation; for a gated MLP ``mlp_in`` is the *up* projection),
  ``"mlp_gate"`` (gate -> ``mlp_out``; gated MLPs (SwiGLU, GeGLU) only), ``"vo"`` (per query head h: ``W_V`` of KV
  head ``kv_head_of(h)`` as a (head_dim x d) ``nn.Linear`` matrix -> ``W_O[h]`` as (d x head_dim); hidden space
  R^head_dim), ``"residual"`` (``mlp_out`` of block l -> ``mlp_in`` of block l+1; hidden space the residual stream),
  ``"linear_chain"`` (consecutive ``nn.Linear`` layers of a plain MLP chain).
  The first matrix of a pair is bias-augmented, ``[W_l | b_l]`` (MATH.md §2), for every value of the row.
  Values: ``commutator_ratio`` (kappa, §3) and ``commutator_ratio_normalized`` (sqrt 2 kappa in [0, 1]),
  ``imbalance_norm`` ||D||_F, ``relative_imbalance``, ``imbalance_diagonal_norm`` ||diag D||_2 (§2); unless
  ``cheap``: ``commutator_ratio_baseline`` (root mean square of kappa over Haar rotations of the hidden basis,
  closed form: ``geometry.baselines.commutator_haar_rms``),
  ``subspace_score`` / ``basis_score`` (+ ``_baseline``; top-k transport window, k = min(k_in, m_out, ceil(n/2)), §4,
  ``intersection_dim`` (+ ``_baseline``), ``intersection_soft``, ``flag_tau``, ``gl_kernel_dim`` (§4).
  ``intersection_*`` are ``None`` when the two partial flags share no cut below n (e.g. full-rank vo pairs).
  Details: flag cuts, rank matrix, permutation (nonzero entries), is_permutation, transport k, activation.
  ``cheap=True`` gives the pair rows only, with the five cheap values (Gram factors, no SVD).
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
reads only its own blocks, block l+1 and, for composition, later layers' attention); the per-layer pass holds
block l and block l+1 only, and each layer's head bases are computed once (shared by its within-layer rows and
layer l-1's cross-layer rows), as is each MLP weight's thin SVD (shared by the pairs it belongs to).
Composition keeps at most :data:`COMPOSITION_CACHE_BYTES`: packed ``d x d`` Grams
of a chunk of source layers (each destination layer re-read once per chunk, attention tensors only; with
``diagnostics={"composition"}`` there is no per-layer pass), or, when five head sets of packed
Grams exceed it (very wide models), the tiled trace form over cached destination attention.  Each layer is
checked for NaN/Inf once (at its first read): :class:`NonFiniteWeightsError` names the tensor and the layer.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from hf_flag.analysis.checks import (check_choice, check_finite, check_layers, release_freed_memory,
                                     resolve_device, sort_rows, summarize)
from hf_flag.analysis.heads import composition_estimate, composition_rows, head_spaces, kv_index, overlap_rows
from hf_flag.analysis.pairs import ThinSVD, augment, pair_values, pair_window_values
from hf_flag.errors import NonFiniteWeightsError
from hf_flag.report import Report, Row

__all__ = ["analyze", "NonFiniteWeightsError", "HEADLINE_METRICS", "ROW_KINDS", "PAIR_KINDS", "HEAD_OVERLAP_KINDS",
           "CROSS_LAYER_KINDS", "COMPOSITION_KINDS", "KIND_MLP", "KIND_MLP_GATE", "KIND_VO", "KIND_RESIDUAL",
           "KIND_LINEAR_CHAIN", "table_metrics"]

KIND_MLP = "mlp"
KIND_MLP_GATE = "mlp_gate"
KIND_VO = "vo"
KIND_RESIDUAL = "residual"
KIND_LINEAR_CHAIN = "linear_chain"
PAIR_KINDS = (KIND_MLP, KIND_MLP_GATE, KIND_VO, KIND_RESIDUAL, KIND_LINEAR_CHAIN)
HEAD_OVERLAP_KINDS = {s: f"head_overlap_{s}" for s in ("q", "k", "v", "o")}
CROSS_LAYER_KINDS = {s: f"cross_layer_overlap_{s}" for s in ("q", "k", "v")}
COMPOSITION_KINDS = {s: f"composition_{s}" for s in ("q", "k", "v")}
ROW_KINDS = PAIR_KINDS + tuple(HEAD_OVERLAP_KINDS.values()) + tuple(CROSS_LAYER_KINDS.values()) + tuple(
    COMPOSITION_KINDS.values())

TRANSFORMER_DIAGNOSTICS = ("mlp", "vo", "residual", "heads", "composition")
CHAIN_DIAGNOSTICS = ("linear_chain",)
COMPOSITION_MODES = ("auto", "all", "adjacent", "none")

#: ordered ``kind/metric`` summary keys for model cards and tables (present ones only are shown)
HEADLINE_METRICS = (
    "mlp/commutator_ratio", "mlp/commutator_ratio_baseline", "mlp/subspace_score", "mlp/subspace_score_baseline",
    "mlp_gate/commutator_ratio", "vo/commutator_ratio", "vo/commutator_ratio_baseline",
    "residual/commutator_ratio", "linear_chain/commutator_ratio", "linear_chain/commutator_ratio_baseline",
    "head_overlap_o/overlap", "head_overlap_o/overlap_baseline", "head_overlap_q/overlap",
    "cross_layer_overlap_q/overlap", "composition_q/score", "composition_q/score_baseline", "composition_v/score",
)
PAIR_TABLE_METRICS = ("commutator_ratio", "relative_imbalance", "subspace_score", "basis_score", "intersection_dim")

#: memory budget (bytes) of the composition pass: packed Grams of a chunk of source layers plus one destination
#: layer's (``analysis.heads.gram_composition_rows``), or cached attention for the tiled fallback.  256 MiB holds
#: 17 source layers of SmolLM2-135M (d = 576, 9 heads: 12 MiB each) or 5 of a d = 768, 12-head model.  Larger
#: budgets re-read fewer layers; peak memory is about this plus two float64 blocks.
COMPOSITION_CACHE_BYTES = 256 * 2**20

#: the default report's window rule (``geometry.spectral``), as reported in ``Report.params``
WINDOW_RULE = ("last cut i <= k_max = 64 with (1/sqrt 3) eps_storage sigma_1 / (sigma_i - sigma_{i+1}) <= 0.1 "
               "(Wedin, MATH.md §4); partial SVD by randomized block Krylov, residual certified per weight")


def table_metrics(kind: str) -> tuple[str, ...]:
    """Metrics the CLI table shows for ``kind`` (each beside its baseline)."""
    if kind in PAIR_KINDS:
        return PAIR_TABLE_METRICS
    if kind in COMPOSITION_KINDS.values():
        return ("score",)
    return ("overlap", "overlap_zscore")


def pair_rows(model: str, kind: str, ids: Sequence[tuple[int, int, str, str]], W_l: torch.Tensor,
              b_l: Optional[torch.Tensor], W_next: torch.Tensor, *, activation: str, cheap: bool,
              storage_eps: float, svd_l=None, svd_next=None, window: bool = False,
              gram: Optional[Callable] = None) -> list[Row]:
    """Rows ``[W_l | b_l]`` -> ``W_next`` for a batch (leading dim) of pairs; ``ids``: (layer, target_layer,
    source, target) per batch member; ``svd_l``, ``svd_next``: SVDs of ``[W_l | b_l]`` and ``W_next`` when
    cached (:func:`weight_svd`: thin, or partial with ``window``).  ``window``: the default report's values on
    the storage-precision windows (:func:`~hf_flag.analysis.pairs.pair_window_values`), in the weights' dtype,
    with ``gram`` the pair's shared Grams (:func:`pair_grams`).  See the module docstring for the values."""
    W_aug = augment(W_l, b_l)
    if window and not cheap:
        svd_l = window_svd(W_aug, storage_eps) if svd_l is None else svd_l
        svd_next = window_svd(W_next, storage_eps) if svd_next is None else svd_next
        out = pair_window_values(W_aug, W_next, storage_eps=storage_eps, dtype=W_l.dtype, svd_l=svd_l,
                                 svd_next=svd_next, gram=gram)
    else:
        out = pair_values(W_aug, W_next, cheap=cheap, storage_eps=storage_eps, svd_l=svd_l, svd_next=svd_next)
    return [Row(model, kind, *i, values, {**details, "activation": activation}) for i, (values, details)
            in zip(ids, out)]


HEAD_LABELS = {"q": "head", "k": "kv_head", "v": "kv_head", "o": "head"}


def single(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A single pair's bias with the batch dim of :func:`pair_rows` added."""
    return None if bias is None else bias[None]


def layer_bases(cache: dict, layer: int, attn) -> dict:
    """Head bases (``geometry.heads.head_bases``) of ``layer``'s q/k/v/o spaces, from ``cache`` (key
    ``(layer, "heads")``) or computed once and stored there: layer l+1's bases serve its cross-layer rows and then
    its own."""
    from hf_flag.geometry.heads import head_bases

    key = (layer, "heads")
    if key not in cache:
        cache[key] = {s: head_bases(X) for s, X in head_spaces(attn).items()}
    return cache[key]


def window_svd(W: torch.Tensor, storage_eps: float):
    """Leading singular triplets of ``W`` (..., rows, cols) for the storage-precision window: ``K_MAX + 1`` of them
    (one closes the last cut), in ``W``'s dtype (:func:`~hf_flag.geometry.spectral.partial_svd`)."""
    from hf_flag.geometry.spectral import K_MAX, partial_svd

    return partial_svd(W, min(K_MAX + 1, min(W.shape[-2:])), dtype=W.dtype, storage_eps=storage_eps)


def weight_svd(cache: dict, layer: int, name: str, W: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               storage_eps: Optional[float] = None):
    """SVD of the MLP weight ``[W | bias]`` of ``layer`` (batch dim 1), from ``cache`` (key
    ``(layer, name, bias is not None)``) or computed once and stored there: ``mlp_out`` serves the mlp, mlp_gate
    and residual pairs, ``mlp_in`` of layer l+1 its own mlp pair and layer l's residual pair (MATH.md §4).
    Thin and in float64 (``full=True``), or the window's partial SVD in the weights' dtype given ``storage_eps``."""
    from hf_flag.geometry.angles import _thin_svd

    key = (layer, name, bias is not None)
    if key not in cache:
        W_aug = augment(W[None], single(bias))  # block checked at load
        cache[key] = _thin_svd(W_aug.to(torch.float64)) if storage_eps is None else window_svd(W_aug, storage_eps)
    return cache[key]


def pair_grams(cache: dict, left: tuple, right: tuple) -> Callable:
    """``gram(which, side, dtype)`` for :func:`~hf_flag.analysis.pairs.pair_window_values`: the Gram of the pair's
    ``"l"`` weight ``left = (layer, name, W, bias)`` or ``"next"`` weight ``right``, from ``cache`` (key
    ``(layer, name, bias is not None, "gram", side, dtype)``) or computed once and stored there.  A Llama block's
    ``W_down W_down^T`` serves its mlp, mlp_gate and residual pairs, ``W_up^T W_up`` its mlp pair and the previous
    block's residual pair (MATH.md §3)."""
    from hf_flag.geometry.pairs import weight_gram

    def gram(which: str, side: str, dtype: torch.dtype) -> torch.Tensor:
        layer, name, W, bias = left if which == "l" else right
        key = (layer, name, bias is not None, "gram", side, dtype)
        if key not in cache:
            cache[key] = weight_gram(augment(W[None], single(bias)), side, dtype=dtype)
        return cache[key]

    return gram


def layer_rows(model: str, layout, block, nxt, *, diagnostics: frozenset, cheap: bool,
               cache: Optional[dict] = None, window: bool = False) -> list[Row]:
    """Every row whose ``layer`` is ``block.index``, composition excepted (``nxt``: block l+1, or ``None``).

    A pair's flag tolerance uses the coarser ``storage_eps`` of the blocks its weights come from (MATH.md §4).
    ``cache``: head bases (:func:`layer_bases`) and weight SVDs (:func:`weight_svd`) shared across calls, keyed
    ``(layer, ...)``; entries of layers before ``block.index`` are dropped."""
    cache = {} if cache is None else cache
    for old in [k for k in cache if k[0] < block.index]:
        del cache[old]
    l, mlp, attn = block.index, block.mlp, block.attention
    eps = max(block.storage_eps, nxt.storage_eps) if nxt is not None else block.storage_eps
    svd = (lambda *args: weight_svd(cache, *args, storage_eps=eps if window else None)) if not cheap else \
        (lambda *args: None)
    pair = dict(cheap=cheap, storage_eps=block.storage_eps, window=window)
    rows: list[Row] = []
    if "mlp" in diagnostics and mlp is not None:
        out = svd(l, "mlp.out", mlp.mlp_out)
        down = (l, "mlp.out", mlp.mlp_out, None)
        rows += pair_rows(model, KIND_MLP, [(l, l, "mlp.in", "mlp.out")], mlp.mlp_in[None], single(mlp.b_in),
                          mlp.mlp_out[None], activation=mlp.activation, svd_l=svd(l, "mlp.in", mlp.mlp_in, mlp.b_in),
                          svd_next=out, gram=pair_grams(cache, (l, "mlp.in", mlp.mlp_in, mlp.b_in), down), **pair)
        if mlp.mlp_gate is not None:
            rows += pair_rows(model, KIND_MLP_GATE, [(l, l, "mlp.gate", "mlp.out")], mlp.mlp_gate[None],
                              single(mlp.b_gate), mlp.mlp_out[None], activation=mlp.activation,
                              svd_l=svd(l, "mlp.gate", mlp.mlp_gate, mlp.b_gate), svd_next=out,
                              gram=pair_grams(cache, (l, "mlp.gate", mlp.mlp_gate, mlp.b_gate), down), **pair)
    if "vo" in diagnostics and attn is not None:
        kv = kv_index(layout, attn.W_V.device)
        W_v = attn.W_V.index_select(0, kv).transpose(-1, -2)  # (H, head_dim, d): nn.Linear layout
        b_v = None if attn.b_V is None else attn.b_V.index_select(0, kv)
        ids = [(l, l, f"head {h}", f"head {h}") for h in range(layout.n_heads)]
        rows += pair_rows(model, KIND_VO, ids, W_v, b_v, attn.W_O.transpose(-1, -2), activation="identity", **pair)
    if "residual" in diagnostics and mlp is not None and nxt is not None and nxt.mlp is not None:
        rows += pair_rows(model, KIND_RESIDUAL, [(l, l + 1, "mlp.out", "mlp.in")], mlp.mlp_out[None],
                          single(mlp.b_out), nxt.mlp.mlp_in[None], activation="identity",
                          svd_l=svd(l, "mlp.out", mlp.mlp_out, mlp.b_out),
                          svd_next=svd(l + 1, "mlp.in", nxt.mlp.mlp_in), cheap=cheap,
                          storage_eps=max(block.storage_eps, nxt.storage_eps), window=window,
                          gram=pair_grams(cache, (l, "mlp.out", mlp.mlp_out, mlp.b_out),
                                          (l + 1, "mlp.in", nxt.mlp.mlp_in, None)))
    if "heads" in diagnostics and attn is not None and not cheap:
        here = layer_bases(cache, l, attn)
        for s in "qkvo":
            rows += overlap_rows(model, HEAD_OVERLAP_KINDS[s], l, l, here[s], here[s], (HEAD_LABELS[s],) * 2,
                                 upper=True)
        if nxt is not None and nxt.attention is not None:
            there = layer_bases(cache, l + 1, nxt.attention)
            for s in "qkv":
                rows += overlap_rows(model, CROSS_LAYER_KINDS[s], l, l + 1, here["o"], there[s],
                                     ("head", HEAD_LABELS[s]), upper=False)
    return rows


def per_layer_rows(model: str, layout, layers: Sequence[int], load: Callable, *, diagnostics: frozenset,
                   cheap: bool, progress: bool, window: bool = False) -> list[Row]:
    """:func:`layer_rows` of every layer in ``layers``, streaming blocks: ``load(i)`` reads block i; each block is
    read once, block l+1 serving layer l's cross-layer and residual rows and then its own."""
    rows: list[Row] = []
    need_next = "residual" in diagnostics or ("heads" in diagnostics and not cheap)
    cache: dict = {}
    with progress_bar(len(layers), progress, model) as bar:
        nxt = None
        for i in layers:
            block = nxt if nxt is not None and nxt.index == i else load(i)
            nxt = load(i + 1) if need_next and i + 1 < layout.n_layers else None
            rows += layer_rows(model, layout, block, nxt, diagnostics=diagnostics, cheap=cheap, cache=cache,
                               window=window)
            bar.update()
    return rows


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar on stderr (disabled unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="layer", leave=False)


def analyze_transformer(source, name: str, *, device: torch.device, dtype: Optional[torch.dtype],
                        diagnostics: Optional[Iterable[str]], layers: Optional[Iterable[int]], cheap: bool,
                        composition: str, progress: bool, full: bool = True) -> tuple[Report, dict]:
    """Rows of a transformer read through its adapter, streaming blocks (see the module docstring)."""
    from hf_flag.weights.adapters import get_adapter

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
        rows += per_layer_rows(name, layout, sel, load, diagnostics=diag, cheap=cheap, progress=progress,
                               window=not full)
        release_freed_memory()
    estimate = None
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
                                 budget_bytes=COMPOSITION_CACHE_BYTES, itemsize=dtype.itemsize)
    report = Report(model=name, architecture=layout.architecture, layout=layout.to_dict(), rows=rows)
    return report, {"diagnostics": sorted(diag), "layers": sel, "storage": storage, "dtype": dtype,
                    "composition_estimate": estimate}


def model_compute_dtype(source, adapter, layout, layers: Sequence[int], requested: Optional[torch.dtype],
                        full: bool) -> torch.dtype:
    """The compute precision: ``requested``; else float64 for ``full`` (today's analysis); else the precision
    policy (:func:`~hf_flag.geometry.spectral.compute_dtype`) of the finest storage among the analysed blocks'
    tensors (float32 for float32, bf16, fp16 and quantised weights)."""
    from hf_flag.geometry.spectral import compute_dtype

    if requested is not None or full:
        return requested or torch.float64
    names = {n for i in layers for n in adapter.block_tensor_names(layout, i)}
    return compute_dtype(min((source.storage_eps(n) for n in names), default=0.0))


def analyze_chain(module: nn.Module, name: str, *, device: torch.device, dtype: torch.dtype,
                  diagnostics: Optional[Iterable[str]], layers: Optional[Iterable[int]],
                  cheap: bool) -> tuple[Report, dict]:
    """``"linear_chain"`` rows of consecutive ``nn.Linear`` layers of a plain MLP (pair i: layer i -> i + 1)."""
    from hf_flag.weights.adapters.mlp import linear_chain

    diag = check_choice("diagnostics", diagnostics, CHAIN_DIAGNOSTICS)
    chain = linear_chain(module, dtype=dtype, device=device)
    if len(chain) < 2:
        raise ValueError(f"model {name!r} has {len(chain)} nn.Linear layer(s); a linear chain needs at least 2")
    sel = check_layers(layers, len(chain) - 1)
    rows: list[Row] = []
    for i in sel:
        a, b = chain[i], chain[i + 1]
        W_l, W_next, bias = a.weight, b.weight, a.bias
        for layer, tensors in ((a, (W_l, bias)), (b, (W_next,))):
            if not all(bool(torch.isfinite(t).all()) for t in tensors if t is not None):
                raise NonFiniteWeightsError(f"layer {layer.name!r}: weight or bias holds NaN/Inf values; repair "
                                            f"the model")
        rows += pair_rows(name, KIND_LINEAR_CHAIN, [(i, i + 1, a.name, b.name)], W_l[None], single(bias),
                          W_next[None], activation=a.activation_after, cheap=cheap,
                          storage_eps=max(a.storage_eps, b.storage_eps))
    layout = {"n_layers": len(chain), "widths": [chain[0].weight.shape[1]] + [c.weight.shape[0] for c in chain],
              "activations": [c.activation_after for c in chain]}
    storage = {c.storage_dtype: c.storage_eps for c in chain}
    return Report(model=name, architecture="linear_chain", layout=layout, rows=rows), {
        "diagnostics": sorted(diag), "layers": sel, "storage": storage}


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
    ``full``).  full: today's all-vectors analysis (a thin SVD per weight: every singular vector, the GL kernel
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
    from hf_flag import __version__
    from hf_flag.weights.sources import open_weights

    start = time.perf_counter()
    if dtype is not None and dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype={dtype} is not supported; use torch.float64 (default) or torch.float32")
    if composition not in COMPOSITION_MODES:
        raise ValueError(f"composition={composition!r}; use one of {list(COMPOSITION_MODES)}")
    layers = None if layers is None else list(layers)  # read twice (check_layers, params): not an iterator
    dev = resolve_device(device, model_or_path)
    source = open_weights(model_or_path, allow_pickle=allow_pickle)
    label = name or source.name
    try:
        if isinstance(model_or_path, nn.Module) and not source.config:
            report, facts = analyze_chain(model_or_path, label, device=dev, dtype=dtype or torch.float64,
                                          diagnostics=diagnostics, layers=layers, cheap=cheap)
            facts["dtype"] = dtype or torch.float64
        else:
            report, facts = analyze_transformer(source, label, device=dev, dtype=dtype, diagnostics=diagnostics,
                                                layers=layers, cheap=cheap, composition=composition,
                                                progress=progress, full=full)
    finally:
        if source is not model_or_path:
            source.close()
    report.rows = sort_rows(report.rows, ROW_KINDS)
    report.summary = summarize(report.rows)
    storage = facts.pop("storage")
    dtype = facts.pop("dtype")
    report.params = {
        "hf_flag_version": __version__, "torch_version": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."), "device": str(dev), "cheap": cheap,
        "composition": (facts.get("composition_estimate") or {}).get("used", composition),
        "composition_requested": composition,
        "full": full, "window_rule": None if full else WINDOW_RULE,
        **facts, "layers_requested": None if layers is None else sorted({int(i) for i in layers}),
        "storage_dtypes": sorted(storage), "storage_eps": max(storage.values(), default=0.0),
        "tolerances": {"flag_tau": "per row (flag_tau): max(1e-6, 10 eps_storage sigma_1 / gap_k), MATH.md §4",
                       "gl_kernel_rtol": 1e-8, "rank_cut": "s > s_max * max(shape) * eps, MATH.md §1"},
        "commutator_baseline": "Haar RMS sqrt(E kappa^2) over rotations of the hidden basis, closed form, MATH.md §3",
        "transport_k": "min(k_in, m_out, ceil(n / 2))", "bias_augmented": True, "layer_norm_folded": False,
        "embeddings_analysed": False, "composition_cache_bytes": COMPOSITION_CACHE_BYTES,
        "elapsed_s": time.perf_counter() - start,
    }
    return report
