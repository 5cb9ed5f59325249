"""Fixtures of the harness tests: tiny random GPT-2 / Llama / BERT checkpoints saved with ``save_pretrained``, a
corrupted checkpoint, and a hand-built :class:`~hf_flag.report.Report` (no analysis needed)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hf_flag.report import Report, Row


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Three tiny architectures (different sizes) plus ``broken``: a folder whose safetensors file is garbage."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, n_inner=32, vocab_size=40,
                                           n_positions=16, bos_token_id=0, eos_token_id=0)),
        "llama": LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=24, vocab_size=40,
                                              max_position_embeddings=16, bos_token_id=0, eos_token_id=0)),
        "bert": BertModel(BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=40, max_position_embeddings=16)),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name], safe_serialization=True)
    broken = root / "broken"
    broken.mkdir()
    shutil.copy(paths["gpt2"] / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    paths["broken"] = broken
    return paths


def hand_report(model: str = "org/tiny") -> Report:
    """Two layers, three heads: mlp/vo pair rows with commutator ratio (reading as alignment) and intersection
    dimension (+ baselines),
    head_overlap_o rows for h < h'. Values are arbitrary but distinct so misplacement shows."""
    rows = []
    for layer in range(2):
        rows.append(Row(model, "mlp", layer, layer, "mlp.in", "mlp.out",
                        {"commutator_ratio": 0.3 + 0.1 * layer, "commutator_ratio_baseline": 0.05,
                         "intersection_dim": 2.0 + layer, "intersection_dim_baseline": 0.0},
                        {"commutator_reading_holds": True}))
        for h in range(3):
            rows.append(Row(model, "vo", layer, layer, f"head {h}", f"head {h}",
                            {"commutator_ratio": 0.01 * (h + 1) + layer, "commutator_ratio_baseline": 0.2,
                             "intersection_dim": float(h), "intersection_dim_baseline": 1.0},
                            {"commutator_reading_holds": True}))
        for h in range(3):
            for g in range(h + 1, 3):
                rows.append(Row(model, "head_overlap_o", layer, layer, f"head {h}", f"head {g}",
                                {"overlap": 0.1 * (h + g) + 0.01 * layer, "overlap_baseline": 0.25}))
    summary = {"mlp/commutator_ratio": 0.35, "mlp/commutator_ratio_baseline": 0.05, "vo/commutator_ratio": 0.52,
               "vo/commutator_ratio_baseline": 0.2, "head_overlap_o/overlap": 0.25,
               "head_overlap_o/overlap_baseline": 0.25}
    return Report(model=model, architecture="gpt2", layout={"n_layers": 2, "n_heads": 3}, summary=summary,
                  rows=rows)


@pytest.fixture
def report() -> Report:
    return hand_report()


def strip_card_parts(text: str) -> str:
    """Remove what hf_flag.integrations.cards says it owns or may rewrite (an independent re-implementation): the
    marked section, the ``hf_flag:`` key and the whole ``model-index:`` block (whose user entries
    :func:`check_card_preserved` compares by content)."""
    import re

    text = re.sub(r"<!-- hf-flag:start -->.*?<!-- hf-flag:end -->\r?\n?", "", text, flags=re.S)
    text = re.sub(r"^model-index:\r?\n(?:(?:[ \t]|- ).*\r?\n)*", "", text, flags=re.M)
    return re.sub(r"^hf_flag:\r?\n(?:[ \t].*\r?\n)*", "", text, flags=re.M)


def user_model_index(text: str) -> list:
    """The card's model-index without the results whose source is hf-flag (entries left empty dropped)."""
    import yaml

    parts = text.lstrip("\ufeff").split("---", 2)
    meta = (yaml.safe_load(parts[1]) or {}) if len(parts) == 3 else {}
    out = []
    for entry in meta.get("model-index") or []:
        kept = [r for r in entry["results"] if (r.get("source") or {}).get("name") != "hf-flag"]
        if kept:
            out.append({**entry, "results": kept})
    return out


def check_card_preserved(out: str, card: str) -> None:
    """``out`` is ``card`` plus our parts (appending the section may add at most one blank line before it), and
    the user's model-index entries are unchanged in content, names included."""
    rest = strip_card_parts(out)
    assert rest.startswith(strip_card_parts(card))
    assert rest[len(strip_card_parts(card)):] in ("", "\n", "\n\n", "\r\n", "\r\n\r\n")
    assert user_model_index(out) == user_model_index(card)


@pytest.fixture
def assert_card_preserved():
    return check_card_preserved
