"""Offline registration of hf-flag's evaluate modules: ``flag_alignment`` (measurement), ``neural_collapse`` (metric).

``evaluate.load("flag_alignment")`` with a bare name first asks the Hub for ``evaluate-<type>/flag_alignment``; when
that fails (no network, or ``HF_EVALUATE_OFFLINE=1``; evaluate ignores ``HF_HUB_OFFLINE``) it falls back to the
dynamic modules cache, ``<HF_MODULES_CACHE>/evaluate_modules/metrics/evaluate-<type>--<name>/<64-hex hash>/<name>.py``
(evaluate 0.4.x, ``CachedEvaluationModuleFactory``), choosing the most recently modified hash folder.
:func:`register_evaluate_modules` writes a shim there that only imports our class, so the bare name resolves with
no network and no monkeypatching.  That fallback logs "Using the latest cached version of the module ... since it
couldn't be found locally ..., or remotely on the Hugging Face Hub" (``CachedEvaluationModuleFactory.get_module``),
which for these shims is expected, not a problem: :func:`quiet_cached_module_notice` drops exactly that record, for
these two modules only, from evaluate's ``evaluate.loading`` logger (a ``logging.Filter``; evaluate 0.4 has no way
from a bare name to a local module that skips the Hub-then-cache lookup).  ``import hf_flag`` calls both (a few
``stat`` calls when already current; set ``HF_FLAG_NO_REGISTER=1`` to skip the registration); ``hf-flag register`` calls it explicitly.  The paths
:data:`FLAG_ALIGNMENT_PATH` and :data:`NEURAL_COLLAPSE_PATH` work with ``evaluate.load(path)`` everywhere.

This file must stay import-cheap: it never imports ``evaluate``, ``datasets`` or ``torch``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["FLAG_ALIGNMENT_PATH", "NEURAL_COLLAPSE_PATH", "MODULES", "hf_modules_cache", "register_evaluate_modules",
           "register_main", "quiet_cached_module_notice"]

_HERE = Path(__file__).resolve().parent
FLAG_ALIGNMENT_PATH = str(_HERE / "flag_alignment")
NEURAL_COLLAPSE_PATH = str(_HERE / "neural_collapse")

# name -> (evaluate module type used in the cache folder name, main class)
MODULES: dict[str, tuple[str, str]] = {
    "flag_alignment": ("measurement", "FlagAlignment"),
    "neural_collapse": ("metric", "NeuralCollapse"),
}
_DYNAMIC_MODULES = "evaluate_modules"  # evaluate.config.MODULE_NAME_FOR_DYNAMIC_MODULES
_NAMESPACE = "metrics"  # CachedEvaluationModuleFactory's default module_type folder
_warned = False
EVALUATE_LOADING_LOGGER = "evaluate.loading"  # evaluate.utils.logging.get_logger(__name__) in evaluate/loading.py


def module_folder(name: str) -> str:
    """The cache folder name evaluate gives the bare-name module ``name``: ``evaluate-<type>--<name>``."""
    return f"evaluate-{MODULES[name][0]}--{name}"


class CachedModuleNoticeFilter(logging.Filter):
    """Drops evaluate's "couldn't be found ... remotely on the Hugging Face Hub" notice for hf-flag's shims only."""

    folders = tuple(module_folder(name) for name in MODULES)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("couldn't be found locally" in message and any(f in message for f in self.folders))


NOTICE_FILTER = CachedModuleNoticeFilter()


def quiet_cached_module_notice() -> None:
    """Install :class:`CachedModuleNoticeFilter` on evaluate's loading logger (idempotent; imports no evaluate)."""
    logging.getLogger(EVALUATE_LOADING_LOGGER).addFilter(NOTICE_FILTER)


def hf_modules_cache() -> Path:
    """The folder evaluate reads dynamic modules from: ``evaluate.config.HF_MODULES_CACHE``.

    Taken from ``evaluate.config`` when evaluate is already imported, otherwise resolved from the environment
    exactly as evaluate 0.4 does (``HF_MODULES_CACHE``, else ``$HF_HOME/modules``, else
    ``$XDG_CACHE_HOME/huggingface/modules``, else ``~/.cache/huggingface/modules``) without importing it.
    """
    config = sys.modules.get("evaluate.config")
    if config is not None:
        return Path(config.HF_MODULES_CACHE)
    xdg = os.getenv("XDG_CACHE_HOME", "~/.cache")
    home = os.path.expanduser(os.getenv("HF_HOME", os.path.join(xdg, "huggingface")))
    return Path(os.getenv("HF_MODULES_CACHE", os.path.join(home, "modules")))


def _shim_source(name: str, cls: str) -> str:
    return (
        f'"""Shim so that evaluate.load("{name}") works offline; written by hf_flag register_evaluate_modules."""\n'
        f"from hf_flag.integrations.evaluate_modules.{name}.{name} import {cls}\n\n"
        f'__all__ = ["{cls}"]\n'
    )


def _touch_init(folder: Path) -> None:
    init = folder / "__init__.py"
    if not init.exists():
        init.touch()


def _is_current(shim: Path, source: str) -> bool:
    """``shim`` exists with this content and is the newest hash folder's module (the one evaluate picks)."""
    try:
        if shim.read_text(encoding="utf-8") != source:
            return False
        mtime = shim.stat().st_mtime
        for folder in shim.parent.parent.iterdir():
            other = folder / shim.name
            if len(folder.name) == 64 and folder != shim.parent and other.exists() and other.stat().st_mtime > mtime:
                return False
        return True
    except OSError:
        return False


def _write_shim(shim: Path, source: str) -> Path:
    """Write ``shim`` (``<module dir>/<sha256>/<name>.py``) atomically: a temp folder renamed into place."""
    import shutil
    import tempfile

    target, module_dir = shim.parent, shim.parent.parent
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=module_dir))
    try:
        (tmp / "__init__.py").touch()
        (tmp / shim.name).write_text(source, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not shim.exists():  # not a concurrent writer of the same content: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shim


def register_evaluate_modules(force: bool = False, modules_cache: Optional[os.PathLike] = None) -> dict[str, str]:
    """Make ``evaluate.load("flag_alignment")`` / ``evaluate.load("neural_collapse")`` work offline.

    Writes (idempotently, atomically) one shim per module into evaluate's dynamic modules cache
    (``modules_cache`` defaults to :func:`hf_modules_cache`) and returns ``{name: shim path}``.  Skips a module
    whose shim is already current unless ``force``.  Raises ``OSError`` when the cache is not writable.
    """
    root = Path(modules_cache) if modules_cache is not None else hf_modules_cache()
    dynamic = root / _DYNAMIC_MODULES
    out: dict[str, str] = {}
    for name, (_, cls) in MODULES.items():
        module_dir = dynamic / _NAMESPACE / module_folder(name)
        source = _shim_source(name, cls)
        shim = module_dir / hashlib.sha256(source.encode("utf-8")).hexdigest() / f"{name}.py"
        if not force and _is_current(shim, source):
            out[name] = str(shim)
            continue
        module_dir.mkdir(parents=True, exist_ok=True)
        for folder in (root, dynamic, dynamic / _NAMESPACE, module_dir):
            _touch_init(folder)
        out[name] = str(_write_shim(shim, source))
    return out


def register_at_import() -> None:
    """What ``import hf_flag`` runs: quiet evaluate's cached-module notice for our shims, and register unless
    ``HF_FLAG_NO_REGISTER=1``; never raises, warns once."""
    global _warned
    quiet_cached_module_notice()
    if os.getenv("HF_FLAG_NO_REGISTER", "").upper() in ("1", "TRUE", "YES", "ON"):
        return
    try:
        register_evaluate_modules()
    except OSError as err:
        if not _warned:
            _warned = True
            warnings.warn(
                f"hf_flag: could not register the evaluate modules in {hf_modules_cache()} ({err}); "
                f"evaluate.load('flag_alignment') by bare name will not work offline: set HF_MODULES_CACHE to a "
                f"writable folder or use evaluate.load(hf_flag.integrations.evaluate_modules.FLAG_ALIGNMENT_PATH)",
                RuntimeWarning, stacklevel=3,
            )


REGISTER_DESCRIPTION = ("Write two small files into evaluate's module cache so that evaluate.load('flag_alignment') "
                        "and evaluate.load('neural_collapse') work offline (import hf_flag does it too); prints "
                        "where. Set HF_EVALUATE_OFFLINE=1 to skip evaluate's Hub lookup.")


def register_main(argv: Optional[Sequence[str]] = None) -> int:
    """``hf-flag register [--force]``: write the shims and print where; exit status 0 on success, 1 on failure."""
    import argparse

    parser = argparse.ArgumentParser(prog="hf-flag register", description=REGISTER_DESCRIPTION)
    parser.add_argument("--force", action="store_true", help="rewrite the shims even when they are current")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        written = register_evaluate_modules(force=args.force)
    except OSError as err:
        print(f"hf-flag register: cannot write to {hf_modules_cache()}: {err}; set HF_MODULES_CACHE to a writable "
              f"folder", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {path}")
    print("evaluate.load(<name>) now resolves offline (set HF_EVALUATE_OFFLINE=1 to skip the Hub lookup)")
    return 0
