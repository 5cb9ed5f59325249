"""Where weights come from: :func:`open_weights` turns a model or a path into a :class:`WeightSource`.

Accepted inputs, in the order they are tried:

* an existing :class:`WeightSource` (returned as is);
* an in-memory ``torch.nn.Module`` / ``transformers.PreTrainedModel`` -> :class:`ModuleSource`;
* an existing local file: ``*.safetensors``, a ``*.safetensors.index.json`` shard index, ``*.gguf``, or (only with
  ``allow_pickle=True``) ``*.bin`` / ``*.pt`` / ``*.pth`` / a ``pytorch_model.bin.index.json``;
* an existing local folder holding those files (and usually ``config.json``);
* otherwise a Hugging Face Hub id, resolved **only** through the local HF cache (never the network).

Nothing here instantiates a model, runs remote code, or unpickles unless ``allow_pickle=True`` (then with
``weights_only=True``).  Every failure is a one-line :class:`~hf_flag.errors.WeightSourceError`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

from torch import nn

from hf_flag.errors import WeightSourceError
from hf_flag.weights.gguf_source import GGUFSource
from hf_flag.weights.module_source import ModuleSource
from hf_flag.weights.pickle_source import TorchPickleSource
from hf_flag.weights.safetensors_source import SafetensorsSource
from hf_flag.weights.weight_source import WeightSource

__all__ = ["open_weights", "WeightSource", "ModuleSource", "SafetensorsSource", "GGUFSource", "TorchPickleSource",
           "read_config", "hf_cache_dir"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def open_weights(model_or_path: Union[str, os.PathLike, nn.Module, WeightSource], *, allow_pickle: bool = False,
                 revision: Optional[str] = None) -> WeightSource:
    """Open a model's weights for lazy, one-tensor-at-a-time reading (see the module docstring for inputs).

    ``revision`` selects a cached Hub revision (branch, tag or commit); it is ignored for local paths and
    in-memory models.  Raises :class:`WeightSourceError` for a missing path, a folder without weights, a corrupt
    or truncated checkpoint, an uncached Hub id, or pickle files without ``allow_pickle=True``.
    """
    if isinstance(model_or_path, WeightSource):
        return model_or_path
    if isinstance(model_or_path, nn.Module):
        return ModuleSource(model_or_path)
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise WeightSourceError(f"model of type {type(model_or_path).__name__} is not supported; pass a torch "
                                f"module, a local path, or a Hub id that is in the local HF cache")
    text = os.fspath(model_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return _open_file(path, allow_pickle=allow_pickle, name=path.name, config=read_config(path.parent))
    if path.is_dir():
        return _open_folder(path, allow_pickle=allow_pickle, name=path.name)
    if _looks_like_path(text):
        raise WeightSourceError(f"model path {text!r} does not exist; check the path (or pass a Hub id that "
                                f"is in the local HF cache)")
    folder = _resolve_cached_hub_id(text, revision)
    return _open_folder(folder, allow_pickle=allow_pickle, name=text)


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, read from the environment *now* (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict, ``{}`` when absent; a malformed file is a :class:`WeightSourceError`."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightSourceError(f"config file {str(config_path)!r} is not valid JSON ({exc}); repair or "
                                f"re-download it") from None
    if not isinstance(config, dict):
        raise WeightSourceError(f"config file {str(config_path)!r} does not hold a JSON object; repair or "
                                f"re-download it")
    return config


def _looks_like_path(text: str) -> bool:
    """True when ``text`` cannot be a Hub id (absolute, relative with ./ or ../, ~, several slashes, a file
    suffix), so that a missing path gets the 'does not exist' message rather than the Hub-cache one."""
    return (text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or not _HUB_ID.match(text)
            or text.endswith((".safetensors", ".gguf", ".json") + PICKLE_SUFFIXES))


def _resolve_cached_hub_id(repo_id: str, revision: Optional[str]) -> Path:
    """Snapshot folder of ``repo_id`` in the local HF cache, without any network access."""
    from huggingface_hub import snapshot_download

    cache = hf_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, HFValidationError a ValueError
        at = f" at revision {revision!r}" if revision else ""
        raise WeightSourceError(
            f"model {repo_id!r}{at} is not a local path and is not in the Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '<unset>')}, cache {str(cache)!r}); download it first with "
            f"`{download_command(repo_id, revision)}` or pass a local folder") from None
    return Path(folder)


def download_command(repo_id: str, revision: Optional[str] = None) -> str:
    """The shell command of the installed huggingface_hub that downloads ``repo_id`` into the cache: ``hf download``
    (huggingface_hub >= 0.34 ships the ``hf`` CLI), else the older ``huggingface-cli download``."""
    import importlib.util

    cli = "hf" if importlib.util.find_spec("huggingface_hub.cli.hf") is not None else "huggingface-cli"
    return f"{cli} download {repo_id}" + (f" --revision {revision}" if revision else "")


def _open_folder(folder: Path, *, allow_pickle: bool, name: str) -> WeightSource:
    """Pick the weight files of a model folder: safetensors (index, single, or all shards), then GGUF, then
    pickle (opt-in)."""
    config = read_config(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _open_file(folder / SAFETENSORS_INDEX, allow_pickle=allow_pickle, name=name, config=config)
    safetensors_files = sorted(folder.glob("*.safetensors"))
    if safetensors_files:
        preferred = folder / "model.safetensors"
        files = [preferred] if preferred.is_file() else safetensors_files
        return SafetensorsSource(files, name=name, config=config)
    gguf_files = sorted(folder.glob("*.gguf"))
    if len(gguf_files) == 1:
        return _open_file(gguf_files[0], allow_pickle=allow_pickle, name=name, config=config)
    if len(gguf_files) > 1:
        raise WeightSourceError(f"folder {str(folder)!r} holds {len(gguf_files)} GGUF files; pass the path of the "
                                f"one to analyse")
    pickle_files = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if (folder / PICKLE_INDEX).is_file() or pickle_files:
        target = folder / PICKLE_INDEX if (folder / PICKLE_INDEX).is_file() else pickle_files
        return _open_pickle(target, allow_pickle=allow_pickle, name=name, config=config)
    raise WeightSourceError(f"folder {str(folder)!r} has no weights (*.safetensors, *.gguf, or *.bin with "
                            f"allow_pickle=True); pass a folder that holds the model's weight files")


def _open_file(path: Path, *, allow_pickle: bool, name: str, config: dict) -> WeightSource:
    text = path.name
    if text.endswith(".safetensors") or text.endswith(".safetensors.index.json"):
        return SafetensorsSource(path, name=name, config=config)
    if text.endswith(".gguf"):
        return GGUFSource(path, name=name)
    if text.endswith(PICKLE_SUFFIXES) or text.endswith(".bin.index.json"):
        return _open_pickle(path, allow_pickle=allow_pickle, name=name, config=config)
    raise WeightSourceError(f"file {str(path)!r} is not a known weight format; pass a .safetensors, "
                            f".safetensors.index.json or .gguf file (or .bin/.pt with allow_pickle=True)")


def _open_pickle(target: Union[Path, list[Path]], *, allow_pickle: bool, name: str, config: dict) -> WeightSource:
    if not allow_pickle:
        shown = target if isinstance(target, Path) else target[0].parent
        raise WeightSourceError(f"{str(shown)!r} holds only pickle weights (.bin/.pt), which can run code when "
                                f"loaded; pass allow_pickle=True (CLI: --allow-pickle) to load them with "
                                f"torch.load(weights_only=True), or convert them to safetensors")
    return TorchPickleSource(target, name=name, config=config)
