"""Atomic file writes: a temporary file in the target's folder, fsync, then ``os.replace``.

Readers see the old file or the new one, never a partial one, and an interrupted write leaves nothing behind.
Every file hf-flag writes (reports, datasets' summaries, plots, cards, the reproduction report) goes through here.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from hf_flag.errors import MissingFolderError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, mode: Optional[int] = None) -> None:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, then rename it over ``path``.

    The file gets permission bits ``mode`` (default: what ``open`` would give under the current umask).
    Raises :class:`~hf_flag.errors.MissingFolderError` (a ``FileNotFoundError``) naming ``path`` when its folder does
    not exist (nothing is created); any other ``OSError`` (full disk, read-only folder) is re-raised naming ``path``,
    with nothing left behind.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise MissingFolderError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist; create it "
                                f"first or choose another output path")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # read-only folder, no permission, full disk: name the file meant, not the temporary
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: Optional[int] = None) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), mode=mode)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: Optional[int] = None) -> None:
    """UTF-8 text, line endings written exactly as given."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    atomic_write(path, write, mode=mode)
