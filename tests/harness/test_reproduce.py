"""``hf-flag reproduce --quick`` end to end (run once per module), plus the pieces theory pins down exactly."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from hf_flag.harness.experiments import common, digits, reproduce, writer

CLAIM_KEYS = [k for k, _, _ in reproduce.CLAIMS]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("repro")
    rc = reproduce.main(["--quick", "--out", str(out)])
    return rc, out


@pytest.fixture(scope="module")
def quick_data(quick_run) -> dict:
    rc, out = quick_run
    assert rc == 0
    return json.loads((out / writer.DATA_NAME).read_text())


def test_linear_net_decay_rate_matches_two_lr_wd(quick_data):
    """MATH.md §2: in linear nets under GD, ||D|| and ||diag D|| shrink by (1 - lr wd)^2 per step."""
    runs = [r for r in quick_data["claims"]["weight_decay"]["data"]["runs"]
            if r["activation"] == "linear" and r["optimizer"] == "sgd" and r["weight_decay"] > 0]
    assert len(runs) >= 3
    for r in runs:
        two_lr_wd = 2 * r["lr"] * r["weight_decay"]
        assert r["rate_full"] == pytest.approx(two_lr_wd, rel=0.10)
        assert r["rate_diag"] == pytest.approx(two_lr_wd, rel=0.10)
    assert quick_data["claims"]["weight_decay"]["data"]["slopes"]["linear"]["full"] == pytest.approx(1.0, rel=0.10)


def test_relu_diagonal_obeys_the_law_but_gelu_does_not(quick_data):
    """diag E = 0 for ReLU (Du, Hu & Lee 2018), so ||diag D|| decays at 2 lr wd; GELU has diag E != 0."""
    runs = quick_data["claims"]["weight_decay"]["data"]["runs"]
    relu = [r for r in runs if r["activation"] == "relu" and r["optimizer"] == "sgd" and r["weight_decay"] > 0]
    for r in relu:
        assert r["rate_diag"] == pytest.approx(2 * r["lr"] * r["weight_decay"], rel=0.10)
    gelu = [r for r in runs if r["activation"] == "gelu" and r["optimizer"] == "sgd" and r["weight_decay"] > 0]
    assert any(abs(r["rate_diag"] / (2 * r["lr"] * r["weight_decay"]) - 1) > 0.10 for r in gelu)


def test_linear_commutator_ends_below_nonlinear(quick_data):
    data = quick_data["claims"]["commutator"]["data"]
    runs = {r["activation"]: r for r in data["runs"] if r["seed"] == 0}
    lin = runs["linear"]["kappa"]
    # kappa <= sqrt(2) ||D|| / ||B||: with E = 0 it inherits the imbalance's (1 - lr wd)^2 law (MATH.md §3)
    assert runs["linear"]["late_rate"] == pytest.approx(data["predicted_rate"], rel=0.25)
    assert lin[-1] < 0.5 * lin[0]
    for act in ("relu", "gelu"):
        assert lin[-1] < runs[act]["kappa"][-1]
    # all nets start from the same weights, and an untrained net is as aligned as a random rotation
    assert runs["relu"]["kappa"][0] == runs["linear"]["kappa"][0]
    assert runs["linear"]["baseline_start"] == pytest.approx(lin[0], rel=0.5)
    # means over a net's pairs through hf_flag.geometry.stats (MATH.md §8): the correctly rounded mean, the old
    # sum / len up to rounding
    from hf_flag.geometry import stats
    for r in data["runs"]:
        assert r["kappa"][-1] == stats.mean(r["kappa_pairs_end"])
        assert r["kappa"][-1] == pytest.approx(sum(r["kappa_pairs_end"]) / len(r["kappa_pairs_end"]), rel=1e-15)


def test_resnet_block_diagonal_decay(quick_data):
    """The per-channel ReLU symmetry of a residual block gives the same diagonal law as in an MLP (seed 0: under
    minibatch SGD the eta^2 gradient term adds noise to diag D (MATH.md §2), which in the short quick runs of the
    other seeds moves the fitted rate by up to ~20%)."""
    blocks = [b for b in quick_data["claims"]["resnet"]["data"]["blocks"] if b["weight_decay"] > 0 and b["seed"] == 0]
    assert blocks
    for b in blocks:
        assert b["rate_diag"] == pytest.approx(b["predicted"], rel=0.10)


def test_report_has_a_verdict_per_claim_and_valid_figures(quick_run, quick_data):
    rc, out = quick_run
    text = (out / writer.REPORT_NAME).read_text()
    assert text.splitlines()[0] == writer.MARKER
    verdicts = [line for line in text.splitlines() if line.startswith("**Verdict: ")]
    assert len(verdicts) == len(CLAIM_KEYS)
    assert all(any(line.startswith(f"**Verdict: {v}.**") for v in common.VERDICTS) for line in verdicts)
    assert set(quick_data["claims"]) == set(CLAIM_KEYS)
    pngs = sorted((out / writer.FIGURES_DIR).glob("*.png"))
    referenced = [f for c in quick_data["claims"].values() for f in c["figures"]]
    assert len(referenced) >= 4 and sorted(out / f for f in referenced) == pngs
    import matplotlib.image

    for png in pngs:
        assert png.read_bytes()[:8] == writer.PNG_SIGNATURE
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert f"]({writer.FIGURES_DIR}/{png.name})" in text
    assert not list(out.rglob(".*.tmp"))


#: sha256 (first 16 hex digits) of every verdict rule version's text, by claim. A rule's text is never edited once a
#: report used it; a change is a new version (rules.py), so this table only grows.
PINNED_RULES = {
    "weight_decay": {1: "2a5b2f6489ed40eb", 2: "af8da4953e298ed0"},
    "commutator": {1: "653efdd79a4da287", 2: "22bcec02dc3c5b20"},
    "neural_collapse": {1: "59e2ebf7d92c334c", 2: "e751178c990856d5"},
    "resnet": {1: "f74e4546789a4e52", 2: "5f3ed98380ff2dfa"},
    "pretrained": {1: "18c3a386fb346bc7", 2: "22cb7139ddf59dab", 3: "4c171d70dd6fff8e"},
}


def test_rules_are_versioned_and_every_version_is_reported(quick_run, quick_data):
    from hf_flag.harness.experiments import commutator, neural_collapse, pretrained, resnet, weight_decay

    modules = {"weight_decay": weight_decay, "commutator": commutator, "neural_collapse": neural_collapse,
               "resnet": resnet, "pretrained": pretrained}
    text = (quick_run[1] / writer.REPORT_NAME).read_text()
    for key, module in modules.items():
        versions = [r.version for r in module.RULES]
        assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 2, key
        for version, pinned in PINNED_RULES[key].items():
            digest = hashlib.sha256(module.RULES[version - 1].text.encode()).hexdigest()[:16]
            assert digest == pinned, f"{key} rule v{version} was edited: add a new version instead"
        claim = quick_data["claims"][key]
        assert [o["version"] for o in claim["rules"]] == versions
        assert [o["current"] for o in claim["rules"]] == [False] * (len(versions) - 1) + [True]
        current = claim["rules"][-1]
        assert claim["verdict"] == ("supported" if current["supported"] else "not supported")
        for o in claim["rules"]:
            assert f"| v{o['version']} (" in text and o["text"] in text
    # claim 2: the rule replaced after the first run keeps its outcome, per seed, beside the current one
    data = quick_data["claims"]["commutator"]["data"]
    assert set(data["rule_v1_per_seed"]) == set(data["rule_v2_per_seed"]) == {"0", "1", "2"}


def test_pretrained_rule_v3_reads_each_pair_by_its_own_reading(quick_data):
    """Rule v3 (MATH.md §3): every pair is read by the measure whose reading holds for it at the storage cut (the
    row's commutator_reading_holds), not by its kind's generic ranks; v1 and v2 keep their outcomes beside it."""
    from hf_flag.harness.experiments import pretrained
    from hf_flag.report import Report, Row

    def row(layer, reads, kappa, base, overlap=None, chance=None):
        return Row("m", "residual", layer, layer + 1, "mlp.out", "mlp.in",
                   {"commutator_ratio": kappa, "commutator_ratio_baseline": base, "range_overlap": overlap,
                    "range_overlap_baseline": chance}, {"commutator_reading_holds": reads})

    report = Report("m", "x", rows=[row(0, True, 0.5, 1.0), row(1, False, 0.2, 1.0, 0.9, 0.6),
                                    row(1, True, 0.3, 0.5)])
    assert pretrained.by_layer_ratio(report, "residual", "commutator_ratio", "commutator_ratio_baseline",
                                     reads=True) == {0: 0.5, 1: 0.6}
    assert pretrained.by_layer_ratio(report, "residual", "range_overlap", "range_overlap_baseline",
                                     reads=False) == {1: pytest.approx(1.5)}
    study = {"vo_group": {"groups": {0: 2}, "groups_read": {0: 1}, "ratio_read": {0: 0.8}, "range_unread": {0: 1.2}},
             "by_row": {"residual": {"rows": 3, "rows_read": 2, "kappa": {0: 0.5}, "range": {1: 1.5}}}}
    assert [(label, below) for label, _, below in pretrained.reading_series(study)] == [
        (f"{pretrained.VO_GROUP}: kappa / Haar RMS (1/2 groups)", True),
        (f"{pretrained.VO_GROUP}: range_overlap / Haar (1/2 groups)", False),
        ("residual: kappa / Haar RMS (2/3 pairs)", True), ("residual: range_overlap / Haar (1/3 pairs)", False)]
    # a pair where kappa does not read and range_overlap and its chance value are both >= 0.99: no measure
    # reads, so it enters no ratio and is named as such
    filled = Report("m", "x", rows=[row(0, False, 0.2, 1.0, 0.995, 0.998), row(1, False, 0.2, 1.0, 0.9, 0.6)])
    assert pretrained.by_layer_ratio(filled, "residual", "range_overlap", "range_overlap_baseline", reads=False,
                                     informative=True) == {1: pytest.approx(1.5)}
    study["by_row"]["residual"].update(rows=4, rows_uninformative=1)
    assert [(label, below) for label, _, below in pretrained.reading_series(study)][2:] == [
        ("residual: kappa / Haar RMS (2/4 pairs)", True), ("residual: range_overlap / Haar (1/4 pairs)", False),
        ("residual: no measure reads (1/4 pairs: kappa does not, and range_overlap and its chance value are both "
         ">= 0.99)", False)]
    claim = quick_data["claims"]["pretrained"]
    assert [o["version"] for o in claim["rules"]] == [1, 2, 3]
    (name, s), = claim["data"]["models"].items()  # quick: MiniLM (float32 storage), every pair full rank at the cut
    assert s["vo_group"]["groups_read"] == s["vo_group"]["groups"]
    assert s["vo_group"]["ratio_read"] == pytest.approx(s["vo_group"]["ratio"], rel=1e-15)
    assert all(b["rows_read"] == (0 if k.startswith("mlp") else b["rows"]) for k, b in s["by_row"].items())
    assert claim["data"]["rule_v3"][name] == claim["data"]["rule_v2"][name]


def test_every_training_verdict_rests_on_three_seeds(quick_data):
    claims = quick_data["claims"]
    assert {r["seed"] for r in claims["weight_decay"]["data"]["runs"]} == set(common.SEEDS)
    assert {r["seed"] for r in claims["commutator"]["data"]["runs"]} == set(common.SEEDS)
    assert {r["seed"] for r in claims["neural_collapse"]["data"]["runs"]} == set(common.SEEDS)
    assert {b["seed"] for b in claims["resnet"]["data"]["blocks"]} == set(common.SEEDS)
    assert len(common.SEEDS) >= 3


def test_judge_rejects_inconsistent_rule_sets():
    from hf_flag.harness.experiments.rules import Rule, judge

    rules = (Rule(1, "a", "x"), Rule(2, "b", "y"))
    verdict, outcomes = judge(rules, {1: lambda: (True, "n1"), 2: lambda: (False, "n2")})
    assert verdict == "not supported" and [o["supported"] for o in outcomes] == [True, False]
    with pytest.raises(ValueError, match="versions"):
        judge(rules, {1: lambda: (True, "")})
    with pytest.raises(ValueError, match="versions"):
        judge((Rule(2, "a", "x"), Rule(1, "b", "y")), {1: lambda: (True, ""), 2: lambda: (True, "")})


def test_regenerates_its_own_file_but_refuses_a_hand_written_one(tmp_path, quick_run, capsys):
    _, out = quick_run
    writer.check_writable(out)  # the generated file may be replaced
    hand = tmp_path / writer.REPORT_NAME
    hand.write_text("# my notes\n")
    assert reproduce.main(["--quick", "--out", str(tmp_path)]) == 2
    assert hand.read_text() == "# my notes\n"
    assert "not generated" in capsys.readouterr().err
    with pytest.raises(writer.OverwriteRefusedError):
        writer.write_report([], tmp_path, {})


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert reproduce.main(["--claims", "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / writer.REPORT_NAME).exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # an unwritable --out is refused before minutes of training, not when the report is written
    assert reproduce.main(["--quick", "--claims", "weight_decay", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out" in err and "writable" in err


def test_training_is_deterministic():
    run = common.MLPRun(activation="relu", steps=20, record_every=5, batch_size=16)
    probe = lambda m, s: {"w": float(common.linear_layers(m)[0].weight.sum())}  # noqa: E731
    a, b = common.train_teacher_mlp(run, probe), common.train_teacher_mlp(run, probe)
    assert a.values == b.values and a.steps == [0, 5, 10, 15, 20]
    c = common.train_teacher_mlp(common.MLPRun(activation="relu", steps=20, record_every=5, batch_size=16, seed=1),
                                 probe)
    assert c.values["w"] != a.values["w"]


def test_conv_pair_reshape_is_the_channel_space():
    """W_next^T W_next is conv2's channel Gram, diag D the per-channel norm difference, and rescaling one hidden
    channel (the ReLU symmetry) leaves the block's forward pass unchanged while moving only that diagonal entry."""
    from hf_flag.geometry.pairs import imbalance

    torch.manual_seed(0)
    block = digits.ResidualBlock(3).double()
    W_l, W_next, b = digits.conv_pair(block)
    w1, w2 = block.conv1.weight.detach(), block.conv2.weight.detach()
    assert W_l.shape == (3, 27) and W_next.shape == (27, 3)
    torch.testing.assert_close(W_next.T @ W_next, torch.einsum("oikl,ojkl->ij", w2, w2))
    D = imbalance(W_l, W_next, bias_l=b)
    per_channel = w2.square().sum((0, 2, 3)) - w1.square().sum((1, 2, 3)) - b.square()
    torch.testing.assert_close(torch.diagonal(D), per_channel)

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = block(x)
    with torch.no_grad():
        block.conv1.weight[1] *= 3.0
        block.conv1.bias[1] *= 3.0
        block.conv2.weight[:, 1] /= 3.0
    torch.testing.assert_close(block(x), before)
    W_l2, W_next2, b2 = digits.conv_pair(block)
    D2 = imbalance(W_l2, W_next2, bias_l=b2)
    changed = (torch.diagonal(D2) - torch.diagonal(D)).abs() > 1e-9
    assert changed.tolist() == [False, True, False]


def test_fit_helpers_and_table_formatting():
    assert common.least_squares_slope([1.0, 2.0], [2.0, 4.0]) == 2.0
    with pytest.raises(ValueError, match="nonzero"):
        common.least_squares_slope([0.0], [1.0])
    assert common.fmt(float("nan")) == "n/a" and common.fmt(1.5e-5) == "1.50e-05"
    assert "|---|---|" in common.markdown_table(["a", "b"], [[1, math.pi]])
    with pytest.raises(ValueError, match="verdict"):
        common.ClaimResult("k", "t", "maybe", "", "")
