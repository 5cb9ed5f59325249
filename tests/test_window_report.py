"""The default report's windowed pair rows against the full analysis and dense references, on real weights
(MiniLM: float32 storage; SmolLM2: Q4_1 storage) (MATH.md §2-§4; hf_flag.geometry.spectral; issue #11)."""
import pytest
import torch

from hf_flag.analysis.api import analyze
from hf_flag.geometry.pairs import transport_scores
from hf_flag.geometry.spectral import K_MAX

EXACT = ("commutator_ratio", "commutator_ratio_baseline", "commutator_ratio_normalized_baseline", "imbalance_norm",
         "imbalance_norm_baseline", "relative_imbalance", "relative_imbalance_baseline", "imbalance_diagonal_norm")
CERTIFICATE = ("window_in", "window_out", "svd_residual_in", "svd_residual_out")


def rows_by_key(report):
    return {(r.kind, r.layer, r.source): r for r in report.rows}


@pytest.mark.parametrize("which", ["minilm", "smollm2"])
def test_window_rows_keep_the_exact_values_of_the_full_analysis(which, request):
    path = request.getfixturevalue("minilm_path" if which == "minilm" else "smollm2_gguf")
    kw = dict(layers=[0], diagnostics=["mlp", "vo", "residual"])
    full, window = analyze(path, full=True, **kw), analyze(path, **kw)
    assert full.params["dtype"] == "float64" and window.params["dtype"] == "float32"
    assert full.params["full"] is True and window.params["window_rule"]
    eps = 2.0 ** -4 if which == "smollm2" else torch.finfo(torch.float32).eps
    tol = max(eps, 1e-6)  # float32 storage: Grams in float64, so float32 rounding only; Q4: the storage tolerance
    f, w = rows_by_key(full), rows_by_key(window)
    assert f.keys() == w.keys() and len(f) > 3
    for key, row in f.items():
        for metric in EXACT:
            assert w[key].values[metric] == pytest.approx(row.values[metric], rel=tol, abs=tol), (key, metric)
        assert all(m not in row.values for m in CERTIFICATE)
        win = w[key].values
        assert all(isinstance(win[m], float) for m in CERTIFICATE)
        assert 0 <= win["window_in"] <= K_MAX and 0 <= win["window_out"] <= K_MAX
        assert max(win["svd_residual_in"], win["svd_residual_out"]) <= max(eps / 100, 1e-4)
    if which == "minilm":  # float32 storage determines the 64 leading vectors of every MLP weight
        assert w[("mlp", 0, "mlp.in")].values["window_in"] == K_MAX
    else:  # 4-bit storage determines at most a few leading directions
        assert all(r.values["window_in"] <= 4 for r in window.rows if r.kind in ("mlp", "mlp_gate"))


def test_minilm_window_transport_matches_a_dense_svd(minilm_path):
    from safetensors.torch import load_file

    t = load_file(str(minilm_path / "model.safetensors"))
    prefix = next(k for k in t if k.endswith("layer.0.intermediate.dense.weight")).removesuffix(
        "intermediate.dense.weight")
    W_in = torch.cat([t[prefix + "intermediate.dense.weight"], t[prefix + "intermediate.dense.bias"][:, None]], 1)
    W_out = t[prefix + "output.dense.weight"]
    row = rows_by_key(analyze(minilm_path, layers=[0], diagnostics=["mlp"]))[("mlp", 0, "mlp.in")]
    k = row.details["transport_k"]
    assert 1 <= k <= K_MAX
    subspace, basis = transport_scores(W_in.double(), W_out.double(), k)
    # float32 singular vectors of float32-stored weights: the cosines agree to ~1e-6 (determined cuts)
    assert row.values["subspace_score"] == pytest.approx(float(subspace), abs=1e-4)
    if row.values["basis_score"] is not None:
        assert row.values["basis_score"] == pytest.approx(float(basis), abs=1e-4)


def test_each_mlp_weight_gram_is_computed_once(tiny_llama, monkeypatch):
    """The default report shares Grams across pairs: per block ``W_down W_down^T`` (mlp, mlp_gate, residual),
    ``W_up^T W_up`` (mlp, previous residual), ``W_gate^T W_gate`` (mlp_gate): 3 per layer; and the partial SVD
    of each MLP weight once, on that shared Gram."""
    import hf_flag.analysis.pairs as analysis_pairs
    import hf_flag.analysis.transformer as transformer
    import hf_flag.geometry.pairs as pairs

    calls, real = [], pairs.weight_gram

    def counting(W, side, *, dtype):
        calls.append((tuple(W.shape), side))
        return real(W, side, dtype=dtype)

    svds, real_svd = [], analysis_pairs.window_svd

    def counting_svd(W, storage_eps, gram=None, gram_eigh=None):
        svds.append((tuple(W.shape), gram is not None))
        return real_svd(W, storage_eps, gram=gram, gram_eigh=gram_eigh)

    for module in (pairs, analysis_pairs):  # shared (analysis.pairs.PairGrams) and unshared (gram_pair_values) Grams
        monkeypatch.setattr(module, "weight_gram", counting)
    cuts, real_cut = [], analysis_pairs.gram_cut

    def counting_cut(G, rtol, *, top=None):
        cuts.append(tuple(G.shape))
        return real_cut(G, rtol, top=top)

    for module in (analysis_pairs, transformer):
        monkeypatch.setattr(module, "window_svd", counting_svd)
    monkeypatch.setattr(analysis_pairs, "gram_cut", counting_cut)
    report = analyze(tiny_llama, device="cpu", diagnostics={"mlp", "residual"})
    assert len(report.rows) == 2 + 2 + 1  # mlp and mlp_gate per layer, one residual pair
    mlp = [c for c in calls if 48 in c[0][1:]]  # d_ff = 48
    assert sorted(mlp) == sorted([((1, 32, 48), "rows"), ((1, 48, 32), "cols"), ((1, 48, 32), "cols")] * 2)
    # the rank cuts (and Cholesky factors) of those Grams, once each: W_down W_down^T serves the mlp and mlp_gate
    # range_overlap and the residual pair's reading (full rank: W_up's side is not needed for it)
    assert cuts == [(1, 32, 32)] * 6
    assert [r.details["commutator_reading_holds"] for r in report.rows if r.kind == "residual"] == [True]
    # each MLP weight's window SVD runs once, on the small Gram kappa's pairs share (no fourth Gram per block)
    assert sorted(s for s in svds if 48 in s[0][1:]) == sorted([((1, 32, 48), True), ((1, 48, 32), True),
                                                                ((1, 48, 32), True)] * 2)


def test_each_small_gram_is_diagonalised_once_for_the_window_and_range_overlap(monkeypatch):
    """Where a window SVD diagonalises an MLP weight's small Gram (``K_MAX + 1 < r <= DENSE_GRAM_MAX``) and that
    Gram is not full at the rank cut, range_overlap's kept eigenvectors reuse that eigendecomposition: one ``eigh``
    per MLP weight, and the same values as when range_overlap diagonalises the Gram itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_flag.analysis.pairs as analysis_pairs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=80, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # rank 70 < d = 80: W^T W is not full at any cut
            mlp = layer.mlp
            mlp.up_proj.weight.copy_(torch.randn(160, 70) @ torch.randn(70, 80) / 80)
            mlp.gate_proj.weight.copy_(torch.randn(160, 70) @ torch.randn(70, 80) / 80)
    model = model.to(torch.bfloat16)
    real = torch.linalg.eigh
    shapes = []

    def counting(G, *args, **kwargs):
        shapes.append(tuple(G.shape))
        return real(G, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    shared = analyze(model, device="cpu", diagnostics={"mlp"})
    assert shapes.count((1, 80, 80)) == 3 * 2  # up, gate, down per layer, once each
    monkeypatch.setattr(analysis_pairs.PairGrams, "cached_eigh", lambda self, *args: None)
    alone = analyze(model, device="cpu", diagnostics={"mlp"})
    # again the 6 windows, and each pair's range_overlap diagonalises its rank-deficient up/gate Gram once more
    # (W_down is full at the cut: its Cholesky factor serves)
    assert shapes.count((1, 80, 80)) == 3 * 2 + 3 * 2 + 2 * 2
    for a, b in zip(shared.rows, alone.rows):
        assert a.values["range_overlap"] == pytest.approx(b.values["range_overlap"], rel=1e-6)
        assert a.values["range_overlap"] < 1  # the ranks are cut: 70 of 80 directions kept
    ranks = {r.values["range_overlap_baseline"] for r in shared.rows}
    assert ranks == {80 / 160}  # max(r_l, r_next) / n with r_next = rank W_down = 80 > 70


def test_composition_auto_picks_all_pairs_only_where_the_estimate_is_small():
    """The estimate against hand counts (layer pairs, 3 H^2 rows each, 3 H^2 d(d+1)/2 multiply-adds each) and
    the auto choice at MiniLM, SmolLM2-135M and Llama-7B shapes."""
    from hf_flag.analysis.heads import composition_estimate

    est = composition_estimate(6, 12, 384, list(range(6)))  # MiniLM
    assert est["all"]["layer_pairs"] == 15 and est["adjacent"]["layer_pairs"] == 5
    assert est["all"]["rows"] == 15 * 3 * 144 and est["all"]["macs"] == 15 * 3 * 144 * 384 * 385 / 2
    assert est["auto"] == "all"
    assert composition_estimate(30, 9, 576, list(range(30)))["auto"] == "adjacent"  # SmolLM2-135M
    llama = composition_estimate(32, 32, 4096, list(range(32)))
    assert llama["auto"] == "adjacent" and llama["adjacent"]["layer_pairs"] == 31
    shard = composition_estimate(30, 9, 576, [29])  # a last-layer shard scores nothing, but decides as the model
    assert shard["all"]["layer_pairs"] == 0 and shard["auto"] == "adjacent"


def test_window_report_range_overlap_on_mlp_pairs_equals_the_full_report(tiny_llama):
    """The default report reads range_overlap (MATH.md §3) from Grams on the pairs where kappa does not read, and it
    equals the full report's (singular-vector) value; on pairs whose kappa reads it is left to --full."""
    window = analyze(tiny_llama, device="cpu", diagnostics={"mlp", "vo", "residual"})
    full = analyze(tiny_llama, device="cpu", diagnostics={"mlp", "vo", "residual"}, full=True)
    ref = {(r.kind, r.layer, r.source): r for r in full.rows}
    for row in window.rows:
        value = row.values["range_overlap"]
        if row.kind in ("mlp", "mlp_gate"):
            assert row.details["commutator_reading_holds"] is False
            expected = ref[(row.kind, row.layer, row.source)].values
            assert value == pytest.approx(expected["range_overlap"], abs=1e-5)
            assert row.values["range_overlap_baseline"] == pytest.approx(expected["range_overlap_baseline"], abs=1e-12)
        else:
            assert value is None and row.details["commutator_reading_holds"] is True


def test_range_overlap_is_reported_where_a_residual_pair_kappa_does_not_read():
    """A residual pair whose two weights are both below rank n = d (MATH.md §3: kappa does not read) gets the
    range overlap in the default report, equal to the float64 thin-SVD form (``range_overlap_from_svd``); a
    residual pair with a full-rank weight keeps ``None`` (kappa reads there)."""
    from tests.conftest import make_tiny_llama

    from hf_flag.geometry.pairs import range_overlap_from_svd

    model = make_tiny_llama(seed=3)
    torch.manual_seed(3)
    with torch.no_grad():  # rank 28 < d = 32 for layer 0's down projection and layer 1's up projection
        model.model.layers[0].mlp.down_proj.weight.copy_(torch.randn(32, 28) @ torch.randn(28, 48) / 8)
        model.model.layers[1].mlp.up_proj.weight.copy_(torch.randn(48, 28) @ torch.randn(28, 32) / 8)
    report = analyze(model, device="cpu", diagnostics={"residual"})
    (row,) = report.select(kind="residual")
    assert row.details["commutator_reading_holds"] is False
    W_l = model.model.layers[0].mlp.down_proj.weight.detach().double()
    W_next = model.model.layers[1].mlp.up_proj.weight.detach().double()
    U, s_l, _ = torch.linalg.svd(W_l, full_matrices=False)
    _, s_next, Vh = torch.linalg.svd(W_next, full_matrices=False)
    overlap, baseline = range_overlap_from_svd(Vh @ U, s_l, s_next, 32, rtol=(1e-6, 1e-6))
    assert row.values["range_overlap"] == pytest.approx(float(overlap), rel=1e-5, abs=1e-6)
    assert row.values["range_overlap_baseline"] == pytest.approx(float(baseline), rel=1e-12)
    assert float(baseline) == 28 / 32
    full_rank = analyze(make_tiny_llama(seed=3), device="cpu", diagnostics={"residual"}).select(kind="residual")
    assert full_rank[0].details["commutator_reading_holds"] is True
    assert full_rank[0].values["range_overlap"] is None


def test_full_and_default_reports_cut_ranks_at_the_same_storage_precision():
    """bf16 weights of rank 12 plus rounding-level noise (n = 32): at the MATH.md §1 storage cut both weights have
    rank 12, so kappa does not read and range_overlap reads the two 12-dim ranges.  The full report (float64
    upcast) must cut at the storage precision too: at float64's cut the noise would count as rank 32 and the
    overlap would be a trivial 1 against a baseline of 1."""
    from hf_flag.analysis.pairs import pair_rows

    torch.manual_seed(0)

    def low_rank(a: int, b: int) -> torch.Tensor:
        return (torch.randn(a, 12) @ torch.randn(12, b) / 12 + 1e-4 * torch.randn(a, b)).bfloat16()

    W_l, W_next = low_rank(32, 64), low_rank(64, 32)
    eps = torch.finfo(torch.bfloat16).eps
    rows = {}
    for full, dtype in ((True, torch.float64), (False, torch.float32)):
        (rows[full],) = pair_rows("x", "residual", [(0, 1, "a", "b")], W_l.to(dtype)[None], None,
                                  W_next.to(dtype)[None], activation="identity", cheap=False, storage_eps=eps,
                                  window=not full)
    for row in rows.values():
        assert row.details["commutator_reading_holds"] is False
        assert row.values["range_overlap_baseline"] == pytest.approx(12 / 32)
    assert rows[True].values["range_overlap"] == pytest.approx(rows[False].values["range_overlap"], rel=1e-5)
    assert rows[True].values["range_overlap"] < 0.9


WINDOWED = ("subspace_score", "basis_score", "intersection_soft")


def assert_window_values_within_stated_tolerance(path) -> dict:
    """Every value the float32 default report reads from windows (transport scores, flag cuts, soft and hard
    counts, windows) equals the float64 default report's (the same rule on float64 singular vectors) within the
    tolerance the row states (``details["tolerance"]``, spectral.transport_tolerances / soft_tolerance); returns
    the largest difference per value."""
    kw = dict(diagnostics=["mlp", "vo", "residual"])
    low, high = analyze(path, **kw), analyze(path, dtype=torch.float64, **kw)
    assert low.params["dtype"] == "float32" and high.params["dtype"] == "float64"
    ref = rows_by_key(high)
    assert ref.keys() == rows_by_key(low).keys()
    largest = dict.fromkeys(WINDOWED, 0.0)
    for row in low.rows:
        other = ref[(row.kind, row.layer, row.source)]
        for key in ("transport_k", "cuts_left", "cuts_right", "intersection_cut", "rank_matrix"):
            assert row.details[key] == other.details[key], (row.kind, row.layer, row.source, key)
        for metric in ("window_in", "window_out", "intersection_dim"):
            assert row.values[metric] == other.values[metric], (row.kind, row.layer, row.source, metric)
        tolerance = row.details["tolerance"]
        for metric in WINDOWED:
            value, exact = row.values[metric], other.values[metric]
            assert (value is None) == (exact is None) == (metric not in tolerance), (row.kind, row.layer, metric)
            if value is not None:
                # the rule bounds each read cut's computation by MAX_TAU: tolerances stay well below the values' range
                assert tolerance[metric] <= 0.5
                assert abs(value - exact) <= tolerance[metric], (row.kind, row.layer, row.source, metric)
                largest[metric] = max(largest[metric], abs(value - exact))
        if row.values["flag_tau"] is not None:  # 10 eps sigma_1 / gap: float32 values move gaps by ~1e-6 relative
            assert row.values["flag_tau"] == pytest.approx(other.values["flag_tau"], rel=1e-4)
    return largest


def test_minilm_vo_transport_cut_with_a_tiny_gap_reads_float64_values(minilm_path):
    """Review s5 item 15: layer 4 head 9's W_O has gap 4.4e-6 sigma_1 at transport cut 16; float32 residuals (~1e-6)
    bound that subspace only to ~0.34 rad, so the float32 report read subspace_score 0.473868 against 0.473733 in
    float64.  The cut is now computed in float64: the value is within its stated tolerance of float64's, and that
    tolerance is small (with the 0.34 rad bound it would be sqrt(2/16) 0.34 = 0.12)."""
    kw = dict(layers=[4], diagnostics=["vo"])
    low = rows_by_key(analyze(minilm_path, **kw))[("vo", 4, "head 9")]
    high = rows_by_key(analyze(minilm_path, dtype=torch.float64, **kw))[("vo", 4, "head 9")]
    assert low.details["transport_k"] == high.details["transport_k"] == 16
    assert high.values["subspace_score"] == pytest.approx(0.473733, abs=1e-6)
    tolerance = low.details["tolerance"]["subspace_score"]
    assert tolerance < 1e-3
    assert abs(low.values["subspace_score"] - high.values["subspace_score"]) <= tolerance
    assert low.values["svd_residual_out"] < 1e-12  # W_O's window was recomputed in float64


def test_minilm_window_values_agree_with_float64_within_stated_tolerance(minilm_path):
    largest = assert_window_values_within_stated_tolerance(minilm_path)
    assert largest["subspace_score"] > 0  # float32 and float64 vectors do differ: the comparison is not vacuous


@pytest.mark.slow
def test_smollm2_window_values_agree_with_float64_within_stated_tolerance(smollm2_gguf):
    assert_window_values_within_stated_tolerance(smollm2_gguf)
