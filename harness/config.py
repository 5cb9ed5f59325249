"""Sweep configuration: a YAML file and/or command-line arguments, validated into one :class:`SweepConfig`.

YAML keys (all optional; command-line arguments override them, command-line models are added to them)::

    models:                 # Hub ids, local folders / files, or {path:, name: org/name, revision:, gguf_file:}
      - sentence-transformers/all-MiniLM-L6-v2
      - {path: ./my-model, name: me/my-model}
      - {path: Qwen/Qwen2.5-0.5B, revision: 060db6499f32faf8b98477b0a26969ef7d8b9987}
    out: results/sweep      # output folder
    diagnostics: [mlp, vo]  # passed to hf_flag.analyze (null: all); "mlp, vo" and "mlp vo" work too
    composition: adjacent   # auto (default) | all | adjacent | none
    cheap: false
    device: auto            # auto (default: cuda when available, else cpu) | cpu | cuda
    split_layers: false     # split each model's layers across the processes
    write_model_cards: false  # also update README.md inside local model folders
    cards_dir: null         # where DIR/model_cards/<org>--<name>/README.md goes (default: OUT/model_cards)
    push_to_hub: null       # true: push the cards; a dataset repo id: the cards and the results dataset there
    create_pr: false        # open card pull requests even where the token could commit
    allow_derived: false    # push cards computed from derived weights (GGUF, local copies) to the named repo
    max_disk: null          # GB: stream sharded Hub checkpoints shard by shard within this much disk
    merge_timeout: 86400    # seconds rank 0 waits for the other ranks' results

``output`` is accepted as another name for ``out``.  A commented example ships as ``examples/sweep.yaml``.
A malformed file raises :class:`ConfigError` (an ``hf_flag.errors.InputError``, so also a ``ValueError``) with one
line naming the key and what to write; an unknown key is named with the closest known one and the list of known
keys (:data:`CONFIG_KEYS`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from hf_flag.errors import InputError
from hf_flag.options import valid_gb
from hf_flag.defaults import (COMPOSITION_MODES, DIAGNOSTIC_NAMES, default_hub_id, default_named_paths,
                              model_slug, parse_diagnostics)

DEVICES = ("cpu", "cuda", "auto")
DEFAULT_MERGE_TIMEOUT = 24 * 3600.0


#: every key a sweep config may hold (the module docstring says what each takes); ``output`` is ``out``'s alias
CONFIG_KEYS = ("models", "out", "diagnostics", "composition", "cheap", "device", "split_layers", "write_model_cards",
               "cards_dir", "push_to_hub", "create_pr", "allow_derived", "max_disk", "merge_timeout")
KEY_ALIASES = {"output": "out"}


class ConfigError(InputError):
    """A sweep configuration (YAML file or arguments) is malformed; the message names the key."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of a sweep: ``path`` is what ``open_weights`` gets; ``name`` (``org/name``) labels it;
    ``revision`` and ``gguf_file`` select what a Hub id is read at (``open_weights``'s arguments)."""

    path: str
    name: Optional[str] = None
    revision: Optional[str] = None
    gguf_file: Optional[str] = None

    @property
    def label(self) -> str:
        return self.name or self.path


@dataclass(frozen=True)
class SweepConfig:
    models: tuple[ModelSpec, ...]
    out: Path
    diagnostics: Optional[tuple[str, ...]] = None
    composition: str = "auto"  # all layer pairs where the printed cost estimate is small, else adjacent
    cheap: bool = False
    device: str = "auto"  # cuda when available, else cpu (resolve_device)
    split_layers: bool = False
    write_model_cards: bool = False
    cards_dir: Optional[Path] = None  # folder of the per-model cards; None: out / "model_cards"
    push_to_hub: Optional[str | bool] = None  # True: cards only; "org/name": cards and the dataset there
    create_pr: bool = False
    allow_derived: bool = False
    max_disk: Optional[float] = None  # GB of shards a streamed Hub checkpoint may hold on disk
    merge_timeout: float = DEFAULT_MERGE_TIMEOUT
    analyze_kwargs: dict = field(default_factory=dict)  # extra keyword arguments for analyze (tests, benchmarks)

    def params(self) -> dict[str, Any]:
        """The parameters that change results (they enter each run's fingerprint)."""
        return {"diagnostics": self.diagnostics, "composition": self.composition, "cheap": self.cheap,
                **{k: repr(v) for k, v in sorted(self.analyze_kwargs.items())}}


def _type_error(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {expected}, got {type(value).__name__} {value!r:.60}")


def parse_model(entry: Any, key: str) -> ModelSpec:
    """A ``models`` entry: a string, or a mapping ``{path: str, name: str (optional)}``."""
    if isinstance(entry, str) and entry.strip():
        return ModelSpec(entry.strip(), default_hub_id(entry.strip()))
    if isinstance(entry, Mapping):
        fields = ("path", "name", "revision", "gguf_file")
        unknown = set(entry) - set(fields)
        if unknown:
            raise ConfigError(f"config key {key!r}: unknown field {sorted(unknown)[0]!r}; a model entry takes the "
                              f"fields {', '.join(fields)}")
        path = entry.get("path")
        if not isinstance(path, str) or not path.strip():
            raise _type_error(f"{key}.path", "a non-empty string", path)
        for field_name in fields[1:]:
            value = entry.get(field_name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise _type_error(f"{key}.{field_name}", "a non-empty string", value)
        return ModelSpec(path.strip(), *((entry.get(f) or "").strip() or None for f in fields[1:]))
    raise _type_error(key, "a model id/path string or {path: ..., name: ...}", entry)


def _check(key: str, value: Any, ok: bool, expected: str) -> Any:
    if not ok:
        raise _type_error(key, expected, value)
    return value


def _validate(key: str, value: Any) -> tuple[str, Any]:
    """One YAML key and value -> ``(SweepConfig field, validated value)``; ``ConfigError`` naming the key."""
    if key == "models":
        _check(key, value, isinstance(value, list) and bool(value), "a non-empty list")
        return "models", tuple(parse_model(v, f"models[{i}]") for i, v in enumerate(value))
    if key == "cards_dir" and value is None:
        return key, None  # the default, OUT/model_cards
    if KEY_ALIASES.get(key, key) in ("out", "cards_dir"):
        folder = _check(key, value, isinstance(value, str) and bool(value.strip()), "a folder path")
        return KEY_ALIASES.get(key, key), Path(folder)
    if key == "diagnostics":
        if value is None:
            return "diagnostics", None
        _check(key, value, isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str)
                                                                                       for v in value)),
               f"a list of diagnostic names from {', '.join(DIAGNOSTIC_NAMES)}")
        try:
            return "diagnostics", parse_diagnostics(value)
        except ValueError as exc:
            raise ConfigError(f"config key {key!r}: {exc}") from None
    if key == "composition":
        return key, _check(key, value, value in COMPOSITION_MODES, f"one of {', '.join(COMPOSITION_MODES)}")
    if key == "device":
        return key, _check(key, value, value in DEVICES, f"one of {', '.join(DEVICES)}")
    if key in ("cheap", "split_layers", "write_model_cards", "create_pr", "allow_derived"):
        return key, _check(key, value, isinstance(value, bool), "true or false")
    if key == "push_to_hub":
        ok = value is None or value is True or (isinstance(value, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", value)
                                                 is not None)
        return key, _check(key, value, ok, "true (cards only), a dataset repo id like org/name, or null")
    if key == "max_disk":
        ok = value is None or valid_gb(value)
        return key, None if value is None else float(_check(key, value, ok, "a positive, finite number of GB, or null"))
    if key == "merge_timeout":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        return key, float(_check(key, value, ok, "a positive number of seconds"))
    raise unknown_key(key)


def unknown_key(key: str) -> ConfigError:
    """The one-line error for an unknown config key: the key, the closest known one if any, and all known keys."""
    import difflib

    close = difflib.get_close_matches(key, (*CONFIG_KEYS, *KEY_ALIASES), n=1)
    hint = f"did you mean {KEY_ALIASES.get(close[0], close[0])!r}? " if close else ""
    return ConfigError(f"config key {key!r} is unknown; {hint}known keys: {', '.join(CONFIG_KEYS)} "
                       f"(see examples/sweep.yaml)")


def parse_config(data: Any, *, source: str = "config") -> dict[str, Any]:
    """Validate a loaded YAML mapping; returns ``SweepConfig`` field -> value for the keys present."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys (models:, out:, ...), got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name, parsed = _validate(str(key), value)
        out[name] = parsed
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML sweep config file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc}); give an existing YAML file")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {exc.start}); save the YAML file as UTF-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid YAML{where}: {problem}")
    return parse_config(data, source=f"--config {path}")


def default_model_specs() -> list[ModelSpec]:
    """The embedded default models (``--default``), named by their Hub ids."""
    return [ModelSpec(path, hub_id) for path, hub_id in default_named_paths()]


def build_config(file_values: Mapping[str, Any], cli_values: Mapping[str, Any],
                 extra_models: Sequence[ModelSpec] = ()) -> SweepConfig:
    """Merge validated config-file values with command-line values (which win; models are concatenated,
    duplicates dropped) into a :class:`SweepConfig`."""
    values = {**file_values, **{k: v for k, v in cli_values.items() if v is not None and k != "models"}}
    models: list[ModelSpec] = []
    for spec in (*file_values.get("models", ()), *(cli_values.get("models") or ()), *extra_models):
        if spec.path not in {m.path for m in models}:
            models.append(spec)
    if not models:
        raise ConfigError("no models: give MODEL arguments, a config file with a models: list, or --default")
    if "out" not in values:
        raise ConfigError("no output folder: give --out DIR or the config key 'out'")
    values["models"] = tuple(models)
    if values.get("cards_dir") is None:
        values["cards_dir"] = Path(values["out"]) / "model_cards"
    return replace(SweepConfig(models=(), out=Path(".")), **values)


def slugs(specs: Sequence[ModelSpec]) -> list[str]:
    """Folder name of each model: ``org--name`` for Hub ids and named models, ``local--<folder or file stem>``
    for other local paths; names that collide get a short hash of the path."""
    bases = [model_slug(s.path, s.name, local_prefix="local--") for s in specs]
    return [b if bases.count(b) == 1 else f"{b}-{hashlib.sha256(s.path.encode()).hexdigest()[:8]}"
            for b, s in zip(bases, specs)]
