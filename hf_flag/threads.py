"""CPU threads per process: each process takes its share of the cores, so several processes on one machine
(``accelerate launch``, ``torchrun``) or a busy machine do not oversubscribe the cores.

Share = usable cores (``os.sched_getaffinity``) // processes on this machine (``LOCAL_WORLD_SIZE``, else
``ACCELERATE_NUM_PROCESSES``/``WORLD_SIZE`` when no node count says otherwise), at least 1, and no more than the
cores idle right now.  "Right now" is a short sample of CPU use (:data:`SAMPLE_SECONDS` of ``psutil.cpu_times`` on
the usable cores), not the 1-minute load average, which still counts a run that has just finished (the user's own
previous command) as load for a minute after it ended.  An explicit ``OMP_NUM_THREADS`` wins.  The share goes to
torch (``torch.set_num_threads``) and to the BLAS/OpenMP pools (threadpoolctl, when installed).
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable, Optional, Sequence

import psutil

__all__ = ["SAMPLE_SECONDS", "busy_cores", "sample_busy_cores", "thread_share", "configure_threads"]

_PROCESS_COUNT_VARS = ("LOCAL_WORLD_SIZE", "ACCELERATE_NUM_PROCESSES", "WORLD_SIZE")
#: length of the CPU-use sample (seconds)
SAMPLE_SECONDS = 0.1
#: ``cpu_times`` fields that are not work (the rest -- user, nice, system, irq, softirq, steal -- is)
_IDLE_FIELDS = ("idle", "iowait")


def busy_cores(before: Sequence[Any], after: Sequence[Any], cpus: Iterable[int]) -> float:
    """Cores' worth of work done on CPUs ``cpus`` between two per-CPU ``psutil.cpu_times(percpu=True)`` samples:
    the sum over those CPUs of (busy time / elapsed time), each term in [0, 1]."""
    total = 0.0
    for cpu in cpus:
        start, end = before[cpu]._asdict(), after[cpu]._asdict()
        elapsed = sum(end.values()) - sum(start.values())
        if elapsed <= 0:
            continue
        idle = sum(end.get(f, 0.0) - start.get(f, 0.0) for f in _IDLE_FIELDS)
        total += min(1.0, max(0.0, (elapsed - idle) / elapsed))
    return total


def sample_busy_cores(cpus: Iterable[int], seconds: float = SAMPLE_SECONDS) -> float:
    """:func:`busy_cores` over a live sample of ``seconds`` (this process sleeps meanwhile, so it counts as idle)."""
    before = psutil.cpu_times(percpu=True)
    time.sleep(seconds)
    return busy_cores(before, psutil.cpu_times(percpu=True), cpus)


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
