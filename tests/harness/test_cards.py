"""hf_flag.integrations.cards: only our section / YAML key / model-index entry change; every other byte stays."""
from __future__ import annotations

import stat
from pathlib import Path
from unittest import mock

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


@pytest.mark.parametrize("nl", ["\n", "\r\n"])
def test_user_card_preserved_byte_for_byte_and_idempotent(report, nl, assert_card_preserved):
    card = USER_CARD.replace("\n", nl)
    plots = {"Commutator ratio by layer": "../../plots/org--tiny/commutator_ratio.png"}
    once = cards.update_card_text(card, report, model_name="org/tiny", plots=plots)
    assert cards.update_card_text(once, report, model_name="org/tiny", plots=plots) == once
    assert_card_preserved(once, card)
    assert once.count("\n") == once.count(nl)  # our lines use the card's line ending
    meta = front_matter(once)
    user = front_matter(card)
    assert list(meta)[:len(user)] == list(user)  # user keys first, same order
    assert {k: meta[k] for k in user if k != "model-index"} == {k: v for k, v in user.items() if k != "model-index"}
    assert meta["model-index"][0] == user["model-index"][0]  # merged, not clobbered
    assert meta["hf_flag"]["metrics"]["mlp/commutator_ratio"] == 0.35
    assert "![Commutator ratio by layer](../../plots/org--tiny/commutator_ratio.png)" in once


def test_model_index_convention_through_huggingface_hub(report):
    text = cards.update_card_text(USER_CARD, report, model_name="org/tiny")
    results = ModelCard(text).data.eval_results
    user = [r for r in results if r.dataset_type == "glue"]
    ours = {r.metric_type: r for r in results if r.dataset_type == "hf-flag"}
    assert [(r.metric_type, r.metric_value) for r in user] == [("accuracy", 0.91)]
    assert set(ours) == {"mlp/commutator_ratio", "mlp/commutator_ratio_baseline", "vo/commutator_ratio",
                         "vo/commutator_ratio_baseline", "head_overlap_o/overlap", "head_overlap_o/overlap_baseline"}
    r = ours["mlp/commutator_ratio"]
    assert (r.task_type, r.dataset_name, r.metric_value) == ("weight-geometry", "weights", 0.35)
    assert ours["vo/commutator_ratio_baseline"].metric_value == 0.2


def test_second_report_replaces_only_our_parts(report, assert_card_preserved):
    first = cards.update_card_text(USER_CARD, report, model_name="org/tiny")
    report.summary["mlp/commutator_ratio"] = 0.77
    second = cards.update_card_text(first, report, model_name="org/tiny")
    assert_card_preserved(second, USER_CARD)
    assert "0.77" in second and "MLP commutator ratio 0.35" not in second
    assert second.count(cards.SECTION_START) == 1 and second.count(cards.INDEX_START) == 1
    assert front_matter(second)["hf_flag"]["metrics"]["mlp/commutator_ratio"] == 0.77


def test_report_without_headlines_removes_our_stale_index_entry(report, assert_card_preserved):
    first = cards.update_card_text(USER_CARD, report, model_name="org/tiny")
    second = cards.update_card_text(first, report, model_name="org/tiny", metrics=[])
    assert cards.INDEX_START not in second and "0.35" not in second  # no number of the first report survives
    assert "No headline metric" in second
    assert_card_preserved(second, USER_CARD)
    assert front_matter(second)["model-index"] == front_matter(USER_CARD)["model-index"]


def test_card_without_front_matter_or_model_index(report, assert_card_preserved):
    plain = "# Title\n\nText only.\n"
    out = cards.update_card_text(plain, report)
    assert out.startswith("---\n") and out.endswith(cards.SECTION_END + "\n")
    assert_card_preserved(out.split("---\n", 2)[2], plain)
    assert cards.update_card_text(out, report) == out
    meta = front_matter(out)
    assert meta["model-index"][0]["name"] == "org/tiny"
    no_index = "---\nlicense: mit\n---\nText\n"
    out = cards.update_card_text(no_index, report, metrics=["mlp/commutator_ratio"])
    assert_card_preserved(out.replace("model-index:\n", ""), no_index)
    assert [m["type"] for m in front_matter(out)["model-index"][0]["results"][0]["metrics"]] == [
        "mlp/commutator_ratio", "mlp/commutator_ratio_baseline"]


def test_unsafe_cards_raise_one_line_errors(report):
    with pytest.raises(cards.CardFormatError, match="inline"):
        cards.update_card_text("---\nmodel-index: [{name: x, results: []}]\n---\n", report)
    with pytest.raises(cards.CardFormatError, match="hf-flag:end"):
        cards.update_card_text("text\n<!-- hf-flag:start -->\nhalf", report)


def test_readings_compare_with_the_baseline():
    assert cards.reading("mlp/commutator_ratio", 0.31, 0.05) == (
        "MLP commutator ratio 0.31 vs 0.05 random: further from a shared eigenbasis than a random orientation "
        "of the same spectra")
    assert cards.reading("mlp/commutator_ratio", 0.02, 0.05).endswith("partial basis alignment")
    assert cards.reading("head_overlap_o/overlap", 0.26, 0.25).endswith("indistinguishable from random subspaces")
    assert cards.reading("mlp/intersection_dim", 3.0, 0.0).endswith("generic position (alignment)")
    assert cards.reading("mlp/intersection_dim", 0.0, 0.0).endswith("no shared directions beyond chance")
    assert cards.reading("vo/commutator_ratio", 0.1, None) == "attention V-O commutator ratio 0.1 (no random " \
                                                              "baseline computed)"


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


def test_push_card_pr_uploads_exact_bytes_with_create_pr(report, tmp_path):
    remote = tmp_path / "remote_README.md"
    remote.write_bytes(USER_CARD.encode())
    uploaded = {}

    def fake_upload(path_or_fileobj, **kwargs):
        uploaded["text"] = Path(path_or_fileobj).read_bytes().decode()
        uploaded.update(kwargs)
        return "https://huggingface.co/org/tiny/discussions/1"

    token = "hf_SECRETtoken123"
    with mock.patch("huggingface_hub.repocard.hf_hub_download", return_value=str(remote)) as download, \
            mock.patch("huggingface_hub.repocard.upload_file", side_effect=fake_upload), \
            mock.patch("huggingface_hub.repocard.RepoCard.validate"):
        url = cards.push_card_pr("org/tiny", report, token=token)
    assert url.endswith("/discussions/1")
    assert download.call_args.kwargs["token"] == token
    assert uploaded["create_pr"] is True and uploaded["repo_id"] == "org/tiny" and uploaded["token"] == token
    assert uploaded["text"] == cards.update_card_text(USER_CARD, report, model_name="org/tiny")  # comments kept
    assert token not in uploaded["text"]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]


def test_push_card_pr_without_remote_card(report):
    from huggingface_hub.errors import EntryNotFoundError

    with mock.patch("huggingface_hub.repocard.hf_hub_download", side_effect=EntryNotFoundError("no README")), \
            mock.patch("huggingface_hub.repocard.upload_file", return_value="url") as upload, \
            mock.patch("huggingface_hub.repocard.RepoCard.validate"):
        cards.push_card_pr("org/tiny", report)
    assert upload.call_args.kwargs["create_pr"] is True


@pytest.mark.pretrained
def test_minilm_readme_round_trip(report, minilm_path, assert_card_preserved):
    original = (minilm_path / "README.md").read_bytes().decode()
    out = cards.update_card_text(original, report, model_name="sentence-transformers/all-MiniLM-L6-v2")
    assert "model-index" not in original  # so the model-index: key line is ours too
    assert_card_preserved(out.replace("model-index:\n", "", 1), original)
    assert cards.update_card_text(out, report, model_name="sentence-transformers/all-MiniLM-L6-v2") == out
    assert front_matter(out)["datasets"] == front_matter(original)["datasets"]
