"""GGUF checkpoints (llama.cpp) of Llama-family models, read lazily and dequantised one tensor at a time.

The header is parsed once at open (:func:`parse_gguf`: scalar/string metadata and the tensor table; metadata arrays
such as the tokenizer are skipped, not decoded); each tensor is then read with ``os.pread`` and dequantised by
``gguf.quants.dequantize``, so nothing stays mapped and no dequantised tensor is cached.

Tensor names are mapped to Hugging Face Llama names and llama.cpp's row permutation of ``attn_q`` / ``attn_k``
is undone exactly as transformers' GGUF loader does (``LlamaTensorProcessor._reverse_permute_weights``), so
``get`` returns what ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` would hold (in float32).
The config is synthesised from the GGUF metadata with transformers' key names (``integrations/ggml.py``).
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from hf_flag.errors import UnsupportedArchitectureError, WeightSourceError
from hf_flag.weights.weight_source import WeightSource

#: GGUF architectures laid out like Llama (same tensor names, same Q/K permutation in llama.cpp's converter)
LLAMA_LIKE = ("llama", "mistral")

#: GGUF metadata key (after "<arch>.") -> transformers config key, as in transformers/integrations/ggml.py
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_NUMPY_FLOATS = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_QUANT_BITS = re.compile(r"^(?:I?Q|TQ)(\d)")


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


def hf_tensor_name(gguf_name: str) -> str:
    """Hugging Face Llama name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``);
    names with no Llama counterpart (e.g. ``rope_freqs.weight``) are kept unchanged."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return gguf_name


def reverse_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute(w, n_head)`` of Q/K rows: per head, rows ``(2, d/2)`` -> ``(d/2, 2)``.

    Same operation as transformers' ``_reverse_permute_weights``: reshape ``(n_head, d/2, 2, ...)``, swap axes
    1 and 2, reshape back.  Use ``n_head = num_attention_heads`` for Q and ``num_key_value_heads`` for K.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise WeightSourceError(f"tensor with {rows} rows cannot be split into {n_head} heads of even size; the "
                                f"GGUF head counts do not match its Q/K tensors")
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def quant_eps(type_name: str) -> float:
    """Relative precision of a GGUF storage type.

    Float types: ``torch.finfo(dtype).eps``; integer types: 0.0 (exact).  A ``b``-bit quantisation (``Q4_0``,
    ``Q4_1``, ``Q4_K``, ``IQ4_NL``...) puts about ``2^b`` levels on a block's range ``[-amax, amax]`` (or
    ``[min, max]``), a step of about ``2 amax / 2^b``; the rounding error is half a step, about ``amax * 2^-b``.
    So eps = ``2^-b`` relative to the block's largest entry: 2^-4 for 4-bit, 2^-8 for ``Q8_0``.  This is an
    order-of-magnitude estimate, not a strict bound (``Q8_0``'s half step is ``amax / 254``, ``Q4_1``'s
    ``(max - min) / 30``); entries much smaller than their block maximum have a larger relative error.
    """
    if type_name in _FLOAT_TYPES:
        return float(torch.finfo(getattr(torch, _FLOAT_TYPES[type_name])).eps)
    m = _QUANT_BITS.match(type_name)
    if m:
        return 2.0 ** -int(m.group(1))
    if re.fullmatch(r"I\d+", type_name):
        return 0.0
    raise WeightSourceError(f"GGUF storage type {type_name!r} has no known precision; report it as a bug")


class GGUFSource(WeightSource):
    """Lazy reader of a Llama-family GGUF file (header parsed once by :func:`parse_gguf`; tensors read by ``pread``)."""

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
        if self.arch not in LLAMA_LIKE:
            raise UnsupportedArchitectureError(
                f"GGUF file {self.path.name!r} has architecture {self.arch!r}; hf-flag reads only Llama-layout "
                f"GGUF ({', '.join(LLAMA_LIKE)}); convert the model to safetensors to analyse it")
        self._tensors = {hf_tensor_name(k): t for k, t in tensors.items()}
        self._fd: int | None = None
        self.config = self._config()

    def _config(self) -> dict:
        config: dict = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu"}
        for gguf_key, hf_key in _CONFIG_KEYS.items():
            value = self._metadata.get(f"{self.arch}.{gguf_key}")
            if value is not None:
                config[hf_key] = value
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in config]
        if missing:
            raise WeightSourceError(f"GGUF file {self.path.name!r} lacks metadata for {missing}; re-convert it "
                                    f"with a current llama.cpp")
        config.setdefault("num_key_value_heads", config["num_attention_heads"])
        config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
        if "vocab_size" not in config:
            config["vocab_size"] = self.shape("model.embed_tokens.weight")[0]
        config["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        config["gguf_file_type"] = self._metadata.get("general.file_type")
        return config

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """HF (numpy/torch) order: GGUF lists dimensions innermost first, so they are reversed."""
        self._check_key(name)
        return tuple(reversed(self._tensors[name].shape))

    def gguf_type(self, name: str) -> str:
        """The GGUF storage type name of ``name`` (``"Q4_1"``, ``"F32"``...)."""
        self._check_key(name)
        return self._tensors[name].tensor_type.name

    def storage_dtype(self, name: str) -> str:
        """Torch dtype name for float storage (``"float32"``), the GGUF type name for quantised (``"Q4_1"``)."""
        kind = self.gguf_type(name)
        return _FLOAT_TYPES.get(kind, kind)

    def storage_eps(self, name: str) -> float:
        """See :func:`quant_eps` (2^-b for b-bit quantisation; finfo eps for float storage)."""
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
        if kind in _NUMPY_FLOATS:  # F16 is widened to float32 as transformers' loader does; F64 stays float64
            array = np.frombuffer(raw, dtype=_NUMPY_FLOATS[kind]).astype(np.float64 if kind == "F64" else np.float32)
        else:
            data = np.frombuffer(raw, dtype=np.uint8).reshape(quant_shape_to_byte_shape(self.shape(name),
                                                                                       t.tensor_type))
            array = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
        array = array.reshape(self.shape(name))
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = array.copy()
        weight = torch.from_numpy(array)
        if name.endswith("self_attn.q_proj.weight"):
            weight = reverse_permute(weight, self.config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            weight = reverse_permute(weight, self.config["num_key_value_heads"])
        return weight

    def _release(self) -> None:
        """Keep names, shapes and types; close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
