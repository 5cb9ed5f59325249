"""Peak memory of ``hf_flag.analyze`` on a synthetic Llama-shaped safetensors checkpoint, against the largest block.

The checkpoint (config.json + model.safetensors, float32 random weights, written tensor by tensor so the writer
never holds it all) lives in a temporary folder that is deleted afterwards.  Each analysis runs in a fresh
subprocess; the parent samples ``/proc/<pid>/status`` every 20 ms and the child reports its own ``VmHWM`` (peak
resident set, file-backed pages included) at exit and its ``VmRSS`` after imports.  ``RssAnon`` (heap: tensors,
rows) and ``RssFile`` (file-backed pages: shared libraries, and any mapped checkpoint pages) are reported
separately, as their peaks over the samples.

Goal (issue #11): peak RSS above the import cost <= 3 x the largest block (one transformer layer's 2-D weights)
in the compute precision (float32 for these float32 weights; float64 with ``full=True``), composition included,
on deep and on wide checkpoints (d >= 1024, d_ff = 4d).  Runs: (1) the default report of every layer
(composition ``auto``); (2) the default report of block 0 with composition 0 -> every later layer; (3)
``full=True`` of block 0 without composition (today's analysis, float64); (4) ``cheap=True`` over all layers.
``--readers`` runs each analysis with each reader, side by side: hf-flag's ``os.preadv`` reader (``preadv``), the
safetensors library opened per tensor (``safe_open``: mapping released after each tensor) or per block
(``safe_open_block``: one ``safe_open`` handle per transformer block, closed when the next block's first tensor
is read), to compare peaks and CPU seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lazy_rss.py --layers 24 --d 1024 --d-ff 4096 --heads 16 --kv-heads 4
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lazy_rss.py --layers 12 --vocab 8000 --runs layer0 \
        --readers preadv,safe_open,safe_open_block
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, os, re, sys, time, torch
from hf_flag.analysis.api import analyze
READER = os.environ.get("HF_FLAG_BENCH_READER", "preadv")
if READER != "preadv":
    from safetensors import safe_open
    from hf_flag.weights.safetensors_source import SafetensorsSource
    handles = {}
    def read_with_safe_open(self, name):
        file = str(self._entries[name].file)
        if READER == "safe_open":  # opened per tensor
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name)
        layer = re.search(r"layers\.(\d+)\.", name)  # safe_open_block: one handle per block, closed at the next
        key = (file, layer.group(1) if layer else name)
        if key not in handles:
            for h in handles.values():
                h.__exit__(None, None, None)
            handles.clear()
            handles[key] = safe_open(file, framework="pt").__enter__()
        return handles[key].get_tensor(name)
    SafetensorsSource._read = read_with_safe_open
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
before = status()
kwargs = json.loads(sys.argv[2])
start, cpu = time.perf_counter(), time.process_time()
report = analyze(sys.argv[1], device="cpu", **kwargs)
print(json.dumps({"before": before, "after": status(), "seconds": time.perf_counter() - start,
                  "cpu": time.process_time() - cpu, "rows": len(report.rows)}))
"""


def llama_shapes(n_layers: int, d: int, d_ff: int, n_heads: int, n_kv: int, vocab: int) -> list[tuple[str, tuple]]:
    """Tensor names and shapes of a LlamaForCausalLM with tied embeddings (no lm_head tensor)."""
    hd = d // n_heads
    shapes = [("model.embed_tokens.weight", (vocab, d)), ("model.norm.weight", (d,))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                   (p + "self_attn.q_proj.weight", (n_heads * hd, d)), (p + "self_attn.k_proj.weight", (n_kv * hd, d)),
                   (p + "self_attn.v_proj.weight", (n_kv * hd, d)), (p + "self_attn.o_proj.weight", (d, n_heads * hd)),
                   (p + "mlp.gate_proj.weight", (d_ff, d)), (p + "mlp.up_proj.weight", (d_ff, d)),
                   (p + "mlp.down_proj.weight", (d, d_ff))]
    return shapes


def write_checkpoint(folder: Path, n_layers: int, d: int, d_ff: int, n_heads: int, n_kv: int, vocab: int) -> int:
    """Write config.json and model.safetensors (streamed: safetensors header, then one tensor at a time)."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
              "intermediate_size": d_ff, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv, "head_dim": d // n_heads, "hidden_act": "silu", "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    shapes = llama_shapes(n_layers, d, d_ff, n_heads, n_kv, vocab)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes:
            scale = 1.0 if name.endswith("norm.weight") else 0.02
            f.write((rng.standard_normal(shape, dtype=np.float32) * scale).tobytes())
    return (folder / "model.safetensors").stat().st_size


def measure(path: Path, kwargs: dict, reader: str) -> dict:
    """Run one analysis in a subprocess; peak RssAnon / RssFile sampled from /proc/<pid>/status."""
    import os

    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), json.dumps(kwargs)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_FLAG_BENCH_READER": reader})
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while proc.poll() is None:
        try:
            for line in open(f"/proc/{proc.pid}/status"):
                k, _, v = line.partition(":")
                if k in peaks:
                    peaks[k] = max(peaks[k], int(v.split()[0]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"analysis subprocess failed with code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["sampled_peaks"] = peaks
    return result


def block_bytes(d: int, d_ff: int, n_heads: int, n_kv: int, itemsize: int) -> int:
    """Bytes of one Llama block's 2-D weights (q, k, v, o, gate, up, down) at ``itemsize``."""
    hd = d // n_heads
    return (2 * n_heads * hd * d + 2 * n_kv * hd * d + 3 * d * d_ff) * itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--readers", default="preadv",
                        help="comma-separated subset of preadv,safe_open,safe_open_block; each run with each")
    parser.add_argument("--runs", default="default,composition,full,cheap",
                        help="comma-separated subset of default,composition,full,cheap,layer0,composition_only")
    args = parser.parse_args()
    mib = 2.0 ** 20
    all_runs = {"default": ("default report, all layers (composition auto)", {}, 4),
                "composition": ("default report of block 0 + composition 0 -> all", {"layers": [0],
                                "composition": "all"}, 4),
                "full": ("full=True of block 0, no composition (float64)", {"layers": [0], "composition": "none",
                         "full": True}, 8),
                "cheap": ("cheap, all layers", {"cheap": True}, 4),
                "layer0": ("default report of block 0, no composition", {"layers": [0], "composition": "none"}, 4),
                "composition_only": ("composition 0 -> all alone", {"layers": [0], "composition": "all",
                                     "diagnostics": ["composition"]}, 4)}
    with tempfile.TemporaryDirectory(prefix="hf_flag_rss_") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        size = write_checkpoint(folder, args.layers, args.d, args.d_ff, args.heads, args.kv_heads, args.vocab)
        readers = args.readers.split(",")
        unknown = set(readers) - {"preadv", "safe_open", "safe_open_block"}
        if unknown:
            raise SystemExit(f"--readers: unknown {sorted(unknown)}; use preadv, safe_open, safe_open_block")
        print(f"checkpoint: {size / mib:.0f} MiB ({args.layers} layers, d={args.d}, d_ff={args.d_ff}, "
              f"{args.heads} heads / {args.kv_heads} KV), written in {time.perf_counter() - start:.0f} s", flush=True)
        for key in args.runs.split(","):
            label, kwargs, itemsize = all_runs[key]
            block = block_bytes(args.d, args.d_ff, args.heads, args.kv_heads, itemsize)
            for reader in readers:
                r = measure(folder, kwargs, reader)
                peak, base = r["after"]["VmHWM"], r["before"]["VmRSS"]
                print(f"{label} [{reader}]: CPU {r['cpu']:.1f} s (wall {r['seconds']:.0f} s), {r['rows']} rows; "
                      f"peak RSS (VmHWM) {peak / mib:.0f} MiB, after imports {base / mib:.0f} MiB: above imports "
                      f"{(peak - base) / mib:.0f} MiB = {(peak - base) / block:.2f} blocks of {block / mib:.0f} MiB "
                      f"({itemsize * 8}-bit; goal <= 3), {100 * peak / size:.1f}% of the checkpoint; sampled peaks "
                      f"RssAnon {r['sampled_peaks']['RssAnon'] / mib:.0f} MiB, "
                      f"RssFile {r['sampled_peaks']['RssFile'] / mib:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
