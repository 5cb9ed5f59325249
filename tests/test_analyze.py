"""End-to-end ``hf_flag.analyze`` on tiny random models of every family and on plain MLP chains.

Independent references: values recomputed from the modules' raw parameters with our own slicing (direct n x n
commutator and imbalance, numpy SVD transport scores and ranks, numpy QR overlaps, the naive d x d composition
formula, MATH.md §1-§4/§6), a Monte-Carlo Haar RMS for the commutator baseline, the lazy checkpoint path vs the
in-memory path, sharded vs full runs, and the cheap path vs the full path.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from hf_flag.analysis.api import analyze
from hf_flag.errors import HfFlagError, InputError, NonFiniteWeightsError
from hf_flag.rows import (COMPOSITION_KINDS, CROSS_LAYER_KINDS, HEAD_OVERLAP_KINDS, HEADLINE_METRICS, KIND_LINEAR_CHAIN,
                          KIND_MLP, KIND_MLP_GATE, KIND_RESIDUAL, KIND_VO, PAIR_KINDS, ROW_KINDS)

L, D, H = 2, 32, 4  # layers, d_model, heads of every tiny model
SMALL = dict(vocab_size=64, max_position_embeddings=32)
LLAMA_LIKE = dict(SMALL, hidden_size=D, intermediate_size=48, num_hidden_layers=L, num_attention_heads=H,
                  num_key_value_heads=2)

FAMILIES = {
    # name: (builder, n_kv_heads, gated)
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=D, n_layer=L, n_head=H, vocab_size=64, n_positions=32)), H, False),
    "gpt_neox": (lambda: transformers.GPTNeoXModel(transformers.GPTNeoXConfig(
        hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64, **SMALL)), H, False),
    "opt": (lambda: transformers.OPTModel(transformers.OPTConfig(
        hidden_size=D, num_hidden_layers=L, num_attention_heads=H, ffn_dim=64, word_embed_proj_dim=D, **SMALL)),
        H, False),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_LIKE)), 2, True),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLAMA_LIKE)), 2, True),
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**LLAMA_LIKE, pad_token_id=0)), 2, True),
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(
        hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64, **SMALL)), H, False),
}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family][0]().eval()


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def llama_report(llama):
    return analyze(llama, device="cpu")


def expected_counts(n_kv: int, gated: bool, n_layers: int = L) -> dict[str, int]:
    pairs = n_layers * (n_layers - 1) // 2
    counts = {KIND_MLP: n_layers, KIND_VO: n_layers * H, KIND_RESIDUAL: n_layers - 1,
              HEAD_OVERLAP_KINDS["q"]: n_layers * H * (H - 1) // 2, HEAD_OVERLAP_KINDS["o"]: n_layers * H * (H - 1) // 2,
              HEAD_OVERLAP_KINDS["k"]: n_layers * n_kv * (n_kv - 1) // 2,
              HEAD_OVERLAP_KINDS["v"]: n_layers * n_kv * (n_kv - 1) // 2,
              CROSS_LAYER_KINDS["q"]: (n_layers - 1) * H * H, CROSS_LAYER_KINDS["k"]: (n_layers - 1) * H * n_kv,
              CROSS_LAYER_KINDS["v"]: (n_layers - 1) * H * n_kv,
              **{k: pairs * H * H for k in COMPOSITION_KINDS.values()}}
    if gated:
        counts[KIND_MLP_GATE] = n_layers
    return {k: v for k, v in counts.items() if v}


RANGES = {  # metric -> closed interval every value must lie in
    "commutator_ratio": (0, 1 / math.sqrt(2) + 1e-12), "commutator_ratio_baseline": (0, 1 / math.sqrt(2) + 1e-12),
    "commutator_ratio_normalized": (0, 1 + 1e-12), "commutator_ratio_normalized_baseline": (0, 1 + 1e-12),
    "relative_imbalance": (0, 1 + 1e-12), "relative_imbalance_baseline": (0, 1 + 1e-12),
    "imbalance_norm": (0, math.inf), "imbalance_norm_baseline": (0, math.inf), "imbalance_diagonal_norm": (0, math.inf),
    "subspace_score": (0, 1 + 1e-12), "basis_score": (0, 1 + 1e-12), "overlap": (0, 1 + 1e-12),
    "score": (0, 1 + 1e-12), "flag_tau": (1e-6, math.pi / 2), "gl_kernel_dim": (0, math.inf),
    "gl_kernel_dim_baseline": (0, math.inf), "intersection_dim": (0, math.inf), "intersection_soft": (0, math.inf),
    "intersection_soft_baseline": (0, math.inf),
}


OPTIONAL = ("intersection_dim", "intersection_dim_baseline", "intersection_soft", "intersection_soft_baseline")
#: None in the default (windowed) report where the storage precision determines no common cut, no basis, or (GL
#: kernel dimension) where whole spectra are needed (hf_flag.geometry.spectral)
WINDOW_OPTIONAL = ("subspace_score", "subspace_score_baseline", "basis_score", "basis_score_baseline",
                   "gl_kernel_dim", "gl_kernel_dim_baseline", "range_overlap", "range_overlap_baseline")


def check_report(report, counts: dict[str, int]) -> None:
    got = {k: len(report.select(kind=k)) for k in report.kinds()}
    assert got == counts
    assert set(report.kinds()) <= set(ROW_KINDS)
    for row in report.rows:
        for metric, value in row.values.items():
            if value is None and metric == "gl_kernel_dim_baseline":  # withheld where the generic value is not
                continue  # provable at the cut (gl_kernel_dim_generic; MATH.md §4), in every report
            if value is None and metric in WINDOW_OPTIONAL:
                assert not report.params.get("full", True), (row.kind, metric)
                continue
            if value is None:  # no flag cut common to both sides below n (e.g. full-rank vo pairs), MATH.md §4
                assert metric in OPTIONAL and row.details["intersection_cut"] is None, (row.kind, metric)
                continue
            assert math.isfinite(value), (row.kind, metric)
            lo, hi = RANGES.get(metric, (-math.inf, math.inf))
            assert lo <= value <= hi, (row.kind, metric, value)
    for kind in counts:
        for metric in report.rows[[r.kind for r in report.rows].index(kind)].values:
            values = [r.values[metric] for r in report.select(kind=kind) if r.values[metric] is not None]
            if values:
                assert report.summary[f"{kind}/{metric}"] == pytest.approx(np.mean(values), rel=1e-12)
            else:
                assert f"{kind}/{metric}" not in report.summary
    assert all(math.isfinite(v) for v in report.summary.values())
    assert report.to_json()  # strict JSON (no NaN)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_end_to_end(family):
    _, n_kv, gated = FAMILIES[family]
    report = analyze(build(family), device="cpu")
    check_report(report, expected_counts(n_kv, gated))
    assert report.params["dtype"] == "float32" and report.params["composition"] == "all"  # float32 storage
    assert report.layout["n_heads"] == H and report.layout["n_kv_heads"] == n_kv
    for row in report.select(kind=HEAD_OVERLAP_KINDS["o"]):
        assert row.values["overlap_baseline"] == pytest.approx((D // H) / D)
    for row in report.select(kind=COMPOSITION_KINDS["q"]):
        assert row.values["score_baseline"] == pytest.approx(1 / math.sqrt(D))
        assert row.layer < row.target_layer


def test_mlp_chain_end_to_end():
    torch.manual_seed(1)
    chain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
    report = analyze(chain, device="cpu")
    check_report(report, {KIND_LINEAR_CHAIN: 2})
    first, second = report.select(kind=KIND_LINEAR_CHAIN)
    assert (first.details["activation"], second.details["activation"]) == ("relu", "tanh")
    # bias-augmented direct commutator, MATH.md §2-§3
    W_l = torch.cat([chain[0].weight, chain[0].bias[:, None]], 1).detach().double()
    W_next = chain[2].weight.detach().double()
    assert first.values["commutator_ratio"] == pytest.approx(direct_kappa(W_l, W_next), rel=1e-9)
    with pytest.raises(ValueError, match="diagnostics"):
        analyze(chain, diagnostics={"mlp"})


def test_chain_pair_values_from_direct_formulas():
    """Every value of both chain pairs from the n x n matrices and numpy's SVD (MATH.md §2-§4); the commutator
    baseline against a Monte-Carlo root mean square over Haar rotations of the hidden basis (a second algorithm)."""
    torch.manual_seed(1)
    chain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
    report = analyze(chain, device="cpu")
    gen = torch.Generator().manual_seed(0)
    for i, (a, b) in enumerate(((0, 2), (2, 4))):
        row = report.select(kind=KIND_LINEAR_CHAIN)[i]
        W_l = torch.cat([chain[a].weight, chain[a].bias[:, None]], 1).detach().double()  # [W_l | b_l], n x (k+1)
        W_next = chain[b].weight.detach().double()
        n = W_l.shape[0]
        A, B = W_next.T @ W_next, W_l @ W_l.T
        D = A - B
        v = row.values
        assert v["imbalance_norm"] == pytest.approx(float(torch.linalg.norm(D)), rel=1e-10)
        assert v["relative_imbalance"] == pytest.approx(
            float(torch.linalg.norm(D) / (torch.linalg.norm(A) + torch.linalg.norm(B))), rel=1e-10)
        assert v["imbalance_diagonal_norm"] == pytest.approx(float(torch.linalg.norm(torch.diagonal(D))), rel=1e-10)
        assert v["commutator_ratio_normalized"] == pytest.approx(math.sqrt(2) * direct_kappa(W_l, W_next), rel=1e-9)
        # transport window k = min(k_in, m_out, ceil(n/2)): (1/k)||T_k||_F^2 and (1/k) sum T_ii^2, T = V^T U
        k = min(W_l.shape[1], W_next.shape[0], (n + 1) // 2)
        U = np.linalg.svd(W_l.numpy())[0][:, :k]
        Vt = np.linalg.svd(W_next.numpy())[2][:k]
        T = Vt @ U
        assert row.details["transport_k"] == k
        assert v["subspace_score"] == pytest.approx(float(np.sum(T ** 2)) / k, rel=1e-9)
        assert v["basis_score"] == pytest.approx(float(np.sum(np.diag(T) ** 2)) / k, rel=1e-9)
        assert (v["subspace_score_baseline"], v["basis_score_baseline"]) == pytest.approx((k / n, 1 / n))
        # GL-invariant kernel dimension rank W_l - rank(W_next W_l): (0, 8) for these widths
        rank = np.linalg.matrix_rank
        assert v["gl_kernel_dim"] == rank(W_l.numpy()) - rank((W_next @ W_l).numpy()) == (0, 8)[i]
        # Haar RMS of kappa(A, O B O^T): 4000 rotations, sampling error ~0.2% (seeded; agrees to 0.2%)
        Q, R = torch.linalg.qr(torch.randn(4000, n, n, generator=gen, dtype=torch.float64))
        O = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]  # Haar (Mezzadri 2007)
        B_rot = O @ B @ O.mT
        kappa = torch.linalg.matrix_norm(A @ B_rot - B_rot @ A) / (torch.linalg.norm(A) * torch.linalg.norm(B))
        assert v["commutator_ratio_baseline"] == pytest.approx(float(kappa.square().mean().sqrt()), rel=0.01)


def direct_kappa(W_l: torch.Tensor, W_next: torch.Tensor) -> float:
    """kappa with the n x n matrices formed (MATH.md §3)."""
    A, B = W_next.T @ W_next, W_l @ W_l.T
    return float(torch.linalg.norm(A @ B - B @ A) / (torch.linalg.norm(A) * torch.linalg.norm(B)))


def np_overlap(X: np.ndarray, Y: np.ndarray) -> float:
    """||Q_X^T Q_Y||_F^2 / min(p, q) by numpy QR (MATH.md §1)."""
    qx, qy = np.linalg.qr(X)[0], np.linalg.qr(Y)[0]
    return float(np.sum((qx.T @ qy) ** 2) / min(X.shape[1], Y.shape[1]))


def row_of(report, kind, layer, source, target):
    return next(r for r in report.rows if (r.kind, r.layer, r.source, r.target) == (kind, layer, source, target))


def test_llama_values_from_raw_parameters(llama, llama_report):
    dh, kv_of = D // H, lambda h: h // 2
    attn = [layer.self_attn for layer in llama.model.layers]
    p = {n: t.detach().double() for n, t in llama.named_parameters()}
    q, k, v, o = ([p[f"model.layers.{i}.self_attn.{r}_proj.weight"] for i in range(L)] for r in "qkvo")
    assert attn[0].config.num_key_value_heads == 2
    for h in (0, 3):  # vo pair: W_V of KV head kv(h) (dh x d) -> W_O[h] as (d x dh)
        W_v = v[1][kv_of(h) * dh:(kv_of(h) + 1) * dh]
        W_o = o[1][:, h * dh:(h + 1) * dh]
        row = row_of(llama_report, KIND_VO, 1, f"head {h}", f"head {h}")
        assert row.values["commutator_ratio"] == pytest.approx(direct_kappa(W_v, W_o), rel=1e-9)
    # mlp and gate pairs of layer 0
    up, gate, down = (p[f"model.layers.0.mlp.{r}_proj.weight"] for r in ("up", "gate", "down"))
    assert row_of(llama_report, KIND_MLP, 0, "mlp.in", "mlp.out").values["commutator_ratio"] == pytest.approx(
        direct_kappa(up, down), rel=1e-9)
    assert row_of(llama_report, KIND_MLP_GATE, 0, "mlp.gate", "mlp.out").values["commutator_ratio"] == \
        pytest.approx(direct_kappa(gate, down), rel=1e-9)
    up1 = p["model.layers.1.mlp.up_proj.weight"]
    assert row_of(llama_report, KIND_RESIDUAL, 0, "mlp.out", "mlp.in").values["commutator_ratio"] == \
        pytest.approx(direct_kappa(down, up1), rel=1e-9)
    # head rows are computed in the analysis dtype, float32 for float32 storage (issue #11 precision policy): they
    # agree with float64 to float32's rounding, a few 1e-8 relative (the kappa values above come from float64 Grams)
    f32 = 1e-6
    # head_overlap_o: write subspaces = column blocks of o_proj
    O = o[0].numpy()
    row = row_of(llama_report, HEAD_OVERLAP_KINDS["o"], 0, "head 1", "head 2")
    assert row.values["overlap"] == pytest.approx(np_overlap(O[:, dh:2 * dh], O[:, 2 * dh:3 * dh]), rel=f32)
    # head_overlap_k compares KV heads (2 of them): read subspace col(W_K) = rows of k_proj, transposed
    K = k[0].numpy()
    row = row_of(llama_report, HEAD_OVERLAP_KINDS["k"], 0, "kv_head 0", "kv_head 1")
    assert row.values["overlap"] == pytest.approx(np_overlap(K[:dh].T, K[dh:].T), rel=f32)
    # cross-layer: write of layer-0 head 3 vs read of layer-1 query head 1
    row = row_of(llama_report, CROSS_LAYER_KINDS["q"], 0, "head 3", "head 1")
    assert row.values["overlap"] == pytest.approx(np_overlap(O[:, 3 * dh:], q[1][dh:2 * dh].T.numpy()), rel=f32)
    # composition: naive ||W_V W_O W_Q W_K^T|| / (||W_V W_O|| ||W_Q W_K^T||), d x d matrices
    for h, g in ((0, 0), (2, 3)):
        L_ = v[0][kv_of(h) * dh:(kv_of(h) + 1) * dh].T @ o[0][:, h * dh:(h + 1) * dh].T  # W_V W_O (d x d)
        R_q = q[1][g * dh:(g + 1) * dh].T @ k[1][kv_of(g) * dh:(kv_of(g) + 1) * dh]  # W_Q W_K^T
        R_v = v[1][kv_of(g) * dh:(kv_of(g) + 1) * dh].T @ o[1][:, g * dh:(g + 1) * dh].T
        for kind, R in (("q", R_q), ("k", R_q.T), ("v", R_v)):
            want = float(torch.linalg.norm(L_ @ R) / (torch.linalg.norm(L_) * torch.linalg.norm(R)))
            row = next(r for r in llama_report.select(kind=COMPOSITION_KINDS[kind], layer=0)
                       if (r.target_layer, r.source, r.target) == (1, f"head {h}", f"head {g}"))
            assert row.values["score"] == pytest.approx(want, rel=f32)


def test_gpt2_conv1d_values_from_raw_parameters():
    model = build("gpt2")
    report = analyze(model, device="cpu", diagnostics={"vo", "heads", "mlp"})
    dh = D // H
    c_attn = model.transformer.h[0].attn.c_attn  # Conv1D, in x out: [Q | K | V] columns
    c_proj = model.transformer.h[0].attn.c_proj.weight.detach().double()  # (d, d) in x out: W_O^h = rows
    W, b = c_attn.weight.detach().double(), c_attn.bias.detach().double()
    h = 2
    cols = slice(2 * D + h * dh, 2 * D + (h + 1) * dh)
    W_v = torch.cat([W[:, cols].T, b[cols, None]], 1)  # bias-augmented, (dh x d+1)
    row = row_of(report, KIND_VO, 0, f"head {h}", f"head {h}")
    assert row.values["commutator_ratio"] == pytest.approx(direct_kappa(W_v, c_proj[h * dh:(h + 1) * dh].T), rel=1e-9)
    rows_o = c_proj.numpy()
    row = row_of(report, HEAD_OVERLAP_KINDS["o"], 0, "head 0", "head 3")
    assert row.values["overlap"] == pytest.approx(np_overlap(rows_o[:dh].T, rows_o[3 * dh:].T), rel=1e-6)  # float32
    mlp = model.transformer.h[0].mlp
    W_in = torch.cat([mlp.c_fc.weight.T, mlp.c_fc.bias[:, None]], 1).detach().double()
    assert row_of(report, KIND_MLP, 0, "mlp.in", "mlp.out").values["commutator_ratio"] == pytest.approx(
        direct_kappa(W_in, mlp.c_proj.weight.T.detach().double()), rel=1e-9)
    assert report.kinds() == sorted([KIND_MLP, KIND_VO, *HEAD_OVERLAP_KINDS.values(), *CROSS_LAYER_KINDS.values()])


def same_rows(a, b, rel=1e-10):
    assert [(r.kind, r.layer, r.target_layer, r.source, r.target) for r in a.rows] == \
        [(r.kind, r.layer, r.target_layer, r.source, r.target) for r in b.rows]
    for x, y in zip(a.rows, b.rows):
        assert x.values.keys() == y.values.keys(), x.kind
        for m in x.values:
            if x.values[m] is None or y.values[m] is None:
                assert x.values[m] is y.values[m], (x.kind, x.source, m)
            else:
                assert x.values[m] == pytest.approx(y.values[m], rel=rel, abs=1e-12), (x.kind, x.source, m)


def test_lazy_checkpoint_equals_in_memory(llama, llama_report, tmp_path):
    llama.save_pretrained(tmp_path, safe_serialization=True)
    lazy = analyze(tmp_path, device="cpu")
    same_rows(lazy, llama_report)
    assert lazy.model == tmp_path.name and lazy.params["storage_dtypes"] == ["float32"]


def test_sharded_layers_merge_to_full(llama, llama_report):
    shards = [analyze(llama, device="cpu", layers=[i]) for i in range(L)]
    assert all({r.layer for r in s.rows} == {i} for i, s in enumerate(shards))
    merged = copy.copy(llama_report)
    order = {(r.kind, r.layer, r.target_layer, r.source, r.target): i for i, r in enumerate(llama_report.rows)}
    merged.rows = sorted((r for s in shards for r in s.rows),
                         key=lambda r: order[(r.kind, r.layer, r.target_layer, r.source, r.target)])
    same_rows(merged, llama_report, rel=1e-12)


def test_one_thin_svd_per_mlp_weight(llama, monkeypatch):
    """Each MLP weight is factorised once and shared by its pairs: per block up, gate and down (mlp_out serves the
    mlp, mlp_gate and residual pairs; block l+1's up serves block l's residual pair and its own mlp pair)."""
    import hf_flag.geometry.angles as angles

    shapes, depth, real = [], [0], angles.thin_svd_in_dtype

    def counting(A: torch.Tensor):  # top-level calls only (thin_svd_in_dtype recurses on the transpose of wide input)
        depth[0] += 1
        try:
            if depth[0] == 1:
                shapes.append(tuple(A.shape))
            return real(A)
        finally:
            depth[0] -= 1

    import hf_flag.geometry.spectral as spectral

    for module in (angles, spectral):  # the full path (angles.thin_svd) and the windows' small-matrix route
        monkeypatch.setattr(module, "thin_svd_in_dtype", counting)
    analyze(llama, device="cpu", diagnostics={"mlp", "residual"})
    mlp_weights = {(1, 48, D), (1, D, 48)}  # up/gate (d_ff x d) and down (d x d_ff), batch dim 1
    assert sum(shape in mlp_weights for shape in shapes) == 3 * L


def test_cheap_values_equal_full_values_and_leave_model_alone(llama_report):
    model = build("llama").to(torch.bfloat16)
    before = {n: (t.dtype, t.device, t.clone()) for n, t in model.state_dict().items()}
    cheap = analyze(model, cheap=True)
    assert {r.kind for r in cheap.rows} <= set(PAIR_KINDS)
    assert all(set(r.values) == {"commutator_ratio", "commutator_ratio_normalized", "commutator_ratio_baseline",
                                 "commutator_ratio_normalized_baseline", "imbalance_norm", "imbalance_norm_baseline",
                                 "relative_imbalance", "relative_imbalance_baseline", "imbalance_diagonal_norm"}
               for r in cheap.rows)
    for n, t in model.state_dict().items():
        assert (t.dtype, t.device) == before[n][:2] and torch.equal(t, before[n][2])
    # bf16 weights: Grams in float32 (the precision policy, geometry.spectral.gram_dtype), so the numbers of their
    # exact float64 upcast within float32 rounding (1e-5 relative; the storage tolerance is eps_bf16 = 2^-8)
    upcast = analyze(copy.deepcopy(model).double(), device="cpu", cheap=True)
    same_rows(cheap, upcast, rel=1e-5)
    # cheap (Gram factors) vs full (thin SVDs): two algorithms for the same six values
    cheap64 = analyze(build("llama"), device="cpu", cheap=True)
    full = {(r.kind, r.layer, r.source): r for r in llama_report.rows}
    for row in cheap64.rows:
        ref = full[(row.kind, row.layer, row.source)]
        for m, v in row.values.items():
            assert v == pytest.approx(ref.values[m], rel=1e-10), (row.kind, m)


def test_composition_modes_and_headlines(llama, llama_report):
    adjacent = analyze(build("llama", seed=3), device="cpu", composition="adjacent", diagnostics={"composition"})
    assert {(r.layer, r.target_layer) for r in adjacent.rows} == {(0, 1)}
    none = analyze(llama, device="cpu", composition="none", diagnostics={"composition", "mlp"})
    assert none.kinds() == [KIND_MLP, KIND_MLP_GATE]
    present = [m for m in HEADLINE_METRICS if m in llama_report.summary]
    assert "mlp/commutator_ratio" in present and "composition_q/score" in present
    with pytest.raises(ValueError, match="composition"):
        analyze(llama, composition="every")
    with pytest.raises(ValueError, match="layers"):
        analyze(llama, layers=[5])
    with pytest.raises(ValueError, match="layers=.*integer"):
        analyze(llama, layers=["first"])
    # an iterator of layers is read once: the rows and params["layers_requested"] both see it
    once = analyze(llama, device="cpu", layers=iter([1]), diagnostics={"mlp"}, cheap=True)
    assert {r.layer for r in once.rows} == {1} and once.params["layers_requested"] == [1] == once.params["layers"]


def test_bad_device_is_a_one_line_value_error(llama):
    with pytest.raises(ValueError, match="device='gpu' is not a torch device"):
        analyze(llama, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'.*not available"):
            analyze(llama, device="cuda")


def test_composition_streaming_under_a_tiny_cache_budget(monkeypatch):
    import importlib

    from hf_flag.weights.adapters.base import Adapter

    module = importlib.import_module("hf_flag.analysis.transformer")
    loads = []
    real_block = Adapter.block
    monkeypatch.setattr(Adapter, "block", lambda self, *a, **k: loads.append(a[2]) or real_block(self, *a, **k))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_LIKE, "num_hidden_layers": 4}))
    # full=True: the budget is COMPOSITION_CACHE_BYTES (the default report caps it at one block, issue #11)
    full = analyze(model, device="cpu", diagnostics={"composition"}, composition="all", full=True)
    # packed-Gram path, composition alone (no per-layer pass): one chunk of sources 0..2 + destinations 1..3
    assert len(full.rows) == 3 * 6 * H * H and len(loads) == 3 + 3
    from hf_flag.geometry.composition import packed_gram_bytes

    gram = packed_gram_bytes(H, D)
    for budget, chunk_loads in ((5 * gram, (1 + 3) + (1 + 2) + (1 + 1)),  # Gram path, one source per chunk
                                (6 * gram - 1, (1 + 3) + (1 + 2) + (1 + 1)),
                                (6 * gram, (2 + 3) + (1 + 1)),  # sources {0, 1}, then {2}
                                (7 * gram, 3 + 3),  # all three sources in one chunk
                                (1, (1 + 1) + (1 + 2) + (1 + 3))):  # below 5 Grams: tiled trace form
        loads.clear()
        monkeypatch.setattr(module, "COMPOSITION_CACHE_BYTES", budget)
        streamed = analyze(model, device="cpu", diagnostics={"composition"}, composition="all", full=True)
        assert len(loads) == chunk_loads, budget  # per chunk: its sources, then their destinations
        same_rows(streamed, full, rel=1e-12)


def test_nan_weights_name_tensor_and_layer(llama):
    broken = copy.deepcopy(llama)
    with torch.no_grad():
        broken.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"layer 1.*model\.layers\.1\.self_attn\.o_proj\.weight"):
        analyze(broken, device="cpu")
    assert issubclass(NonFiniteWeightsError, HfFlagError) and issubclass(NonFiniteWeightsError, ValueError)


def test_bf16_storage_precision_policy(tmp_path):
    """bf16 storage: the default report computes in float32, ``full=True`` in float64 (issue #11 precision
    policy); against the same bf16 numbers upcast exactly (float64 storage, float64 compute)."""
    model = build("llama", seed=5).to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    report = analyze(tmp_path, device="cpu", composition="adjacent", full=True)
    default = analyze(tmp_path, device="cpu", composition="adjacent")
    assert report.params["storage_dtypes"] == ["bfloat16"]
    assert report.params["storage_eps"] == 2.0 ** -7 and report.params["dtype"] == "float64"
    assert default.params["dtype"] == "float32"
    check_report(report, {**expected_counts(2, True), **{k: H * H for k in COMPOSITION_KINDS.values()}})
    check_report(default, {**expected_counts(2, True), **{k: H * H for k in COMPOSITION_KINDS.values()}})
    # the same bf16 numbers upcast exactly (in memory, float64 storage) give the same values, tighter tolerance
    upcast = analyze(build("llama", seed=5).to(torch.bfloat16).double(), device="cpu", composition="adjacent",
                     full=True)
    for a, b, c in zip(report.rows, upcast.rows, default.rows):
        if a.kind in PAIR_KINDS:
            assert a.values["commutator_ratio"] == pytest.approx(b.values["commutator_ratio"], rel=1e-10)
            assert a.values["flag_tau"] >= b.values["flag_tau"]  # bf16 eps sets a looser Wedin tolerance
            # float32 compute: within the bf16 storage tolerance of the float64 value
            assert c.values["commutator_ratio"] == pytest.approx(b.values["commutator_ratio"], abs=2.0 ** -7)
            assert c.values["relative_imbalance"] == pytest.approx(b.values["relative_imbalance"], abs=2.0 ** -7)


def test_full_takes_no_float32(tmp_path, capsys):
    """The full analysis computes its pair rows in float64 whatever dtype says (a float32 request changed only
    the head overlaps), so ``full=True, dtype=float32`` is refused (one line, exit 2 from the CLI) instead of being
    recorded as float32; float64 or no dtype is recorded as the float64 it uses, and linear chains keep float32."""
    from hf_flag import cli

    model = build("llama", seed=5)
    with pytest.raises(InputError, match=r"full=True \(--full\) is the all-vectors analysis in float64"):
        analyze(model, device="cpu", full=True, dtype=torch.float32, diagnostics={"mlp"})
    for dtype in (None, torch.float64):
        assert analyze(model, device="cpu", full=True, dtype=dtype, diagnostics={"mlp"}).params["dtype"] == "float64"
    chain = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    assert analyze(chain, full=True, dtype=torch.float32).params["dtype"] == "float32"
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert cli.main(["analyze", str(tmp_path), "--full", "--dtype", "float32"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-flag")]
    assert len(err) == 1 and "float64" in err[0]


def test_residual_pair_takes_the_coarser_storage_of_its_two_blocks(tmp_path):
    """Block 0 stored in float32, block 1 in bfloat16: the residual pair 0 -> 1 (down_0 -> up_1) sets its flag
    tolerance from bf16's eps (MATH.md §4), block 0's own pairs from float32's."""
    from safetensors.torch import save_file

    from hf_flag.geometry.flags import flag_relative_position

    model = build("llama", seed=6)
    with torch.no_grad():  # one dominant singular value each, so both flags have a cut at 1 whose Wedin bound
        for mlp in (model.model.layers[0].mlp.down_proj, model.model.layers[1].mlp.up_proj):  # depends on eps
            u, v = torch.randn(mlp.weight.shape[0], 1), torch.randn(1, mlp.weight.shape[1])
            mlp.weight.copy_(10 * (u / u.norm()) @ (v / v.norm()) + 0.02 * torch.randn_like(mlp.weight))
    state = {k: (v.to(torch.bfloat16) if ".layers.1." in k else v).contiguous() for k, v in model.state_dict().items()
             if "lm_head" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    model.config.save_pretrained(tmp_path)
    report = analyze(tmp_path, device="cpu", diagnostics={"mlp", "residual"})  # float32 compute: rel 1e-4
    rows = {(r.kind, r.layer): r.values for r in report.rows}
    down0 = state["model.layers.0.mlp.down_proj.weight"].double()
    up1 = state["model.layers.1.mlp.up_proj.weight"].double()
    up0 = state["model.layers.0.mlp.up_proj.weight"].double()
    assert rows[KIND_RESIDUAL, 0]["flag_tau"] == pytest.approx(
        flag_relative_position(down0, up1, storage_eps=2.0 ** -7).tau, rel=1e-4)
    assert rows[KIND_MLP, 0]["flag_tau"] == pytest.approx(
        flag_relative_position(up0, down0, storage_eps=torch.finfo(torch.float32).eps).tau, rel=1e-4)
    assert rows[KIND_RESIDUAL, 0]["flag_tau"] > 10 * flag_relative_position(
        down0, up1, storage_eps=torch.finfo(torch.float32).eps).tau  # block 0's eps alone would give this


def test_tied_embeddings_are_fine(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_LIKE, tie_word_embeddings=True))
    model.save_pretrained(tmp_path, safe_serialization=True)
    report = analyze(tmp_path, device="cpu")
    check_report(report, expected_counts(2, True))
    assert report.layout["tied_embeddings"] is True


@pytest.mark.pretrained
def test_minilm_pretrained(minilm_path):
    report = analyze(minilm_path, device="cpu", layers=[0, 5])  # first and last block (no layer 6 to pair with)
    assert report.architecture == "bert" and report.layout["n_layers"] == 6 and report.layout["n_heads"] == 12
    counts = {KIND_MLP: 2, KIND_VO: 24, KIND_RESIDUAL: 1, **{HEAD_OVERLAP_KINDS[s]: 2 * 66 for s in "qkvo"},
              **{k: 144 for k in CROSS_LAYER_KINDS.values()}, **{k: 5 * 144 for k in COMPOSITION_KINDS.values()}}
    check_report(report, counts)
    assert report.summary["head_overlap_o/overlap_baseline"] == pytest.approx(32 / 384)  # d_h / d, MATH.md §6
    # independent read of the file (safetensors directly): bias-augmented mlp pair and vo pair of head 5, layer 5
    from safetensors.torch import load_file

    raw = {k: t.double() for k, t in load_file(str(minilm_path / "model.safetensors")).items()}
    p = "encoder.layer.5."
    W_in = torch.cat([raw[p + "intermediate.dense.weight"], raw[p + "intermediate.dense.bias"][:, None]], 1)
    assert row_of(report, KIND_MLP, 5, "mlp.in", "mlp.out").values["commutator_ratio"] == pytest.approx(
        direct_kappa(W_in, raw[p + "output.dense.weight"]), rel=1e-9)
    rows = slice(5 * 32, 6 * 32)
    W_v = torch.cat([raw[p + "attention.self.value.weight"][rows], raw[p + "attention.self.value.bias"][rows, None]], 1)
    assert row_of(report, KIND_VO, 5, "head 5", "head 5").values["commutator_ratio"] == pytest.approx(
        direct_kappa(W_v, raw[p + "attention.output.dense.weight"][:, rows]), rel=1e-9)


@pytest.mark.pretrained
def test_smollm2_gguf_pretrained(smollm2_gguf):
    report = analyze(smollm2_gguf, device="cpu", layers=[0], composition="adjacent")
    lay = report.layout
    assert (lay["n_layers"], lay["n_heads"], lay["n_kv_heads"], lay["head_dim"]) == (30, 9, 3, 64)
    H9, G = 9, 3
    counts = {KIND_MLP: 1, KIND_MLP_GATE: 1, KIND_VO: 9, KIND_RESIDUAL: 1,
              HEAD_OVERLAP_KINDS["q"]: 36, HEAD_OVERLAP_KINDS["o"]: 36, HEAD_OVERLAP_KINDS["k"]: 3,
              HEAD_OVERLAP_KINDS["v"]: 3, CROSS_LAYER_KINDS["q"]: H9 * H9, CROSS_LAYER_KINDS["k"]: H9 * G,
              CROSS_LAYER_KINDS["v"]: H9 * G, **{k: H9 * H9 for k in COMPOSITION_KINDS.values()}}
    check_report(report, counts)
    assert report.params["storage_eps"] > 1e-3  # Q4_1 quantisation, not float32
    # vo pair of query head 4 (KV head 1 of 3) straight from the dequantised tensors, our own slicing
    from hf_flag.weights.sources import open_weights

    with open_weights(smollm2_gguf) as source:
        v = source.get("model.layers.0.self_attn.v_proj.weight", dtype=torch.float64)
        o = source.get("model.layers.0.self_attn.o_proj.weight", dtype=torch.float64)
    # float32 compute for 4-bit storage (issue #11 policy: tolerance eps_s = 1/16; float32 gives ~1e-7)
    assert row_of(report, KIND_VO, 0, "head 4", "head 4").values["commutator_ratio"] == pytest.approx(
        direct_kappa(v[64:128], o[:, 256:320]), rel=1e-5)
