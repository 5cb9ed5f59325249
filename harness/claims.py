"""Claims with leases: which process works on which unit of a sweep, when several share one output folder.

A *claim* on a folder (a unit's run folder, or a rank's presence folder) is the file ``claim.json`` in it::

    {"token": <unique per process>, "owner": "<label>", "host": ..., "pid": ..., "pid_start": ..., "expires": <unix s>}

It is read and replaced only while holding an exclusive :class:`filelock.FileLock` on ``.claim.lock`` beside it
(``flock`` on POSIX, where Linux NFS clients carry it by the server's byte-range locks, so processes on several
machines exclude each other when the folder is shared; ``msvcrt.locking`` on Windows; filelock's soft lock, an
exclusively created file, where neither exists), and written atomically (:func:`hf_flag.atomic.atomic_write_text`: a temporary name
unique to the writing process, then ``os.replace``).

A claim is *live* while its lease has not expired and, when it was taken on this machine, while the process that
took it is still running (the same pid with the same start time, so a reused pid does not count): the claim of a
process killed on this machine is taken over at once, the claim of a process on another machine after its lease
runs out.  Holders renew their leases from a background thread (:class:`Claims`, every ``lease_s / 4`` seconds),
so a live process never loses a claim unless it stalls for a whole lease (suspended, or a clock jump between
machines larger than the lease); :meth:`Claims.holds` tells the holder whether its claim is still its own before it
writes a result.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil
from filelock import FileLock

from hf_flag.atomic import atomic_write_text

CLAIM, LOCK = "claim.json", ".claim.lock"
#: default lease (seconds): a process on another machine that dies is taken over this long after its last renewal
DEFAULT_LEASE_S = 120.0


def process_start(pid: int) -> Optional[str]:
    """Start time of process ``pid``, ``None`` if it is not running: in clock ticks since boot on Linux
    (``/proc/<pid>/stat`` field 22), else psutil's creation time.  With the pid it names one process, even after
    pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            return repr(psutil.Process(pid).create_time())
        except psutil.Error:
            return None
    return stat[stat.rindex(")") + 2:].split()[19]  # fields after "(comm)": state is field 3, starttime field 22


def pid_running(pid: int, start: Optional[str]) -> bool:
    """Whether the process ``pid`` that started at ``start`` (see :func:`process_start`) is still running here."""
    if start is not None:
        return process_start(pid) == start
    return psutil.pid_exists(pid)  # not os.kill(pid, 0): on Windows that sends CTRL_C_EVENT


@dataclass(frozen=True)
class Owner:
    """Who claims: a token unique to this process (and this :class:`Claims`), and how to name it to people."""

    token: str
    label: str
    host: str
    pid: int
    pid_start: Optional[str]

    @classmethod
    def this_process(cls, label: str = "") -> "Owner":
        pid, host = os.getpid(), socket.gethostname()
        return cls(token=uuid.uuid4().hex, label=label or f"pid {pid} on {host}", host=host, pid=pid,
                   pid_start=process_start(pid))


def read_claim(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The claim recorded in ``folder`` (``None`` when there is none or it cannot be read)."""
    try:
        data = json.loads((Path(folder) / CLAIM).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_live(claim: Optional[dict[str, Any]], now: Optional[float] = None) -> bool:
    """Whether ``claim`` still holds: lease not expired, and its process running when it was taken on this host."""
    if not claim:
        return False
    if float(claim.get("expires", 0.0)) <= (time.time() if now is None else now):
        return False
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        return pid_running(claim["pid"], claim.get("pid_start"))
    return True


@contextlib.contextmanager
def locked(folder: Path, create: bool = True) -> Iterator[None]:
    """Exclusive lock of ``folder/.claim.lock`` for the block (other processes and other threads wait); ``create``:
    make the folder if needed (else ``FileNotFoundError`` when the folder is gone, as for a finished run whose
    bookkeeping was removed)."""
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():  # FileLock would make the folder again
        raise FileNotFoundError(errno.ENOENT, "claim folder is gone", str(folder))
    with FileLock(folder / LOCK):  # a fresh instance per block: threads of one process exclude each other too
        yield


def clear_stale(folder: str | os.PathLike) -> None:
    """Remove the claim on ``folder`` if it is no longer live (its holder died between recording the unit's outcome
    and releasing its claim); a live claim and a folder without one are left alone."""
    folder = Path(folder)
    if not (folder / CLAIM).exists():
        return
    with locked(folder, create=False):
        if not is_live(read_claim(folder)):
            (folder / CLAIM).unlink(missing_ok=True)


class Claims:
    """The claims of one process: take, renew (background thread), check and release them.

    Use as a context manager: the renewal thread runs inside the block and every claim still held is released at
    its end (a process killed inside the block leaves its claims to expire, see the module docstring).
    """

    def __init__(self, owner: Owner, lease_s: float = DEFAULT_LEASE_S):
        if not lease_s > 0:
            raise ValueError(f"lease_s={lease_s!r} must be > 0 seconds")
        self.owner, self.lease_s = owner, float(lease_s)
        self.held: set[Path] = set()
        self.lost: set[Path] = set()  # claims another process took over while this one stalled
        self.mutex = threading.Lock()
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Claims":
        self.thread = threading.Thread(target=self.renew_loop, name="hf-flag-claims", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        for folder in list(self.held):
            try:
                self.release(folder)
            except OSError:  # a folder gone or no longer writable: the claim lapses with its lease
                pass

    def record(self, **extra: Any) -> dict[str, Any]:
        o = self.owner
        return {"token": o.token, "owner": o.label, "host": o.host, "pid": o.pid, "pid_start": o.pid_start,
                "expires": time.time() + self.lease_s, "lease_s": self.lease_s, **extra}

    def try_claim(self, folder: str | os.PathLike, **extra: Any) -> Optional[dict[str, Any]]:
        """Claim ``folder`` unless another live process holds it.  Returns ``None`` on success (also when this
        process held it already), else the other holder's claim record.  ``extra`` goes into the record."""
        folder = Path(folder)
        with locked(folder):
            current = read_claim(folder)
            if current is not None and current.get("token") != self.owner.token and is_live(current):
                return current
            atomic_write_text(folder / CLAIM, json.dumps(self.record(**extra), sort_keys=True) + "\n")
        with self.mutex:
            self.held.add(folder)
            self.lost.discard(folder)
        return None

    def holds(self, folder: str | os.PathLike) -> bool:
        """Whether this process still holds its claim on ``folder`` (read from the folder, not from memory)."""
        claim = read_claim(folder)
        return claim is not None and claim.get("token") == self.owner.token

    def release(self, folder: str | os.PathLike) -> None:
        """Give up the claim on ``folder`` (the file is removed only if it is still this process's claim)."""
        folder = Path(folder)
        with self.mutex:
            self.held.discard(folder)
        if not folder.is_dir():  # removed with everything in it (a finished run's bookkeeping)
            return
        with locked(folder, create=False):
            if self.holds(folder):
                (folder / CLAIM).unlink(missing_ok=True)

    def renew(self) -> None:
        """Extend the lease of every claim held; a claim found taken over is dropped and remembered in ``lost``."""
        with self.mutex:
            folders = list(self.held)
        for folder in folders:
            if not folder.is_dir():
                with self.mutex:
                    self.held.discard(folder)
                    self.lost.add(folder)
                continue
            with locked(folder, create=False):
                claim = read_claim(folder)
                if claim is None or claim.get("token") != self.owner.token:
                    with self.mutex:
                        self.held.discard(folder)
                        self.lost.add(folder)
                    continue
                claim["expires"] = time.time() + self.lease_s
                atomic_write_text(folder / CLAIM, json.dumps(claim, sort_keys=True) + "\n")

    def renew_loop(self) -> None:
        while not self.stop.wait(self.lease_s / 4):
            try:
                self.renew()
            except OSError:  # a full disk or a vanished folder: the claim lapses, the owner finds out via holds()
                pass
