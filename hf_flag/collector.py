"""The garbage collector around a long computation: objects alive before it (the imported libraries) kept out of
its passes while it runs (``gc.freeze``), handed back after.  Used by ``hf-flag analyze`` and ``hf-flag sweep``."""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["long_lived_frozen"]


@contextlib.contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Keep every object alive now (the imported libraries: torch, matplotlib, accelerate) out of the garbage
    collector's passes while the block runs; they are handed back at the end.

    An analysis and each figure the sweep draws make cyclic garbage, so they trigger full collections, and each full
    collection traverses every object of the imported libraries (0.1-0.2 s with torch and matplotlib loaded; two or
    three in a sweep of six small models; SmolLM2's ``hf-flag analyze``: GC 0.33 -> 0.15 s CPU, BENCHMARKS.md).  ``gc.freeze`` moves them to CPython's permanent generation, which no collection
    visits.  Does nothing when objects are frozen already (the caller manages the collector).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
