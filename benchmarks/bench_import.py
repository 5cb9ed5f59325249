"""Import time of ``import hf_flag``, side by side with its floors, on fresh interpreters as a user starts them.

Each repeat runs, interleaved (so load drift hits every variant alike), one fresh ``python -c`` per variant, with
``OMP_NUM_THREADS=1`` and a private, already-registered ``HF_MODULES_CACHE``:

* ``python``: ``pass`` (interpreter start-up and exit, the floor every variant pays);
* ``hf_flag``: ``import hf_flag`` (what a user, the CLI and the evaluate shims pay);
* ``torch``: ``import torch`` (the analysis needs it; ``hf_flag`` should not pay it until ``analyze`` is used);
* ``hf_flag + analyze``: ``import hf_flag; hf_flag.analyze`` (the first use: resolves the lazy function).

Reported: the median wall seconds of each variant over ``--repeats``, the import cost above the interpreter floor,
and the ratio ``(hf_flag - python) / (torch - python)``; then which heavy libraries a bare ``import hf_flag`` loaded
(none of torch, datasets, matplotlib, evaluate, transformers is expected) and whether it wrote anything into
evaluate's module cache (nothing is expected once the shims are current).

Run:  .venv/bin/python benchmarks/bench_import.py [--repeats 15]
Cross-check:  .venv/bin/python -X importtime -c "import hf_flag" 2>&1 | sort -t'|' -k2 -n | tail
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "python": "pass",
    "hf_flag": "import hf_flag",
    "torch": "import torch",
    "hf_flag + analyze": "import hf_flag; hf_flag.analyze",
}
HEAVY = ("torch", "datasets", "matplotlib", "evaluate", "transformers", "pandas", "pyarrow", "accelerate")
LOADED = f"import sys, json, hf_flag; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """``{path: (inode, mtime_ns)}`` of every file under ``folder``."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def timed(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_MODULES_CACHE": tmp}
        env.pop("HF_FLAG_NO_REGISTER", None)
        subprocess.run([sys.executable, "-c", "import hf_flag"], env=env, check=True)  # register once
        before = snapshot(Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            for name, code in VARIANTS.items():
                times[name].append(timed(code, env))
        after = snapshot(Path(tmp))
        loaded = json.loads(subprocess.run([sys.executable, "-c", LOADED], env=env, check=True, capture_output=True,
                                           text=True).stdout)
    median = {name: statistics.median(t) for name, t in times.items()}
    floor = median["python"]
    print(f"load average {os.getloadavg()[0]:.2f}; median of {args.repeats} fresh processes")
    for name, value in median.items():
        print(f"  {name:<20}{value:8.3f} s   above the interpreter {value - floor:7.3f} s")
    ratio = (median["hf_flag"] - floor) / (median["torch"] - floor)
    print(f"import hf_flag / import torch (above the interpreter): {ratio:.3f}")
    print(f"heavy libraries loaded by import hf_flag: {loaded or 'none'}")
    changed = sorted(set(before.items()) ^ set(after.items()))
    print(f"module-cache files written by {len(VARIANTS) * args.repeats} imports after registration: "
          f"{len({path for path, _ in changed})}")


if __name__ == "__main__":
    main()
