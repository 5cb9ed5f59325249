"""evaluate modules: offline bare-name loading, outputs equal to hf_flag.analyze, Neural Collapse closed forms."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

evaluate = pytest.importorskip("evaluate")

import hf_flag.integrations.evaluate_modules as em  # noqa: E402
from hf_flag.integrations.evaluate_modules import (  # noqa: E402
    FLAG_ALIGNMENT_PATH, MODULES, NEURAL_COLLAPSE_PATH, register_evaluate_modules, register_main)

REPO = Path(__file__).resolve().parents[2]

SITECUSTOMIZE = '''
import socket

def _no_network(*args, **kwargs):
    raise OSError("network disabled by the test's sitecustomize")

socket.socket.connect = _no_network
socket.socket.connect_ex = _no_network
socket.create_connection = _no_network
'''

CHILD = '''
import json, socket, sys
try:
    socket.create_connection(("127.0.0.1", 9))
    blocked = False
except OSError as err:
    blocked = "disabled" in str(err)
from hf_flag.integrations.evaluate_modules import hf_modules_cache
ours = str(hf_modules_cache())  # resolved from the environment, before evaluate is imported
import hf_flag  # registers the shims
import evaluate
flag = evaluate.load("flag_alignment")
nc = evaluate.load("neural_collapse")
out = flag.compute(model_id=[sys.argv[1]], cheap=True)
feats = [[1.0, 0.5], [1.2, 0.4], [-1.0, 0.3], [-0.9, -0.2], [0.1, 2.0], [0.0, 1.7]]
ncout = nc.compute(predictions=feats, references=[0, 0, 1, 1, 2, 2])
print("RESULT" + json.dumps({
    "blocked": blocked, "ours": ours, "evaluate_cache": str(evaluate.config.HF_MODULES_CACHE),
    "flag_class": type(flag).__module__ + "." + type(flag).__name__,
    "nc_class": type(nc).__module__ + "." + type(nc).__name__,
    "module_type": flag.module_type, "summary": out["summary"], "headline": {k: out[k] for k in out if "/" in k},
    "nc": ncout}))
'''


def test_bare_name_load_offline_in_fresh_process(tmp_path, tiny_checkpoint):
    from hf_flag.analysis.api import analyze
    from hf_flag.geometry.collapse import neural_collapse

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    home = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HF_HOME=str(home), HF_MODULES_CACHE=str(home / "mods"), HF_EVALUATE_CACHE=str(home / "eval"),
               HF_EVALUATE_OFFLINE="1", HF_HUB_OFFLINE="1", HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_checkpoint)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "remotely" not in proc.stderr and "couldn't be found" not in proc.stderr, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["blocked"]
    assert res["ours"] == res["evaluate_cache"] == str(home / "mods")
    assert res["flag_class"] == "hf_flag.integrations.evaluate_modules.flag_alignment.flag_alignment.FlagAlignment"
    assert res["nc_class"] == "hf_flag.integrations.evaluate_modules.neural_collapse.neural_collapse.NeuralCollapse"
    assert res["module_type"] == "measurement"
    assert list((home / "mods" / "evaluate_modules" / "metrics").glob("evaluate-measurement--flag_alignment/*/*.py"))
    expected = analyze(str(tiny_checkpoint), cheap=True).summary
    assert res["summary"] and res["headline"]
    _same(res["summary"], expected)
    _same(res["headline"], {k: expected.get(k) for k in res["headline"]})  # cheap: baselines None
    feats = torch.tensor([[1.0, 0.5], [1.2, 0.4], [-1.0, 0.3], [-0.9, -0.2], [0.1, 2.0], [0.0, 1.7]],
                         dtype=torch.float64)
    ref = neural_collapse(feats, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert res["nc"] == pytest.approx(ref, rel=1e-12)


# --- registration ---------------------------------------------------------------------------------------------------
def test_register_writes_where_evaluate_reads(tmp_path):
    from evaluate.loading import CachedEvaluationModuleFactory

    written = register_evaluate_modules(modules_cache=tmp_path)
    assert set(written) == set(MODULES) == {"flag_alignment", "neural_collapse"}
    for name, (module_type, cls) in MODULES.items():
        shim = Path(written[name])
        assert f"from hf_flag.integrations.evaluate_modules.{name}.{name} import {cls}" in shim.read_text()
        found = CachedEvaluationModuleFactory(f"evaluate-{module_type}--{name}",
                                              dynamic_modules_path=str(tmp_path / "evaluate_modules")).get_module()
        assert found.module_path == f"evaluate_modules.metrics.evaluate-{module_type}--{name}.{shim.parent.name}.{name}"
        assert found.hash == shim.parent.name
    assert not [p for p in (tmp_path / "evaluate_modules" / "metrics").rglob(".tmp-*")]


def test_register_is_idempotent_and_force_rewrites(tmp_path):
    first = register_evaluate_modules(modules_cache=tmp_path)
    stat = {n: os.stat(p) for n, p in first.items()}
    assert register_evaluate_modules(modules_cache=tmp_path) == first
    assert all(os.stat(p).st_ino == stat[n].st_ino for n, p in first.items())
    forced = register_evaluate_modules(force=True, modules_cache=tmp_path)
    assert forced == first and all(os.stat(p).st_ino != stat[n].st_ino for n, p in forced.items())


def test_register_rewrites_when_another_version_is_newer(tmp_path):
    first = Path(register_evaluate_modules(modules_cache=tmp_path)["flag_alignment"])
    stale = first.parent.parent / ("0" * 64)
    stale.mkdir()
    (stale / "flag_alignment.py").write_text("raise ImportError('stale')\n")
    os.utime(stale / "flag_alignment.py", (first.stat().st_mtime + 100,) * 2)
    again = Path(register_evaluate_modules(modules_cache=tmp_path)["flag_alignment"])
    assert again == first and again.stat().st_mtime > (stale / "flag_alignment.py").stat().st_mtime - 100
    from evaluate.loading import CachedEvaluationModuleFactory
    os.utime(stale / "flag_alignment.py", (again.stat().st_mtime - 10,) * 2)
    found = CachedEvaluationModuleFactory("evaluate-measurement--flag_alignment",
                                          dynamic_modules_path=str(tmp_path / "evaluate_modules")).get_module()
    assert found.hash == first.parent.name


def test_unwritable_cache_warns_once_and_cli_fails(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(em, "hf_modules_cache", lambda: blocker / "cache")
    monkeypatch.setattr(em, "_warned", False)
    monkeypatch.delenv("HF_FLAG_NO_REGISTER", raising=False)
    with pytest.warns(RuntimeWarning, match="could not register"):
        em.register_at_import()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        em.register_at_import()  # warned once already: silent
    assert register_main([]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_notice_filter_drops_only_our_modules_notice():
    import logging

    em.quiet_cached_module_notice()
    logger = logging.getLogger(em.EVALUATE_LOADING_LOGGER)
    assert logger.filters.count(em.NOTICE_FILTER) == 1
    em.quiet_cached_module_notice()
    assert logger.filters.count(em.NOTICE_FILTER) == 1  # idempotent

    def passes(message: str) -> bool:
        return bool(logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 0, message, None, None)))
    notice = ("Using the latest cached version of the module from /c/evaluate_modules/metrics/{}/abc (last modified "
              "on X) since it couldn't be found locally at {}, or remotely on the Hugging Face Hub.")
    for name in MODULES:
        assert not passes(notice.format(em.module_folder(name), em.module_folder(name)))
    assert passes(notice.format("evaluate-metric--accuracy", "evaluate-metric--accuracy"))  # someone else's module
    assert passes("Couldn't find flag_alignment: another warning stays")


def test_register_main_prints_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(em, "hf_modules_cache", lambda: tmp_path)
    assert register_main(["--force"]) == 0
    out = capsys.readouterr().out
    for name in MODULES:
        assert f"{name}: {tmp_path}" in out


def test_modules_cache_resolution_without_evaluate(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "evaluate.config", raising=False)
    monkeypatch.delenv("HF_MODULES_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert em.hf_modules_cache() == tmp_path / "home" / "modules"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert em.hf_modules_cache() == tmp_path / "xdg" / "huggingface" / "modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "m"))
    assert em.hf_modules_cache() == tmp_path / "m"


# --- flag_alignment ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flag_module():
    return evaluate.load(FLAG_ALIGNMENT_PATH, keep_in_memory=True)


def _same(got: dict, expected: dict) -> None:
    """Equal keys; equal values to 1e-12 relative (None stays None)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert (got[key] is None) if value is None else got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def _assert_matches_report(out, report):
    from hf_flag.rows import HEADLINE_METRICS

    _same(out["summary"], report.summary)
    headline = [k for k in HEADLINE_METRICS if k in report.summary]
    assert headline
    _same({k: out[k] for k in headline}, {k: report.summary[k] for k in headline})
    assert sum(len(v) for v in out["per_layer"].values()) == len(report.rows)
    for row in report.rows[:20]:
        match = [r for r in out["per_layer"][row.kind] if (r["layer"], r["target_layer"], r["source"], r["target"])
                 == (row.layer, row.target_layer, row.source, row.target)]
        assert len(match) == 1
        _same({k: match[0][k] for k in row.values}, row.values)


def test_flag_alignment_model_id_equals_analyze(flag_module, tiny_checkpoint):
    from hf_flag.analysis.api import analyze

    out = flag_module.compute(model_id=[str(tiny_checkpoint)], layers=[0], composition="adjacent")
    _assert_matches_report(out, analyze(str(tiny_checkpoint), layers=[0], composition="adjacent"))
    assert "mlp/commutator_ratio" in out and "mlp/commutator_ratio_baseline" in out


def test_flag_alignment_says_where_kappa_reads(flag_module, tiny_checkpoint, tiny_llama):
    """Kappa reads as alignment only where one weight of the pair has rank n (MATH.md §3): not on the MLP pairs
    (n = d_ff above both ranks), on the vo and residual pairs of the tiny Llama (full-rank weights)."""
    from hf_flag.geometry.pairs import commutator_reading_holds

    out = flag_module.compute(model_id=str(tiny_checkpoint), diagnostics=["mlp", "vo", "residual"])
    mlp = tiny_llama.model.layers[0].mlp
    d_ff, d = mlp.up_proj.weight.shape
    expected_mlp = commutator_reading_holds(int(torch.linalg.matrix_rank(mlp.down_proj.weight.double())),
                                            int(torch.linalg.matrix_rank(mlp.up_proj.weight.double())), d_ff)
    assert out["commutator_reading_holds"] == {"mlp": expected_mlp, "mlp_gate": expected_mlp, "vo": True,
                                               "residual": True}
    assert expected_mlp is False
    assert all(r["commutator_reading_holds"] is False for r in out["per_layer"]["mlp"])
    assert all(r["commutator_reading_holds"] is True for r in out["per_layer"]["residual"])


def test_flag_alignment_one_model_id_as_a_string(flag_module, tiny_checkpoint):
    """``model_id="path"`` is one model (evaluate alone would split the string into characters)."""
    one = flag_module.compute(model_id=str(tiny_checkpoint), layers=[0], cheap=True)
    assert one == flag_module.compute(model_id=[str(tiny_checkpoint)], layers=[0], cheap=True)
    assert "mlp/commutator_ratio" in one


def test_flag_alignment_in_memory_model_and_several_ids(flag_module, tiny_llama, tiny_checkpoint):
    from hf_flag.analysis.api import analyze

    out = flag_module.compute(model=tiny_llama, cheap=True)
    _assert_matches_report(out, analyze(tiny_llama, cheap=True))
    both = flag_module.compute(model_id=[str(tiny_checkpoint), str(tiny_checkpoint)], cheap=True)
    assert len(both["model"]) == 2 and both["model"][0] == both["model"][1]
    assert both["mlp/commutator_ratio"] == pytest.approx([out["mlp/commutator_ratio"]] * 2, rel=1e-12)
    assert len(both["per_layer"]) == 2 and both["per_layer"][0].keys() == out["per_layer"].keys()
    with pytest.raises(ValueError, match="either model_id"):
        flag_module.compute(model=tiny_llama, model_id=[str(tiny_checkpoint)])


def test_flag_alignment_plain_mlp_linear_chain(flag_module):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    out = flag_module.compute(model=net, cheap=True)
    W1 = torch.cat([net[0].weight, net[0].bias[:, None]], 1).double().detach()
    W2 = net[2].weight.double().detach()
    A, B = W2.T @ W2, W1 @ W1.T
    kappa = torch.linalg.matrix_norm(A @ B - B @ A) / (torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B))
    assert out["linear_chain/commutator_ratio"] == pytest.approx(float(kappa), rel=1e-10)
    assert out["per_layer"]["linear_chain"][0]["imbalance_norm"] == pytest.approx(
        float(torch.linalg.matrix_norm(A - B)), rel=1e-10)
    # each beside its Haar RMS over rotations of the hidden basis (MATH.md §2, §3), per layer and in the summary
    row = out["per_layer"]["linear_chain"][0]
    rms = math.sqrt(float(A.square().sum() + B.square().sum() - 2 * A.trace() * B.trace() / 16))
    assert row["imbalance_norm_baseline"] == pytest.approx(rms, rel=1e-10)
    assert row["relative_imbalance_baseline"] == pytest.approx(
        rms / float(torch.linalg.matrix_norm(A) + torch.linalg.matrix_norm(B)), rel=1e-10)
    assert row["commutator_ratio_normalized_baseline"] == pytest.approx(
        math.sqrt(2) * row["commutator_ratio_baseline"], rel=1e-15)
    assert out["summary"]["linear_chain/imbalance_norm_baseline"] == row["imbalance_norm_baseline"]


# --- neural_collapse ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nc_module():
    return evaluate.load(NEURAL_COLLAPSE_PATH, keep_in_memory=True)


def _etf(C: int, p: int, seed: int = 0) -> np.ndarray:
    """C unit-norm simplex-ETF class means (rows) embedded in R^p by a random orthonormal map."""
    E = np.eye(C) - 1.0 / C
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((p, C)))
    return E @ Q.T


def test_exact_simplex_etf_gives_zeros(nc_module):
    C, p, n = 4, 6, 5
    M = _etf(C, p)
    labels = np.repeat(np.arange(C), n)
    out = nc_module.compute(predictions=M[labels].tolist(), references=labels.tolist(), classifier=M)
    for key in ("nc1_covariance_pinv", "nc1_covariance_ratio", "nc1_variability_cdnv", "nc2_mean_norms_cv",
                "nc2_interference_std", "nc2_interference_error", "nc2_simplex_etf_error", "nc2_classifier_etf_error",
                "nc3_self_duality", "nc3_self_duality_error", "level2_subspace_error", "level2_max_angle",
                "level3_kappa"):
        assert abs(out[key]) < 1e-10, key
    assert out["nc4_clf_ncc_agreement"] == 1.0


def test_etf_plus_noise_nc1_closed_form(nc_module):
    C, p, n, s = 4, 6, 1000, 0.1
    M = _etf(C, p)
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(C), n)
    H = M[labels] + s * rng.standard_normal((C * n, p))
    out = nc_module.compute(predictions=H, references=labels)
    assert out["nc1_covariance_pinv"] == pytest.approx(s**2 * (C - 1) ** 2 / C, rel=0.05)
    assert "nc3_self_duality" not in out  # classifier-side keys only with a classifier


def test_add_batch_then_compute_with_classifier(nc_module):
    C, p = 3, 5
    M = _etf(C, p, seed=2)
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(C), [12, 20, 28])  # unbalanced: the global mean is not the mean of the means
    H = M[labels] + 0.05 * rng.standard_normal((len(labels), p))
    for i in range(0, len(labels), 16):
        nc_module.add_batch(predictions=H[i:i + 16], references=labels[i:i + 16])
    W = M + 0.01 * rng.standard_normal(M.shape)
    out = nc_module.compute(classifier=W)
    from hf_flag.geometry.collapse import neural_collapse
    ref = neural_collapse(torch.tensor(H), torch.tensor(labels), torch.tensor(W))
    assert {k: out[k] for k in ref} == pytest.approx(ref, rel=1e-12)
    # Level-2 / Level-3 from the module's own class means, against numpy closed forms (MATH.md §5, §1):
    # M^T = class means - global mean (rank C-1), error = 1 - ||Q_W^T Q_M||_F^2 / (C-1), angles = arccos(svd)
    Mr = np.stack([H[labels == c].mean(0) for c in range(C)]) - H.mean(0)
    QW = np.linalg.qr(W.T)[0]
    QM = np.linalg.svd(Mr.T, full_matrices=False)[0][:, :C - 1]
    cosines = np.linalg.svd(QW.T @ QM, compute_uv=False)
    assert out["level2_subspace_error"] == pytest.approx(1 - (cosines ** 2).sum() / (C - 1), rel=1e-9, abs=1e-12)
    assert out["level2_max_angle"] == pytest.approx(math.acos(min(cosines.min(), 1.0)), rel=1e-6)
    self_duality = np.linalg.norm(W.T / np.linalg.norm(W) - Mr.T / np.linalg.norm(Mr)) ** 2
    assert out["nc3_self_duality"] == pytest.approx(self_duality, rel=1e-10)
    assert out["level2_subspace_error"] > 1e-6  # noisy W: the checks above compare non-trivial values


def test_weight_only_mode(nc_module):
    M = _etf(5, 7, seed=4)
    out = nc_module.compute(classifier=M)
    assert set(out) == {"nc2_classifier_norms_cv", "nc2_classifier_interference_std",
                        "nc2_classifier_interference_error", "nc2_classifier_etf_error"}
    assert all(abs(v) < 1e-12 for v in out.values())
    # a classifier rotated inside span(M): Level-2 holds (angle ~ 0) but Level-3 does not (NC3 > 0), MATH.md §5
    G = np.linalg.qr(np.random.default_rng(5).standard_normal((5, 5)))[0]
    W = G @ M
    out = nc_module.compute(classifier=W, class_means=M)
    assert out["level2_max_angle"] < 1e-7 and out["level2_subspace_error"] < 1e-12
    assert out["nc3_self_duality"] > 0.1
    w_norms = np.linalg.norm(np.array([[1.0, 0.0], [0.0, 3.0]]), axis=1)
    out = nc_module.compute(classifier=[[1.0, 0.0], [0.0, 3.0]])
    assert out["nc2_classifier_norms_cv"] == pytest.approx(w_norms.std() / w_norms.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="no input"):
        nc_module.compute()


def test_flag_alignment_model_id_str_pathlike_or_list(flag_module, tiny_checkpoint, tmp_path, monkeypatch):
    from hf_flag.analysis.api import analyze

    expected = analyze(str(tiny_checkpoint), cheap=True)
    for model_id in (str(tiny_checkpoint), tiny_checkpoint, [tiny_checkpoint], (str(tiny_checkpoint),)):
        out = flag_module.compute(model_id=model_id, cheap=True)
        assert out["model"] == expected.model, model_id
        _same(out["summary"], expected.summary)
    both = flag_module.compute(model_id=[tiny_checkpoint, str(tiny_checkpoint)], cheap=True)
    assert both["model"] == [expected.model] * 2
    flag_module.add_batch(model_id=tiny_checkpoint)
    assert flag_module.compute(cheap=True)["model"] == expected.model
    # a Hub id is one model, as evaluate's perplexity takes it (not split into characters): the error names it whole
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(Exception, match="org/model"):
        flag_module.compute(model_id="org/model", cheap=True)
    with pytest.raises(ValueError, match="model_id=3 must be a path or Hub id"):
        flag_module.compute(model_id=3)


def test_flag_alignment_headline_values_beside_baselines(flag_module, tiny_checkpoint, tiny_llama):
    from hf_flag.geometry.pairs import commutator_baseline

    out = flag_module.compute(model_id=tiny_checkpoint)
    values = [k for k in out if "/" in k and not k.endswith("_baseline")]
    assert {"residual/commutator_ratio", "head_overlap_q/overlap", "cross_layer_overlap_q/overlap",
            "composition_v/score", "mlp/commutator_ratio"} <= set(values)
    assert all(isinstance(out[f"{k}_baseline"], float) for k in values)
    # independent references: Haar overlap max(p, q)/d with full-rank heads (head_dim 8, d 32), composition
    # 1/sqrt(d) (MATH.md §1, §6), the residual kappa baseline by geometry.pairs.commutator_baseline on the weights
    d, head_dim = 32, 8
    assert out["head_overlap_q/overlap_baseline"] == pytest.approx(head_dim / d, rel=1e-12)
    assert out["cross_layer_overlap_q/overlap_baseline"] == pytest.approx(head_dim / d, rel=1e-12)
    assert out["composition_v/score_baseline"] == pytest.approx(d ** -0.5, rel=1e-12)
    mlp = [layer.mlp for layer in tiny_llama.model.layers]
    residual = commutator_baseline(mlp[0].down_proj.weight.detach().double(), mlp[1].up_proj.weight.detach().double())
    assert out["residual/commutator_ratio_baseline"] == pytest.approx(float(residual), rel=1e-9)
    cheap = flag_module.compute(model_id=tiny_checkpoint, cheap=True)  # kappa and its closed-form baseline only
    cheap_values = [k for k in cheap if "/" in k and not k.endswith("_baseline")]
    assert cheap_values and set(cheap_values) < set(values)
    for key in cheap_values:
        assert cheap[key] == pytest.approx(out[key], rel=1e-9)
        assert cheap[f"{key}_baseline"] == pytest.approx(out[f"{key}_baseline"], rel=1e-9)


def _numpy_alignment(W: np.ndarray, Mr: np.ndarray) -> dict[str, float]:
    """Numpy references (MATH.md §1, §3, §4, §5) of the baselined keys for classifier W (C, p), centred means Mr."""
    C = W.shape[0]
    QW = np.linalg.svd(W.T, full_matrices=False)[0]
    UM = np.linalg.svd(Mr.T, full_matrices=False)[0][:, :C - 1]
    k = C - 1
    VW = np.linalg.svd(W, full_matrices=False)[2]  # right singular vectors of W_next = W, rows
    T = VW[:k] @ UM[:, :k]
    A, B = W.T @ W, Mr.T @ Mr
    return {
        "nc3_self_duality": np.linalg.norm(W.T / np.linalg.norm(W) - Mr.T / np.linalg.norm(Mr)) ** 2,
        "level2_subspace_error": 1 - np.linalg.norm(QW.T @ UM) ** 2 / min(QW.shape[1], UM.shape[1]),
        "level3_subspace_score": np.linalg.norm(T) ** 2 / k,
        "level3_basis_score": (np.diag(T) ** 2).sum() / k,
        "level3_kappa": np.linalg.norm(A @ B - B @ A) / (np.linalg.norm(A) * np.linalg.norm(B)),
    }


def test_neural_collapse_alignment_baselines_monte_carlo(nc_module):
    from scipy.stats import ortho_group

    C, p, draws = 4, 7, 3000
    rng = np.random.default_rng(6)
    M = rng.standard_normal((C, p)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1, 0.1, 0.1])
    W = M + 0.3 * rng.standard_normal((C, p))
    out = nc_module.compute(classifier=W, class_means=M)
    Mr = M - M.mean(0)
    here = _numpy_alignment(W, Mr)
    for key, value in here.items():
        assert out[key] == pytest.approx(value, rel=1e-8, abs=1e-12), key
    samples = {key: [] for key in here}
    for O in ortho_group.rvs(p, size=draws, random_state=7):
        for key, value in _numpy_alignment(W @ O, Mr).items():
            samples[key].append(value)
    for key, values in samples.items():
        values = np.array(values)
        if key == "level3_kappa":  # the closed form is the root mean square (MATH.md §3)
            mc, se = np.sqrt((values ** 2).mean()), (values ** 2).std() / np.sqrt(draws) / (2 * np.sqrt((values ** 2).mean()))
        else:
            mc, se = values.mean(), values.std() / np.sqrt(draws)
        assert out[f"{key}_baseline"] == pytest.approx(mc, abs=5 * se + 1e-12), key
        assert abs(here[key] - mc) > 5 * se, key  # the aligned W is read against a baseline it differs from
    features = M[np.repeat(np.arange(C), 3)] + 0.01 * rng.standard_normal((3 * C, p))
    with_features = nc_module.compute(predictions=features, references=np.repeat(np.arange(C), 3), classifier=W)
    assert {f"{k}_baseline" for k in here} <= set(with_features)
    assert not any(k.endswith("_baseline") for k in nc_module.compute(classifier=W))  # weight-only NC2: none
