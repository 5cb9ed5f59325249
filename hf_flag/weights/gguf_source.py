"""GGUF checkpoints (llama.cpp), read lazily and dequantised one tensor at a time, for every family of the
architecture table with a :class:`~hf_flag.weights.adapters.GGUFLayout`.

The header is parsed once at open (:func:`parse_gguf`: scalar/string metadata and the tensor table; metadata arrays
such as the tokenizer are skipped, not decoded); each tensor is then read with ``os.pread`` and dequantised by
``gguf.quants.dequantize``, so nothing stays mapped and no dequantised tensor is cached.

What comes back is what ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` would hold (in float32), under
Hugging Face names, without instantiating a model:

* model_type: the table entry whose GGUF architecture is the file's ``general.architecture`` (transformers'
  ``load_gguf_checkpoint`` renames: qwen2moe -> qwen2_moe, gemma3 -> gemma3_text, llama named "mistral" ->
  mistral; and a "llama" file with experts is Mixtral, as llama.cpp's ``LlamaModel`` writes it);
* config: the shape metadata llama.cpp writes for every architecture, under the config keys the adapters read
  (:func:`gguf_config`; what GGUF does not store, the activation, comes from the family's ``GGUFLayout``), built
  without importing transformers (tests/weights/test_gguf_families.py checks the layout against the config
  transformers' ``GGUF_CONFIG_MAPPING`` and ``AutoConfig.for_model`` complete, as its loader does);
* tensor names: each role of the family's spec is mapped to its GGUF name by gguf-py's own ``TensorNameMap``
  (``get_tensor_name_map``, as transformers' ``get_gguf_hf_weights_map`` uses it);
* layouts: the reorderings llama.cpp's ``convert_hf_to_gguf.py`` applies are undone (:data:`GGUF_TRANSFORMS`).
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from hf_flag.errors import UnsupportedArchitectureError, WeightSourceError
from hf_flag.weights.adapters.base import AdapterSpec
from hf_flag.weights.weight_source import WeightSource

#: GGUF metadata keys (after "<arch>."; gguf-py's ``Keys.LLM`` / ``Keys.Attention``, the same for every architecture
#: llama.cpp writes) -> the config keys the adapters read them under (``adapters.base.config_value``); a family that
#: names one otherwise says so in its ``GGUFLayout.config_keys``.  head_dim: ``attention.key_length`` when the file
#: has it, else hidden / heads, as llama.cpp's loader (``llama_model::load_hparams``) and the adapters default it.
GGUF_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "expert_count": "num_experts",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}
#: the GGUF metadata no layout can be built without
REQUIRED_GGUF_KEYS = ("block_count", "embedding_length", "attention.head_count")
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_NUMPY_FLOATS = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_QUANT_BITS = re.compile(r"^I?Q(\d)")
#: block layouts dequantised here in torch (block of 32 values: float16 scale ``d``, for Q4_1 a float16 minimum
#: ``m``, then the quants), with gguf-py's arithmetic (float32 ``d * q (+ m)``, bitwise equal to
#: ``gguf.quants.dequantize``; tests/weights/test_sources.py): gguf-py splits every tensor into row groups and
#: dequantises them one at a time, 1.6x slower on SmolLM2's Q4_1 tensors (BENCHMARKS.md); other types go to gguf-py
_TORCH_BLOCKS = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
FP4_TYPES = ("MXFP4", "NVFP4")


class _TensorInfo(NamedTuple):
    """One tensor of the GGUF tensor table: storage type, dims (GGUF order, innermost first), bytes and the
    absolute file offset of its data."""

    tensor_type: Any
    shape: tuple[int, ...]
    n_bytes: int
    offset: int


#: GGUF metadata value types: fixed-size scalars (struct format), 8 = string, 9 = array
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY = 8, 9
_GGUF_MAGIC = b"GGUF"


def _skip_or_read(buf: Any, offs: int, vtype: int) -> tuple[Any, int]:
    """Value of type ``vtype`` at ``offs`` and the offset after it; arrays are skipped (``None``): hf-flag needs
    only scalar and string metadata, and the tokenizer arrays are most of the parse time of ``GGUFReader``."""
    if vtype in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, buf, offs)[0], offs + struct.calcsize(fmt)
    if vtype == _STRING:
        (n,) = struct.unpack_from("<Q", buf, offs)
        return bytes(buf[offs + 8:offs + 8 + n]).decode("utf-8", errors="replace"), offs + 8 + n
    if vtype == _ARRAY:
        item, count = struct.unpack_from("<IQ", buf, offs)
        offs += 12
        if item in _SCALAR_FORMATS:
            return None, offs + count * struct.calcsize(_SCALAR_FORMATS[item])
        if item == _STRING:  # e.g. the tokenizer's vocabulary: step over each string without decoding it
            for _ in range(count):
                offs += 8 + struct.unpack_from("<Q", buf, offs)[0]
            return None, offs
        for _ in range(count):
            _, offs = _skip_or_read(buf, offs, item)
        return None, offs
    raise ValueError(f"unknown metadata value type {vtype}")


def parse_gguf(path: Path) -> tuple[dict[str, Any], dict[str, _TensorInfo]]:
    """Metadata (scalars and strings; arrays skipped) and tensor table of a little-endian GGUF v2/v3 file, parsed
    once from a short-lived memory map; tensor data is not touched (read later with ``os.pread``)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _GGUF_MAGIC:
            raise ValueError("no GGUF magic number")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian or unsupported)")
        offs, meta = 24, {}
        for _ in range(n_kv):
            (n,) = struct.unpack_from("<Q", buf, offs)
            key = bytes(buf[offs + 8:offs + 8 + n]).decode("utf-8")
            (vtype,) = struct.unpack_from("<I", buf, offs + 8 + n)
            meta[key], offs = _skip_or_read(buf, offs + 12 + n, vtype)
        table = []
        for _ in range(n_tensors):
            (n,) = struct.unpack_from("<Q", buf, offs)
            name = bytes(buf[offs + 8:offs + 8 + n]).decode("utf-8")
            offs += 8 + n
            (n_dims,) = struct.unpack_from("<I", buf, offs)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, offs + 4)
            raw_type, rel = struct.unpack_from("<IQ", buf, offs + 4 + 8 * n_dims)
            offs += 4 + 8 * n_dims + 12
            table.append((name, dims, GGMLQuantizationType(raw_type), rel))
        size = len(buf)
    alignment = int(meta.get("general.alignment") or 32)
    start = offs + (-offs % alignment)
    tensors: dict[str, _TensorInfo] = {}
    for name, dims, qtype, rel in table:
        block, type_size = GGML_QUANT_SIZES[qtype]
        info = _TensorInfo(qtype, tuple(int(d) for d in dims), math.prod(dims) * type_size // block, start + rel)
        if name in tensors or info.offset + info.n_bytes > size:
            raise ValueError(f"tensor {name!r} is duplicated or extends past the end of the file")
        tensors[name] = info
    return meta, tensors


def dequantize_blocks(raw: bytes, type_name: str) -> torch.Tensor:
    """Float32 values of the Q4_0, Q4_1 or Q8_0 blocks in ``raw`` (flat, in storage order), as gguf-py's
    ``dequantize`` computes them (ggml's block layouts: 4-bit quants low nibbles first, then high nibbles).  The
    quants are written once into the float32 output, which is then scaled (and shifted) in place: the same float32
    operations in the same order as gguf-py's ``d * q (+ m)``, 2.5x faster than forming each intermediate."""
    blocks = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, _TORCH_BLOCKS[type_name])
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    if type_name == "Q8_0":
        return blocks[:, 2:].contiguous().view(torch.int8).float().mul_(d).reshape(-1)
    qs = blocks[:, 4:] if type_name == "Q4_1" else blocks[:, 2:]
    out = torch.empty(qs.shape[0], 2 * qs.shape[1], dtype=torch.float32)
    out[:, :qs.shape[1]] = qs & 15
    out[:, qs.shape[1]:] = qs >> 4
    if type_name == "Q4_0":
        return out.sub_(8).mul_(d).reshape(-1)
    return out.mul_(d).add_(blocks[:, 2:4].contiguous().view(torch.float16).float()).reshape(-1)


def reverse_permute(weight: Any, n_head: int) -> Any:
    """Undo llama.cpp's ``permute(w, n_head)`` of Q/K rows: per head, rows ``(2, d/2)`` -> ``(d/2, 2)``.

    Same operation as transformers' ``_reverse_permute_weights``: reshape ``(n_head, d/2, 2, ...)``, swap axes
    1 and 2, reshape back.  Use ``n_head = num_attention_heads`` for Q and ``num_key_value_heads`` for K.
    ``weight``: a torch tensor or numpy array (weights or biases).
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise WeightSourceError(f"tensor with {rows} rows cannot be split into {n_head} heads of even size; the "
                                f"GGUF head counts do not match its Q/K tensors")
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def quant_eps(type_name: str) -> float:
    """Relative precision of a GGUF storage type.

    Float types: ``torch.finfo(dtype).eps``; integer types: 0.0 (exact).  A ``b``-bit quantisation (``Q4_0``,
    ``Q4_1``, ``Q4_K``, ``IQ4_NL``...) puts about ``2^b`` levels on a block's range ``[-amax, amax]`` (or
    ``[min, max]``), a step of about ``2 amax / 2^b``; the rounding error is half a step, about ``amax * 2^-b``.
    So eps = ``2^-b`` relative to the block's largest entry: 2^-4 for 4-bit, 2^-8 for ``Q8_0``.  This is an
    order-of-magnitude estimate, not a strict bound (``Q8_0``'s half step is ``amax / 254``, ``Q4_1``'s
    ``(max - min) / 30``); entries much smaller than their block maximum have a larger relative error.  The same
    rule reads b from the type name for the K-quants (``Q6_K``: 2^-6) and the importance-matrix types (``IQ2_XXS``:
    2^-2).  The 4-bit floats (``MXFP4``, ``NVFP4``: e2m1 times a block scale) have one mantissa bit, eps 2^-1 as for
    a float type; the ternary types (``TQ1_0``, ``TQ2_0``) hold {-1, 0, 1} times a block scale, exact only for
    weights trained ternary (BitNet), so their eps is 1: no flag tolerance reads finer than the weights' scale.
    """
    if type_name in _FLOAT_TYPES:
        return float(torch.finfo(getattr(torch, _FLOAT_TYPES[type_name])).eps)
    if type_name in FP4_TYPES:  # e2m1 values times a shared block scale: one mantissa bit, eps 2^-1 as finfo's
        return 0.5
    if type_name.startswith("TQ"):  # ternary: exact for ternary-trained weights (BitNet), else no precision at all
        return 1.0
    m = _QUANT_BITS.match(type_name)
    if m:
        return 2.0 ** -int(m.group(1))
    if re.fullmatch(r"I\d+", type_name):
        return 0.0
    raise WeightSourceError(f"GGUF storage type {type_name!r} has no known precision; report it as a bug")


def group_qkv(weight: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """Undo llama.cpp's [Q; K; V] rearrangement of a fused query_key_value (``FalconModel.modify_tensors``,
    ``GPTNeoXModel.modify_tensors``): back to n_kv groups of (n_head / n_kv query heads, one key, one value)
    (transformers' ``FalconAttention._split_heads``; n_kv = n_head is GPT-NeoX's per-head (q, k, v) interleave, as
    transformers' ``BloomTensorProcessor._reverse_reshape_weights`` restores it)."""
    rows = weight.shape[0]
    if rows % (n_head + 2 * n_kv):
        raise WeightSourceError(f"fused QKV tensor with {rows} rows does not split into {n_head} query and {n_kv} "
                                f"key/value heads; the GGUF head counts do not match its tensors")
    dh = rows // (n_head + 2 * n_kv)
    rest = weight.shape[1:]
    q, k, v = np.split(weight, [n_head * dh, (n_head + n_kv) * dh])
    grouped = np.concatenate([q.reshape(n_kv, n_head // n_kv, dh, *rest), k.reshape(n_kv, 1, dh, *rest),
                              v.reshape(n_kv, 1, dh, *rest)], axis=1)
    return grouped.reshape(weight.shape)


class HeadCounts(NamedTuple):
    """What the transforms need of the config: query heads and key/value heads."""

    n_head: int
    n_kv: int


#: transform name -> (undo on the dequantised array in GGUF-reversed (HF) order, the shape it maps to).  Each undoes
#: one reordering of llama.cpp's convert_hf_to_gguf.py, named in the table entry that uses it (adapters/table.py).
GGUF_TRANSFORMS: dict[str, tuple[Callable[[np.ndarray, HeadCounts], np.ndarray],
                                 Callable[[tuple[int, ...]], tuple[int, ...]]]] = {
    "unpermute_q": (lambda w, h: reverse_permute(w, h.n_head), lambda s: s),
    "unpermute_k": (lambda w, h: reverse_permute(w, h.n_kv), lambda s: s),
    "transpose": (lambda w, h: w.T, lambda s: s[::-1]),
    "minus_one": (lambda w, h: w - 1, lambda s: s),
    "group_qkv": (lambda w, h: group_qkv(w, h.n_head, h.n_kv), lambda s: s),
    # transformers' Qwen2MoeTensorProcessor: the shared expert's gate is (1, d) in HF, stored as (d,)
    "as_row": (lambda w, h: w.reshape(1, -1), lambda s: (1, math.prod(s))),
}


def gguf_model_type(arch: Any, metadata: dict[str, Any]) -> tuple[str, AdapterSpec]:
    """The table's model_type (and spec) of a GGUF file with ``general.architecture == arch`` (module docstring);
    UnsupportedArchitectureError naming the architectures hf-flag reads when none has this one."""
    from hf_flag.weights.adapters import gguf_specs

    specs = gguf_specs()
    candidates = [mt for mt, spec in specs.items() if spec.gguf.arch == arch]
    if not candidates:
        readable = sorted({spec.gguf.arch for spec in specs.values()})
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} has no hf-flag adapter (GGUF architectures read: {', '.join(readable)}); "
            f"convert the model to safetensors, or add an AdapterSpec with gguf=GGUFLayout({arch!r}) via "
            f"hf_flag.weights.adapters.register_adapter")
    moe = bool(metadata.get(f"{arch}.expert_count"))
    candidates = [mt for mt in candidates if (specs[mt].mlp == "moe") == moe] or candidates
    name = str(metadata.get("general.name") or "").lower()
    named = sorted((mt for mt in candidates if mt in name), key=len, reverse=True)  # "mistral", "xlm-roberta"
    model_type = named[0] if named else candidates[0]
    return model_type, specs[model_type]


def gguf_name_table(spec: AdapterSpec, arch: str, n_layers: int, gguf_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name for the tensors of ``gguf_names``: every role of ``spec`` through
    gguf-py's ``TensorNameMap`` (``<canonical_prefix><stack>.<i>.<role name>`` -> ``blk.<i>.<gguf name>``); the
    other tensors (embeddings, final norm, LM head: never analysed) get the first gguf-py candidate under the spec's
    prefix (``lm_head`` for the output), and names with no candidate are kept."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    name_map = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch), n_layers)
    table: dict[str, str] = {}
    for rel in spec.roles().values():
        for i in range(n_layers):
            hf = f"{spec.canonical_prefix}{spec.stack}.{i}.{rel}"
            base, dot, suffix = hf.rpartition(".")
            if suffix not in ("weight", "bias"):  # stacked experts: an HF parameter without a suffix
                base, suffix = hf, "weight"
            gguf = name_map.get_name(base)
            if gguf is not None:
                table[f"{gguf}.{suffix}"] = hf
    by_gguf: dict[str, list[str]] = {}
    for hf, (_, gguf) in name_map.mapping.items():
        by_gguf.setdefault(gguf, []).append(hf)
    for name in gguf_names:
        base, _, suffix = name.rpartition(".")
        if name in table or base not in by_gguf:
            continue
        prefixed = (c for c in by_gguf[base] if spec.canonical_prefix and c.startswith(spec.canonical_prefix))
        hf = "lm_head" if "lm_head" in by_gguf[base] else next(prefixed, None)
        if hf is not None:
            table[name] = f"{hf}.{suffix}"
    return table


def gguf_config(path: Path, arch: str, model_type: str, spec: AdapterSpec, metadata: dict[str, Any],
                tensors: dict[str, "_TensorInfo"]) -> dict:
    """The config of a GGUF file, as the adapters read it: the metadata of :data:`GGUF_CONFIG_KEYS` under their config
    keys (renamed where the family's ``GGUFLayout.config_keys`` says), what GGUF does not store from the family's
    :class:`~hf_flag.weights.adapters.GGUFLayout` (``hidden_act``, fixed ``config`` values), ``tie_word_embeddings``
    unless the file has an output (LM head) tensor (as transformers' ``load_gguf_checkpoint``), and without
    ``<arch>.vocab_size`` the embedding's row count.  WeightSourceError (one line, naming the file and key) for
    missing or non-integer size metadata; UnsupportedArchitectureError for a layout without an activation."""
    layout = spec.gguf
    missing = [f"{arch}.{k}" for k in REQUIRED_GGUF_KEYS if metadata.get(f"{arch}.{k}") is None]
    if missing:
        raise WeightSourceError(f"GGUF file {path.name!r} lacks metadata {missing}; re-convert it with a current "
                                f"llama.cpp")
    if layout.activation is None:
        raise UnsupportedArchitectureError(
            f"GGUF file {path.name!r}: the {model_type!r} adapter's GGUFLayout({arch!r}) names no activation, which "
            f"GGUF does not store; register the adapter with GGUFLayout({arch!r}, activation=...)")
    config: dict[str, Any] = {"model_type": model_type}
    for key, config_key in GGUF_CONFIG_KEYS.items():
        value = metadata.get(f"{arch}.{key}")
        if value is None:
            continue
        least = 1 if key in REQUIRED_GGUF_KEYS else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise WeightSourceError(f"GGUF file {path.name!r} has metadata {arch}.{key} = {value!r}, not an integer "
                                    f">= {least}; re-convert it with a current llama.cpp")
        config[layout.config_keys.get(key, config_key)] = value
    config.update(layout.config, hidden_act=layout.activation, tie_word_embeddings="output.weight" not in tensors)
    if "token_embd.weight" in tensors:
        config.setdefault("vocab_size", tensors["token_embd.weight"].shape[-1])
    return config


class GGUFSource(WeightSource):
    """Lazy reader of a GGUF file of any family in the architecture table with a GGUF layout (module docstring)."""

    def __init__(self, path: Path | str, *, name: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightSourceError(f"GGUF file {str(self.path)!r} does not exist; check the path")
        try:
            self._metadata, tensors = parse_gguf(self.path)
        except (ValueError, struct.error, UnicodeDecodeError, KeyError) as exc:  # malformed or truncated
            raise WeightSourceError(f"GGUF file {str(self.path)!r} is corrupted or truncated ({exc}); "
                                    f"re-download it") from None
        self.name = name or self.path.name
        self.arch = self._metadata.get("general.architecture")
        try:
            model_type, spec = gguf_model_type(self.arch, self._metadata)
        except UnsupportedArchitectureError as exc:
            raise UnsupportedArchitectureError(f"GGUF file {self.path.name!r}: {exc}") from None
        self.config = gguf_config(self.path, self.arch, model_type, spec, self._metadata, tensors)
        names = gguf_name_table(spec, self.arch, self.config["num_hidden_layers"], list(tensors))
        self._tensors = {names.get(k, k): t for k, t in tensors.items()}
        self._transforms: dict[str, str] = {}
        for gguf_name, hf_name in ((k, names.get(k, k)) for k in tensors):
            found = [t for pattern, t in spec.gguf.transforms if re.search(pattern, gguf_name)]
            if found:
                self._transforms[hf_name] = found[0]
        self._fd: int | None = None
        heads = self.config["num_attention_heads"]
        kv = spec.kv_heads(self.config) if spec.kv_heads is not None else int(
            self._metadata.get(f"{self.arch}.attention.head_count_kv") or heads)
        self._heads = HeadCounts(heads, kv if spec.grouped_query or spec.kv_heads is not None else heads)
        self.config["gguf_file_type"] = self._metadata.get("general.file_type")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        """GGUF lists dimensions innermost first: reversed, this is numpy/torch order before any transform."""
        return tuple(reversed(self._tensors[name].shape))

    def shape(self, name: str) -> tuple[int, ...]:
        """HF (numpy/torch) order, after undoing llama.cpp's reordering (GPT-2's transposes, for example)."""
        self._check_key(name)
        shape = self._stored_shape(name)
        return GGUF_TRANSFORMS[self._transforms[name]][1](shape) if name in self._transforms else shape

    def gguf_type(self, name: str) -> str:
        """The GGUF storage type name of ``name`` (``"Q4_1"``, ``"F32"``...)."""
        self._check_key(name)
        return self._tensors[name].tensor_type.name

    def storage_dtype(self, name: str) -> str:
        """Torch dtype name for float storage (``"float32"``), the GGUF type name for quantised (``"Q4_1"``)."""
        kind = self.gguf_type(name)
        return _FLOAT_TYPES.get(kind, kind)

    def storage_eps(self, name: str) -> float:
        """See :func:`quant_eps` (2^-b for b-bit quantisation; finfo eps for float storage), per tensor: files with
        mixed quantisations give each tensor its own."""
        return quant_eps(self.gguf_type(name))

    def nbytes(self) -> int:
        return int(sum(int(t.n_bytes) for t in self._tensors.values()))

    def _read(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize, quant_shape_to_byte_shape

        t = self._tensors[name]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, t.n_bytes, t.offset)  # an explicit read: no file pages stay mapped
        if len(raw) != t.n_bytes:
            raise WeightSourceError(f"GGUF file {str(self.path)!r} is truncated at tensor {name!r}; re-download it")
        kind = t.tensor_type.name
        stored = self._stored_shape(name)
        if kind in _NUMPY_FLOATS:  # F16 is widened to float32 as transformers' loader does; F64 stays float64
            array = np.frombuffer(raw, dtype=_NUMPY_FLOATS[kind]).astype(np.float64 if kind == "F64" else np.float32)
        elif kind in _TORCH_BLOCKS:
            array = dequantize_blocks(raw, kind).numpy()
        else:
            data = np.frombuffer(raw, dtype=np.uint8).reshape(quant_shape_to_byte_shape(stored, t.tensor_type))
            try:
                array = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
            except NotImplementedError:
                raise WeightSourceError(f"tensor {name!r} of {self.name!r} is stored as {kind}, which gguf-py cannot "
                                        f"dequantise; re-quantise the model to another type") from None
        array = array.reshape(stored)
        if name in self._transforms:
            array = GGUF_TRANSFORMS[self._transforms[name]][0](array, self._heads)
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:
            array = array.copy()
        return torch.from_numpy(array)

    def _release(self) -> None:
        """Keep names, shapes and types; close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
