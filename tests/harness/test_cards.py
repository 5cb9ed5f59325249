"""hf_flag.integrations.cards: only our section / YAML key / model-index entry change; every other byte stays."""
from __future__ import annotations

import stat

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_flag.integrations import cards

USER_CARD = """---
# Card metadata (keep this comment)
language:
  - en   # English only
license: apache-2.0
tags: [a, 'b c']
model-index:
  - name: user-model
    results:
      - task: {type: text-classification, name: Text Classification}
        dataset: {name: GLUE SST-2, type: glue, config: sst2}
        metrics:
          - {type: accuracy, value: 0.91, name: Accuracy}
# trailing comment belongs to library_name
library_name: transformers
---

# user-model

Some *user* text.   Trailing spaces stay.

## Usage
```python
print("hi")
```"""


def front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---", 2)[1])


def ours(text: str) -> dict:
    """hf-flag's model-index results of a card, as huggingface_hub reads them: metric type -> EvalResult."""
    return {r.metric_type: r for r in ModelCard(text).data.eval_results or [] if r.source_name == "hf-flag"}


@pytest.mark.parametrize("nl", ["\n", "\r\n"])
def test_user_card_preserved_outside_our_parts_and_idempotent(report, nl, assert_card_preserved):
    card = USER_CARD.replace("\n", nl)
    plots = {"Commutator ratio by layer": "hf-flag-plots/commutator_ratio.png"}
    once = cards.update_card_text(card, report, model_name="org/tiny", plots=plots)
    assert cards.update_card_text(once, report, model_name="org/tiny", plots=plots) == once
    assert_card_preserved(once, card)
    assert once.count("\n") == once.count(nl)  # our lines use the card's line ending
    meta = front_matter(once)
    user = front_matter(card)
    assert list(meta)[:len(user)] == list(user)  # user keys first, same order
    assert {k: meta[k] for k in user if k != "model-index"} == {k: v for k, v in user.items() if k != "model-index"}
    assert [e["name"] for e in meta["model-index"]] == ["user-model"]  # ours join the user's entry, name kept
    assert meta["model-index"][0]["results"][0] == user["model-index"][0]["results"][0]
    assert meta["hf_flag"]["metrics"]["mlp/commutator_ratio"] == 0.35
    assert "![Commutator ratio by layer](hf-flag-plots/commutator_ratio.png)" in once
    assert "# Card metadata (keep this comment)" in once and "  - en   # English only" in once


def test_model_index_marked_the_huggingface_hub_way(report):
    text = cards.update_card_text(USER_CARD, report, model_name="org/tiny")
    results = ModelCard(text).data.eval_results
    user = [r for r in results if r.source_name != "hf-flag"]
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in user] == [("accuracy", 0.91, "glue")]
    mine = ours(text)
    assert set(mine) == {"mlp/commutator_ratio", "mlp/commutator_ratio_baseline", "vo/commutator_ratio",
                         "vo/commutator_ratio_baseline", "head_overlap_o/overlap", "head_overlap_o/overlap_baseline"}
    r = mine["mlp/commutator_ratio"]
    assert (r.task_type, r.dataset_type, r.metric_value, r.source_url) == ("weight-geometry", "hf-flag", 0.35,
                                                                          cards.DOCS_URL)
    assert mine["vo/commutator_ratio_baseline"].metric_value == 0.2


def test_modelcard_load_save_then_rerun_replaces_exactly_our_results(report):
    """huggingface_hub's ModelCard drops YAML comments and re-dumps the model-index; a rerun must still find and
    replace exactly hf-flag's results (no duplicates, no stale values) and leave the user's result and name."""
    first = cards.update_card_text(USER_CARD, report, model_name="org/tiny")
    saved = str(ModelCard(first))  # a load/save by huggingface_hub
    assert "# Card metadata" not in saved  # it did drop the comments
    for row, value in zip(report.select(kind="mlp"), (0.7, 0.84)):  # the card reads the rows: mean 0.77
        row.values["commutator_ratio"] = value
    second = cards.update_card_text(saved, report, model_name="org/tiny")
    for text in (second, str(ModelCard(second)), cards.update_card_text(str(ModelCard(second)), report)):
        results = ModelCard(text).data.eval_results
        assert len(results) == 1 + 6
        assert ours(text)["mlp/commutator_ratio"].metric_value == 0.77
        assert [(r.metric_type, r.metric_value) for r in results if r.source_name != "hf-flag"] == [("accuracy", 0.91)]
        assert [e["name"] for e in front_matter(text)["model-index"]] == ["user-model"]
    assert cards.update_card_text(second, report, model_name="org/tiny") == second


def test_comment_marked_entry_of_hf_flag_0_1_is_replaced(report):
    legacy = USER_CARD.replace("# trailing comment", (
        "  # hf-flag:model-index:start\n  - name: org/tiny\n    results:\n      - task: {type: weight-geometry}\n"
        "        dataset: {name: weights, type: hf-flag}\n        metrics:\n"
        "          - {type: mlp/commutator_ratio, value: 0.99}\n  # hf-flag:model-index:end\n# trailing comment"))
    assert len(ModelCard(legacy).data.eval_results) == 2
    out = cards.update_card_text(legacy, report, model_name="org/tiny")
    assert "hf-flag:model-index" not in out and "0.99" not in out
    assert len(ModelCard(out).data.eval_results) == 1 + 6


def test_report_without_headlines_removes_our_stale_results(report, assert_card_preserved):
    first = cards.update_card_text(USER_CARD, report, model_name="org/tiny")
    second = cards.update_card_text(first, report, model_name="org/tiny", metrics=[])
    assert ours(second) == {} and "0.35" not in second  # no number of the first report survives
    assert "No headline metric" in second
    assert_card_preserved(second, USER_CARD)
    assert front_matter(second)["model-index"] == front_matter(USER_CARD)["model-index"]


def test_card_without_front_matter_without_model_index_or_final_newline(report, assert_card_preserved):
    plain = "# Title\n\nText only.\n"
    out = cards.update_card_text(plain, report)
    assert out.startswith("---\n") and out.endswith(cards.SECTION_END + "\n")
    assert_card_preserved(out.split("---\n", 2)[2], plain)
    assert cards.update_card_text(out, report) == out
    assert front_matter(out)["model-index"][0]["name"] == "org/tiny"
    no_index = "---\nlicense: mit\n---\nText\n"
    out = cards.update_card_text(no_index, report, metrics=["mlp/commutator_ratio"])
    assert_card_preserved(out, no_index)
    assert [m["type"] for m in front_matter(out)["model-index"][0]["results"][0]["metrics"]] == [
        "mlp/commutator_ratio", "mlp/commutator_ratio_baseline"]
    bare = "---\nlicense: mit\n---"  # valid, no trailing newline
    out = cards.update_card_text(bare, report)
    assert out.startswith("---\nlicense: mit\n") and front_matter(out)["license"] == "mit"
    assert ModelCard(out).data.license == "mit" and len(ours(out)) == 6
    assert cards.update_card_text(out, report) == out


def test_unsafe_cards_raise_one_line_errors(report):
    with pytest.raises(cards.CardFormatError, match="inline"):
        cards.update_card_text("---\nmodel-index: [{name: x, results: []}]\n---\n", report)
    with pytest.raises(cards.CardFormatError, match="hf-flag:end"):
        cards.update_card_text("text\n<!-- hf-flag:start -->\nhalf", report)


def test_local_models_are_named_by_their_hub_name_never_a_path(report, tmp_path):
    report.model = str(tmp_path / "checkpoints" / "my-model")
    assert cards.card_model_name(report) == "my-model"
    report.params["provenance"] = {"source": "local", "format": "safetensors", "hub_name": "me/my-model"}
    assert cards.card_model_name(report) == "me/my-model"
    assert cards.card_model_name(report, "me/renamed") == "me/renamed"
    text = cards.update_card_text("", report)
    assert front_matter(text)["model-index"][0]["name"] == "me/my-model" and str(tmp_path) not in text


def test_first_sentence_says_where_the_numbers_come_from(report):
    def first_sentence(text: str) -> str:
        body = text.split(cards.SECTION_START, 1)[1]
        return [line for line in body.splitlines() if line and not line.startswith("#")][0]

    report.params.update(storage_dtypes=["F32", "Q4_1"], hf_flag_version="0.1.0", provenance={
        "source": "local", "format": "gguf", "files": ["SmolLM2-135M-Instruct.Q4_1.gguf"], "hub_name": None})
    derived = first_sentence(cards.update_card_text("", report, model_name="HuggingFaceTB/SmolLM2-135M-Instruct"))
    # review s5 item 9: nothing compared the local file with the Hub's, so it is unverified, never "derived"
    assert derived == ("**Computed from an unverified local copy (`SmolLM2-135M-Instruct.Q4_1.gguf`), not from "
                       "`HuggingFaceTB/SmolLM2-135M-Instruct`'s own files at a known commit:** GGUF, stored as "
                       "F32/Q4_1, read by hf-flag 0.1.0; hf-flag did not compare these weights with that repository's, "
                       "so the numbers describe this copy.")
    assert "derived" not in derived
    assert cards.is_derived(report, "HuggingFaceTB/SmolLM2-135M-Instruct")
    sha = "a" * 40
    report.params.update(storage_dtypes=["bfloat16"], provenance={
        "source": "hub", "repo_id": "org/tiny", "revision": "main", "sha": sha, "format": "safetensors"})
    original = first_sentence(cards.update_card_text("", report, model_name="org/tiny"))
    assert original == ("Read by hf-flag 0.1.0 from this repository's own weights at commit `aaaaaaaaaaaa` "
                        "(safetensors, bfloat16), without running the model.")
    assert not cards.is_derived(report, "org/tiny") and cards.is_derived(report, "org/other")
    assert ours(cards.update_card_text("", report, model_name="org/tiny"))[
        "mlp/commutator_ratio"].dataset_revision == sha


def test_each_diagnostic_is_one_paragraph_with_a_link_and_numbers_with_baseline_and_spread(report):
    text = cards.update_card_text("", report, model_name="org/tiny")
    section = text.split(cards.SECTION_START, 1)[1]
    assert section.count("### ") == 2  # commutator ratio, head overlap
    for anchor in ("#3-commutator-obstruction", "#6-attention-heads-weight-only"):
        assert f"]({cards.MATH_URL}{anchor})" in section
    assert "- MLP: 0.35 vs random 0.05 (2 pairs in 2 layers; sd 0.0707, 0.3 to 0.4; z = 6): undetermined:" in section
    assert "- attention V-O: 0.52 vs random 0.2 (6 pairs in 2 layers; sd 0.707, 0.02 to 1.02; z = 0.64)" in section
    assert "the rule needs 3" in section and "|z| >= 3" in section


def test_default_metrics_follow_analyze_headlines(report):
    from hf_flag.rows import HEADLINE_METRICS

    keys = cards.headline_metrics(report)
    assert keys == [m for m in HEADLINE_METRICS if m in ("mlp/commutator_ratio", "vo/commutator_ratio",
                                                         "head_overlap_o/overlap")]


def test_write_card_in_place_keeps_mode_and_skips_identical_rewrite(report, tmp_path, assert_card_preserved):
    readme = tmp_path / "README.md"
    readme.write_bytes(USER_CARD.encode())
    readme.chmod(0o640)
    text = cards.write_card(readme, report, model_name="org/tiny")
    assert readme.read_bytes() == text.encode()
    assert_card_preserved(text, USER_CARD)
    assert stat.S_IMODE(readme.stat().st_mode) == 0o640
    inode = readme.stat().st_ino
    assert cards.write_card(readme, report, model_name="org/tiny") == text
    assert readme.stat().st_ino == inode  # identical content: not rewritten
    fresh = cards.write_card(tmp_path / "new" / "README.md", report, model_name="org/tiny")
    assert "# org/tiny" in fresh and front_matter(fresh)["model_name"] == "org/tiny"


@pytest.mark.pretrained
def test_minilm_readme_round_trip(report, minilm_path, assert_card_preserved):
    original = (minilm_path / "README.md").read_bytes().decode()
    out = cards.update_card_text(original, report, model_name="sentence-transformers/all-MiniLM-L6-v2")
    assert "model-index" not in original  # so the model-index: key is ours too
    assert_card_preserved(out, original)
    assert cards.update_card_text(out, report, model_name="sentence-transformers/all-MiniLM-L6-v2") == out
    assert front_matter(out)["datasets"] == front_matter(original)["datasets"]


def test_model_index_leaves_out_kappa_where_it_does_not_read():
    """A value the card does not read (kappa of rank-deficient MLP pairs, MATH.md §3) is not published as a
    model-index metric; kappa of pairs where it reads is."""
    from hf_flag.integrations.cards import eval_results
    from hf_flag.report import Report, Row

    def row(kind, layer, reads):
        return Row("m", kind, layer, layer, "a", "b", {"commutator_ratio": 0.05 + 0.01 * layer,
                                                       "commutator_ratio_baseline": 0.03},
                   {"commutator_reading_holds": reads})

    rows = [row("mlp", i, False) for i in range(3)] + [row("vo", i, True) for i in range(3)]
    from hf_flag.rows import summarize

    report = Report("m", "llama", rows=rows, summary=summarize(rows))
    metrics = {r.metric_type for r in eval_results(report)}
    assert "vo/commutator_ratio" in metrics and "vo/commutator_ratio_baseline" in metrics
    assert not {m for m in metrics if m.startswith("mlp/")}


def kappa_report(reads_by_layer: dict[str, list], values: dict[str, list]) -> "Report":
    from hf_flag.report import Report, Row
    from hf_flag.rows import summarize

    rows = [Row("m", kind, i, i, "a", "b", {"commutator_ratio": v, "commutator_ratio_baseline": 0.03},
                {"commutator_reading_holds": reads})
            for kind in values for i, (v, reads) in enumerate(zip(values[kind], reads_by_layer[kind]))]
    return Report("m", "llama", rows=rows, summary=summarize(rows))


def test_yaml_and_model_index_hold_what_the_card_reads_with_counts():
    """Review s5 items 4, 6, 8: the YAML hf_flag.metrics drops kappa where it reads on no pair, holds the mean over
    the pairs where it reads on some (with their count under hf_flag.pairs), and the model-index the same."""
    report = kappa_report({"mlp": [False] * 3, "residual": [True, False, True, True]},
                          {"mlp": [0.05, 0.06, 0.07], "residual": [0.031, 0.09, 0.033, 0.035]})
    text = cards.update_card_text("", report, model_name="org/m")
    meta = front_matter(text)["hf_flag"]
    assert meta["metrics"] == {"residual/commutator_ratio": 0.033, "residual/commutator_ratio_baseline": 0.03}
    assert meta["pairs"] == {"residual/commutator_ratio": 3}
    assert report.summary["residual/commutator_ratio"] == pytest.approx(0.04725)  # the mean the tables used to show
    assert {k: r.metric_value for k, r in ours(text).items()} == meta["metrics"]
    section = text.split(cards.SECTION_START, 1)[1]
    # z = mean(d) / (sd(d) / sqrt(3)) with d = 0.001, 0.003, 0.005: 0.003 / (0.002 / sqrt(3)) = 2.598
    assert ("- residual (MLP out/in): kappa reads in 3 of 4 pairs: 0.033 vs random 0.03 (3 pairs in 3 layers; sd "
            "0.002, 0.031 to 0.035; z = 2.6): not distinguishable from random at this spread. Not read on the others: "
            "kappa does not read as alignment on 1 of 4 pairs:") in section
    assert "- MLP: 0.06 vs random 0.03 (3 pairs in 3 layers; sd 0.01, 0.05 to 0.07): not read: kappa does not " \
           "read as alignment on 3 of 3 pairs" in section


def test_card_says_why_the_intersection_plot_is_left_out(report):
    for row in report.rows:
        if "intersection_dim" in row.values:
            row.values["intersection_dim"] = row.values["intersection_dim_baseline"]
            row.details["intersection_cut"] = 1
    line = ("The intersection-dimension plot is left out: on every one of its 8 pairs the intersection dimension "
            "equals its general-position baseline max(0, 2c - n) at the cut c where it is taken (c = 1).")
    assert line in cards.render_section(report, plots={"Commutator ratio by layer": "p.png"}).splitlines()
    assert line not in cards.render_section(report)  # no plots, nothing left out
