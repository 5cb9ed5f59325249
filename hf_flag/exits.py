"""Exit codes and one-line messages of hf-flag's command lines (``hf-flag``, ``hf-flag sweep``).

=====  ===========================================================================================================
code   meaning
=====  ===========================================================================================================
0      success
1      an internal error (a bug): one line naming the exception and the file its full traceback was saved to;
       for a sweep also "a model's analysis hit an internal error" (its traceback is in its ``error.json``)
2      the user must act: bad input (a path, an argument, a checkpoint, a config key), or a folder that cannot be
       written (full disk, quota, read-only, no permission): one line naming the input or the path
3      a sweep finished incomplete, with no internal error: some models failed on their input (one line each,
       e.g. an unsupported or corrupt checkpoint, a Hub id that cannot be fetched), are missing (a process died
       or --merge-timeout passed: a rerun resumes), or the push to the Hub failed; everything else was written
130    interrupted (Ctrl-C); 143 terminated (SIGTERM): one line; finished work is kept, a rerun resumes
=====  ===========================================================================================================

A *user error* is an :class:`~hf_flag.errors.HfFlagError` (input validation raises
:class:`~hf_flag.errors.InputError` or a more specific subclass: options, config keys, weights sources, adapters,
analysis checks), or an ``OSError`` that names a path (a file that cannot be read or written).  Any other exception
is internal: a plain ``ValueError`` included, wherever it is raised (a geometry invariant check deep in a run, numpy,
torch), and a ``TypeError`` in hf-flag.
"""
from __future__ import annotations

import datetime
import errno
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from types import FrameType
from typing import Optional

from hf_flag.errors import HfFlagError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
#: errno values that mean "this folder cannot take the write" (the user frees space or picks another folder)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


class Terminated(BaseException):
    """SIGTERM received (raised by the handler :func:`terminate_as_exception` installs)."""


def terminate_as_exception() -> None:
    """Turn SIGTERM into :class:`Terminated`, so ``finally`` blocks run (claims released, temporary files removed)
    as they do for Ctrl-C.  Only possible in the main thread; elsewhere nothing changes."""
    def handler(signum: int, frame: Optional[FrameType]) -> None:
        raise Terminated()

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def write_error_message(exc: OSError) -> Optional[str]:
    """One line for an ``OSError`` that means a folder cannot take a write (``None`` for other errors)."""
    if exc.errno not in WRITE_ERRNOS:
        return None
    where = f"cannot write {exc.filename}" if exc.filename else "cannot write"
    return (f"{where}: {exc.strerror or os.strerror(exc.errno)}; free space or fix the folder's permissions (or "
            f"choose another output folder)")


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message of a user error (module docstring), ``None`` when ``exc`` is internal."""
    if isinstance(exc, OSError):
        message = write_error_message(exc)
        if message is not None:
            return message
        if exc.filename:
            return f"{exc.filename}: {exc.strerror or one_line(exc)}"
    if isinstance(exc, HfFlagError):
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__
    return None


def is_internal(exc: BaseException) -> bool:
    """Whether ``exc`` is an internal error (a bug) rather than a user error (module docstring)."""
    return user_message(exc) is None


def save_traceback(exc: BaseException, folder: Optional[Path]) -> Path:
    """Write ``exc``'s full traceback to ``folder`` (or the temporary folder when that fails); returns the file."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = "".join(traceback.format_exception(exc))
    for base in ([folder] if folder is not None else []) + [Path(tempfile.gettempdir())]:
        path = base / f"hf-flag-traceback-{stamp}-{os.getpid()}.txt"
        try:
            base.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    raise exc  # nowhere to write: the traceback goes to the terminal instead


def exit_code(exc: BaseException, prog: str, *, traceback_dir: Optional[Path] = None,
              resume_hint: str = "") -> int:
    """Print the one line for ``exc`` on stderr and return its exit code (module docstring).

    ``SystemExit`` passes through.  ``resume_hint`` is appended to interruptions and write errors (how to resume).
    """
    if isinstance(exc, SystemExit):
        raise exc
    hint = f"; {resume_hint}" if resume_hint else ""
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"{prog}: {what}{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_TERMINATED
    message = user_message(exc)
    if message is not None:
        print(f"{prog}: error: {message}" + (hint if isinstance(exc, OSError) else ""), file=sys.stderr)
        return EXIT_USAGE
    path = save_traceback(exc, traceback_dir)
    print(f"{prog}: internal error: {one_line(exc)}; traceback saved to {path} (please report it)", file=sys.stderr)
    return EXIT_INTERNAL
