"""CPU threads per process: each process takes its share of the cores, so several processes on one machine
(``accelerate launch``, ``torchrun``) or a busy machine do not oversubscribe the cores.

Share = usable cores (``os.sched_getaffinity``) // processes on this machine (``LOCAL_WORLD_SIZE``, else
``ACCELERATE_NUM_PROCESSES``/``WORLD_SIZE`` when no node count says otherwise), at least 1, and no more than the
cores left idle by other work (1-minute load average minus this process tree's own threads is not knowable before
work starts, so the load average is read as other work).  An explicit ``OMP_NUM_THREADS`` wins.  The share goes to
torch (``torch.set_num_threads``) and to the BLAS/OpenMP pools (threadpoolctl, when installed).
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["thread_share", "configure_threads"]

_PROCESS_COUNT_VARS = ("LOCAL_WORLD_SIZE", "ACCELERATE_NUM_PROCESSES", "WORLD_SIZE")


def thread_share(environ: Optional[dict] = None, cores: Optional[int] = None,
                 load: Optional[float] = None) -> int:
    """Threads this process should use (module docstring rule); arguments default to the live values."""
    env = os.environ if environ is None else environ
    explicit = env.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    processes = next((int(env[v]) for v in _PROCESS_COUNT_VARS if env.get(v, "").isdigit() and int(env[v]) > 0), 1)
    share = max(1, cores // processes)
    load = os.getloadavg()[0] if load is None else load
    idle = max(1, int(cores - load + 0.5))
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
