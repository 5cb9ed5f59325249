"""Peak memory of ``hf_flag.analyze`` on a synthetic Llama-shaped safetensors checkpoint of >= 2 GB.

The checkpoint (config.json + model.safetensors, float32 random weights, written tensor by tensor so the writer
never holds it all) lives in a temporary folder that is deleted afterwards.  Each analysis runs in a fresh
subprocess; the parent samples ``/proc/<pid>/status`` every 20 ms and the child reports its own ``VmHWM`` (peak
resident set, file-backed pages included) at exit.  ``RssAnon`` (heap: tensors, rows) and ``RssFile`` (file-backed
pages: shared libraries, and any mapped checkpoint pages) are reported separately, as their peaks over the samples.
The safetensors source reads each tensor with ``os.preadv`` (no mapping), so ``RssFile`` stays at the libraries.
Goal: peak RSS < 25% of the checkpoint size.

Runs: (1) ``layers=[0], composition="all"``: the full report of block 0 (SVDs, flags, baselines, head overlaps)
plus composition from layer 0 to every later layer, which streams the attention of all layers through the
composition cache (``analysis.transformer.COMPOSITION_CACHE_BYTES``); (2) ``cheap=True`` over all layers (reads every
block once).  Default options otherwise.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lazy_rss.py [--layers 88]
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
import json, sys, time, torch
from hf_flag.analysis.api import analyze
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
before = status()
kwargs = json.loads(sys.argv[2])
start = time.perf_counter()
report = analyze(sys.argv[1], device="cpu", **kwargs)
print(json.dumps({"before": before, "after": status(), "seconds": time.perf_counter() - start,
                  "rows": len(report.rows)}))
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


def measure(path: Path, kwargs: dict) -> dict:
    """Run one analysis in a subprocess; peak RssAnon / RssFile sampled from /proc/<pid>/status."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), json.dumps(kwargs)], stdout=subprocess.PIPE,
                            text=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=88, help="88 layers of d=768 -> 2.3 GB")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--skip-cheap", action="store_true")
    args = parser.parse_args()
    mib = 2.0 ** 20
    with tempfile.TemporaryDirectory(prefix="hf_flag_rss_") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        size = write_checkpoint(folder, args.layers, args.d, args.d_ff, args.heads, args.kv_heads, args.vocab)
        print(f"checkpoint: {size / mib:.0f} MiB ({args.layers} layers, d={args.d}, d_ff={args.d_ff}, "
              f"{args.heads} heads / {args.kv_heads} KV), written in {time.perf_counter() - start:.0f} s")
        runs = [("full report of block 0 + composition 0 -> all", {"layers": [0], "composition": "all"})]
        if not args.skip_cheap:
            runs.append(("cheap, all layers", {"cheap": True}))
        for label, kwargs in runs:
            r = measure(folder, kwargs)
            peak = r["after"]["VmHWM"]
            print(f"{label}: {r['seconds']:.0f} s, {r['rows']} rows; peak RSS (VmHWM) {peak / mib:.0f} MiB = "
                  f"{100 * peak / size:.1f}% of the checkpoint (goal < 25%); after imports {r['before']['VmRSS'] / mib:.0f}"
                  f" MiB; sampled peaks RssAnon {r['sampled_peaks']['RssAnon'] / mib:.0f} MiB, RssFile "
                  f"{r['sampled_peaks']['RssFile'] / mib:.0f} MiB")


if __name__ == "__main__":
    main()
