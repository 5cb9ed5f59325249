"""Where weights come from: :func:`open_weights` turns a model or a path into a :class:`WeightSource`.

Accepted inputs, in the order they are tried:

* an existing :class:`WeightSource` (returned as is);
* an in-memory ``torch.nn.Module`` / ``transformers.PreTrainedModel`` -> :class:`ModuleSource`;
* an existing local file: ``*.safetensors``, a ``*.safetensors.index.json`` shard index, ``*.gguf``, or (only with
  ``allow_pickle=True``) ``*.bin`` / ``*.pt`` / ``*.pth`` / a ``pytorch_model.bin.index.json``;
* an existing local folder holding those files (and usually ``config.json``);
* otherwise a Hugging Face Hub id: the files the analysis reads are fetched through huggingface_hub's cache
  (:mod:`hf_flag.weights.hub`: cache first, ``HF_HUB_OFFLINE`` honoured, ``revision`` pinned, tokenizers and other
  files never fetched).

Every source gets ``provenance`` (:func:`provenance`): where the weights came from (Hub id and commit sha, or a
local model's Hub name from its config), the file format and the files read (names only, never absolute paths).

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

from hf_flag.defaults import default_hub_id
from hf_flag.errors import WeightSourceError
from hf_flag.weights import hub
from hf_flag.weights.hub import hf_cache_dir
from hf_flag.weights.gguf_source import GGUFSource
from hf_flag.weights.module_source import ModuleSource
from hf_flag.weights.pickle_source import TorchPickleSource
from hf_flag.weights.safetensors_source import SafetensorsSource
from hf_flag.weights.streaming import StreamingHubSource
from hf_flag.weights.weight_source import WeightSource

__all__ = ["open_weights", "WeightSource", "ModuleSource", "SafetensorsSource", "GGUFSource", "TorchPickleSource",
           "read_config", "hf_cache_dir", "provenance", "file_format", "check_gguf_file"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def check_gguf_file(model_or_path: Union[str, os.PathLike, nn.Module, WeightSource],
                    gguf_file: Optional[str]) -> None:
    """:class:`WeightSourceError` (one line) when ``gguf_file`` is given for a model that is not a Hub id (a local
    path, a module): it selects a file of a GGUF Hub repo only.  Reads nothing."""
    local = not isinstance(model_or_path, (str, os.PathLike)) or Path(model_or_path).expanduser().exists()
    if gguf_file is not None and local:
        what = repr(os.fspath(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else "a torch module"
        raise WeightSourceError(f"--gguf-file {gguf_file!r} selects a file of a GGUF Hub repo, but model {what} is not "
                                f"a Hub id; pass the local .gguf file's path as the model instead")


def open_weights(model_or_path: Union[str, os.PathLike, nn.Module, WeightSource], *, allow_pickle: bool = False,
                 revision: Optional[str] = None, gguf_file: Optional[str] = None,
                 max_disk_bytes: Optional[int] = None) -> WeightSource:
    """Open a model's weights for lazy, one-tensor-at-a-time reading (see the module docstring for inputs).

    ``revision`` (branch, tag or commit sha), ``gguf_file`` (which ``.gguf`` of a GGUF repo) and ``max_disk_bytes``
    (a sharded safetensors repo is then streamed shard by shard within that many bytes of disk:
    :class:`~hf_flag.weights.streaming.StreamingHubSource`) apply to Hub ids only.
    Raises :class:`WeightSourceError` for a missing path, a folder without weights, a corrupt or truncated
    checkpoint, a Hub id that cannot be fetched (one line naming the repo and the remedy), or pickle files without
    ``allow_pickle=True``.
    """
    if max_disk_bytes is not None and max_disk_bytes <= 0:
        raise WeightSourceError(f"max_disk_bytes {max_disk_bytes} is not positive; give the bytes of checkpoint shards "
                                f"to hold on disk (--max-disk GB > 0), or None to download whole")
    check_gguf_file(model_or_path, gguf_file)
    if isinstance(model_or_path, WeightSource):
        return model_or_path
    if isinstance(model_or_path, nn.Module):
        source = ModuleSource(model_or_path)
        source.provenance = {"source": "module", "format": "module", "class": type(model_or_path).__name__}
        return source
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise WeightSourceError(f"model of type {type(model_or_path).__name__} is not supported; pass a torch "
                                f"module, a local path, or a Hub id such as org/name")
    text = os.fspath(model_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        source = _open_file(path, allow_pickle=allow_pickle, name=path.name, config=read_config(path.parent))
        files = [path.name]
    elif path.is_dir():
        source = _open_folder(path, allow_pickle=allow_pickle, name=path.name)
        files = []
    elif _looks_like_path(text):
        raise WeightSourceError(f"model path {text!r} does not exist; check the path (or pass a Hub id such as "
                                f"org/name)")
    else:
        stream = max_disk_bytes is not None and not hub.offline()  # offline, every shard is in the cache already
        snapshot = hub.resolve(text, revision=revision, gguf_file=gguf_file, allow_pickle=allow_pickle,
                               shards=not stream)
        if stream and snapshot.files[-1] == hub.SAFETENSORS_INDEX:
            source = StreamingHubSource(snapshot, config=read_config(snapshot.folder), max_bytes=max_disk_bytes,
                                        sizes=snapshot.sizes)
            source.provenance = {**snapshot.provenance("safetensors"), "max_disk_bytes": int(max_disk_bytes)}
            return source
        if stream and snapshot.files[-1].endswith(".index.json"):  # a pickle index: not streamed
            snapshot = hub.resolve(text, revision=revision, gguf_file=gguf_file, allow_pickle=allow_pickle)
        weights = [f for f in snapshot.files if f != hub.CONFIG]
        target = snapshot.folder / weights[0]
        if len(weights) > 1 and not target.name.endswith(".index.json"):
            source = SafetensorsSource([snapshot.folder / f for f in weights], name=text,
                                       config=read_config(snapshot.folder))
        else:
            source = _open_file(target, allow_pickle=allow_pickle, name=text, config=read_config(snapshot.folder))
        source.provenance = snapshot.provenance(file_format(source))
        return source
    # a local copy is named by its folder or file (the source's name) unless the caller names it: its config's
    # _name_or_path names the model it was loaded or fine-tuned from, not this copy; only the embedded default
    # models are known to be their Hub repos' files
    source.provenance = {"source": "local", "format": file_format(source), "hub_name": default_hub_id(text),
                         **({"files": files} if files else {})}
    return source


def file_format(source: WeightSource) -> str:
    """``"safetensors"``, ``"gguf"``, ``"pickle"`` or ``"module"``: the storage format ``source`` reads."""
    formats = {SafetensorsSource: "safetensors", StreamingHubSource: "safetensors", GGUFSource: "gguf",
               TorchPickleSource: "pickle", ModuleSource: "module"}
    return next(v for k, v in formats.items() if isinstance(source, k))


def provenance(source: WeightSource) -> dict:
    """Where ``source``'s weights come from (set by :func:`open_weights`; ``{}`` for a source built directly)."""
    return dict(getattr(source, "provenance", None) or {})


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
