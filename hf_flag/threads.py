"""CPU threads per process: each process takes its share of the cores, so several processes on one machine
(``accelerate launch``, ``torchrun``) or a busy machine do not oversubscribe the cores.

Share = usable cores (``os.sched_getaffinity``) // processes on this machine (``LOCAL_WORLD_SIZE``, else
``ACCELERATE_NUM_PROCESSES``/``WORLD_SIZE`` when no node count says otherwise), at least 1, and no more than the
cores idle right now. "Right now" is a short sample of CPU use (:data:`SAMPLE_SECONDS` of ``psutil.cpu_times`` on
the usable cores, mapped to psutil's per-CPU entries by CPU id: :func:`percpu_ids`), not the 1-minute load average,
which still counts a run that has just finished (the user's own previous command) as load for a minute after it
ended. An explicit ``OMP_NUM_THREADS`` wins. The share goes to torch (``torch.set_num_threads``) and to the
BLAS/OpenMP pools (threadpoolctl, when installed).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import psutil

__all__ = ["SAMPLE_SECONDS", "busy_cores", "percpu_ids", "sample_busy_cores", "thread_share", "configure_threads"]

_PROCESS_COUNT_VARS = ("LOCAL_WORLD_SIZE", "ACCELERATE_NUM_PROCESSES", "WORLD_SIZE")
#: length of the CPU-use sample (seconds)
SAMPLE_SECONDS = 0.1
#: ``cpu_times`` fields that are not work (the rest -- user, nice, system, irq, softirq, steal -- is)
_IDLE_FIELDS = ("idle", "iowait")
#: Linux's list of the online CPUs (the ones ``psutil.cpu_times(percpu=True)`` lists, in order)
ONLINE_CPUS = Path("/sys/devices/system/cpu/online")


def parse_cpu_list(text: str) -> list[int]:
    """CPU ids of a Linux CPU list (``"0-3,5,7-8"``, as in ``/sys/devices/system/cpu/online``), in order."""
    ids: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            ids.extend(range(int(first), int(last or first) + 1))
    return ids


def percpu_ids(entries: int) -> Optional[list[int]]:
    """The CPU id of each entry of ``psutil.cpu_times(percpu=True)`` (``entries`` of them), or ``None`` when unknown.

    psutil lists the *online* CPUs only, in order, so entry ``i`` is CPU ``i`` only when every CPU is online.  The
    ids come from :data:`ONLINE_CPUS` (Linux) when it lists ``entries`` CPUs, else ``range(entries)`` when as many
    CPUs are configured as listed (none offline), else they are unknown."""
    try:
        online = parse_cpu_list(ONLINE_CPUS.read_text())
    except (OSError, ValueError):
        online = []
    if len(online) == entries:
        return online
    try:
        configured = os.sysconf("SC_NPROCESSORS_CONF")
    except (AttributeError, OSError, ValueError):
        return None
    return list(range(entries)) if configured == entries else None


def busy_fraction(start: Any, end: Any) -> Optional[float]:
    """Share of the time between two ``cpu_times`` samples spent working, in [0, 1] (``None``: no time passed)."""
    start, end = start._asdict(), end._asdict()
    elapsed = sum(end.values()) - sum(start.values())
    if elapsed <= 0:
        return None
    idle = sum(end.get(f, 0.0) - start.get(f, 0.0) for f in _IDLE_FIELDS)
    return min(1.0, max(0.0, (elapsed - idle) / elapsed))


def busy_cores(before: Sequence[Any], after: Sequence[Any], cpus: Iterable[int],
               ids: Optional[Sequence[int]]) -> float:
    """Cores' worth of work done on CPUs ``cpus`` between two per-CPU ``psutil.cpu_times(percpu=True)`` samples:
    the sum over those CPUs of (busy time / elapsed time), each term in [0, 1].

    ``ids``: the CPU id of each entry of the samples (:func:`percpu_ids`; ``None`` when unknown).  When a CPU of
    ``cpus`` is not among them (unknown ids, an offline CPU in the affinity set), the machine-wide busy fraction
    (all entries together, what ``psutil.cpu_times()`` gives) scaled to ``len(cpus)`` stands in for the per-CPU
    sum.  Samples of different lengths (a CPU went on- or offline between them) measure nothing: 0."""
    if len(before) != len(after) or not before:
        return 0.0
    cpus = list(cpus)
    entry = {cpu: i for i, cpu in enumerate(ids)} if ids is not None and len(ids) == len(before) else {}
    if all(cpu in entry for cpu in cpus):
        return sum(busy_fraction(before[entry[cpu]], after[entry[cpu]]) or 0.0 for cpu in cpus)
    return (busy_fraction(machine_times(before), machine_times(after)) or 0.0) * len(cpus)


def machine_times(sample: Sequence[Any]) -> Any:
    """The machine-wide ``cpu_times`` of a per-CPU sample: each field summed over the CPUs."""
    return type(sample[0])(*(sum(field) for field in zip(*sample)))


def sample_busy_cores(cpus: Iterable[int], seconds: float = SAMPLE_SECONDS) -> float:
    """:func:`busy_cores` over a live sample of ``seconds`` (this process sleeps meanwhile, so it counts as idle)."""
    before = psutil.cpu_times(percpu=True)
    time.sleep(seconds)
    return busy_cores(before, psutil.cpu_times(percpu=True), cpus, percpu_ids(len(before)))


def thread_share(environ: Optional[dict] = None, cpus: Optional[Sequence[int]] = None,
                 busy: Optional[float] = None) -> int:
    """Threads this process should use (module docstring rule).  ``cpus``: the usable CPU ids (default
    ``os.sched_getaffinity(0)``); ``busy``: cores' worth of other work on them (default: a live
    :func:`sample_busy_cores`, taken only when it can lower the share)."""
    env = os.environ if environ is None else environ
    explicit = env.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    processes = next((int(env[v]) for v in _PROCESS_COUNT_VARS if env.get(v, "").isdigit() and int(env[v]) > 0), 1)
    share = max(1, len(cpus) // processes)
    if share == 1:
        return 1
    busy = sample_busy_cores(cpus) if busy is None else busy
    idle = max(1, int(len(cpus) - busy + 0.5))
    return max(1, min(share, idle))


def configure_threads() -> int:
    """Apply :func:`thread_share` to torch and the BLAS pools; returns the thread count."""
    import torch

    n = thread_share()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return n
    threadpool_limits(limits=n)
    return n
