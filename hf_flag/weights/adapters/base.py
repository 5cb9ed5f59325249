"""Declarative architecture adapters and the one generic loader that reads them.

An adapter only answers "which tensor is which, in which layout" (docs/ARCHITECTURE.md).  Each family module
(``gpt2.py``, ``llama.py``, ...) declares an :class:`AdapterSpec`: the layer stack's name, the tensor name of each
role relative to one layer, and the storage layout of the attention and MLP tensors.  :class:`Adapter` turns
(spec, weight source, layer index) into a :class:`~hf_flag.weights.blocks.BlockWeights` in the canonical per-head
``x @ W`` layout of MATH.md §6:

* ``W_Q[h]``, ``W_K[g]``, ``W_V[g]`` are ``(d_model, head_dim)``; ``W_O[h]`` is ``(head_dim, d_model)``;
  KV head ``g`` is stored once and query head ``h`` uses ``g = h // (n_heads // n_kv_heads)`` (``repeat_kv``).
* MLP matrices are out x in (``nn.Linear``); GPT-2's ``Conv1D`` (in x out) is transposed.

Attention layouts (``AdapterSpec.attention``):

``"linear"``                 separate ``nn.Linear`` q (n_h d_h, d), k/v (n_kv d_h, d), o (d, n_h d_h); optional biases.
``"conv1d_fused_qkv"``       GPT-2: ``c_attn`` (d, 3d) in x out = [Q | K | V]; ``c_proj`` (d, d) in x out.
``"neox_fused_interleaved"`` GPT-NeoX: ``query_key_value`` (n_h 3 d_h, d), rows ordered (head, {q,k,v}, d_h).
``"phi3_fused"``             Phi-3: ``qkv_proj`` rows [Q (n_h d_h); K (n_kv d_h); V (n_kv d_h)].

MLP layouts (``AdapterSpec.mlp``): ``"linear"`` (in, out), ``"conv1d"`` (GPT-2, in x out), ``"gated"``
(gate, up, down), ``"phi3_fused"`` (``gate_up_proj`` rows [gate; up], then down).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

import torch

from hf_flag.errors import UnsupportedArchitectureError
from hf_flag.weights.blocks import AttentionWeights, BlockWeights, MLPWeights, ModelLayout

if TYPE_CHECKING:
    from hf_flag.weights.weight_source import WeightSource

ATTENTION_LAYOUTS: dict[str, tuple[str, ...]] = {  # layout -> required roles
    "linear": ("q", "k", "v", "o"),
    "conv1d_fused_qkv": ("qkv", "o"),
    "neox_fused_interleaved": ("qkv", "o"),
    "phi3_fused": ("qkv", "o"),
}
MLP_LAYOUTS: dict[str, tuple[str, ...]] = {
    "linear": ("mlp_in", "mlp_out"),
    "conv1d": ("mlp_in", "mlp_out"),
    "gated": ("mlp_gate", "mlp_in", "mlp_out"),
    "phi3_fused": ("gate_up", "mlp_out"),
}
#: roles recorded in ``BlockWeights.names`` / the layout but never read: Qwen3's per-head RMSNorm on q and k acts
#: after the projection, so it does not change the read subspace col(W_Q[h]) (MATH.md §6).
RECORDED_ONLY_ROLES = frozenset({"q_norm", "k_norm"})
#: roles the attention part of a block is built from (``block(..., mlp=False)`` reads only these)
ATTENTION_ROLES = frozenset({"q", "k", "v", "o", "qkv", "q_bias", "k_bias", "v_bias", "o_bias", "qkv_bias"})
REGISTER_HINT = "hf_flag.weights.adapters.register_adapter(model_type, adapter)"

# config field -> candidate config.json keys, first present (not None) wins
_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "n_heads": ("num_attention_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "d_ff": ("intermediate_size", "n_inner", "ffn_dim"),
    "activation": ("hidden_act", "activation_function"),
}


@dataclass(frozen=True)
class AdapterSpec:
    """Where one family keeps its tensors.  All names are relative to one layer, ``<prefix><stack>.<i>.<name>``.

    name: adapter name (``ModelLayout.architecture``); stack: the layer list, e.g. ``"layers"`` or
    ``"encoder.layer"`` (any prefix before it, such as ``"model."`` or ``"bert."``, is found in the checkpoint);
    tensors: role -> name for the roles the layouts require; optional: role -> name for roles read when present
    (biases; ``q_norm``/``k_norm`` are recorded only); grouped_query: read ``num_key_value_heads`` and
    ``head_dim`` from the config (else ``n_kv_heads = n_heads`` and ``head_dim = d_model / n_heads``, as the
    family's module does); canonical_prefix: the prefix named in error messages.
    """

    name: str
    stack: str
    attention: str
    mlp: str
    tensors: Mapping[str, str]
    optional: Mapping[str, str] = field(default_factory=dict)
    grouped_query: bool = False
    canonical_prefix: str = ""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"AdapterSpec {self.name!r}: attention={self.attention!r}; use one of "
                             f"{sorted(ATTENTION_LAYOUTS)}")
        if self.mlp not in MLP_LAYOUTS:
            raise ValueError(f"AdapterSpec {self.name!r}: mlp={self.mlp!r}; use one of {sorted(MLP_LAYOUTS)}")
        missing = [r for r in ATTENTION_LAYOUTS[self.attention] + MLP_LAYOUTS[self.mlp] if r not in self.tensors]
        if missing:
            raise ValueError(f"AdapterSpec {self.name!r}: tensors has no entry for roles {missing}; add their "
                             f"per-layer names")


@dataclass(frozen=True)
class CheckpointLayout(ModelLayout):
    """A :class:`ModelLayout` plus where layer ``i``'s tensors live in this checkpoint.

    tensors: (role, name template with ``{i}``) for every role present in the checkpoint (read roles and
    recorded-only roles); attention_layout / mlp_layout: the spec's storage layouts; qk_norm: the block applies a
    per-head RMSNorm to q and k after projection (Qwen3), which leaves col(W_Q[h]) unchanged (MATH.md §6).
    """

    tensors: tuple[tuple[str, str], ...] = ()
    attention_layout: str = "linear"
    mlp_layout: str = "linear"
    qk_norm: bool = False


def config_dict(config: Any) -> dict:
    """A transformers ``PretrainedConfig`` or a mapping, as a plain dict."""
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise ValueError(f"config of type {type(config).__name__} is not a dict or PretrainedConfig; pass "
                     f"source.config or model.config")


def config_value(config: Mapping, field_name: str) -> Any:
    """The first non-None value among the config keys that mean ``field_name`` (``_CONFIG_KEYS``), else None."""
    return next((config[k] for k in _CONFIG_KEYS[field_name] if config.get(k) is not None), None)


def _positive_int(config: Mapping, field_name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config {field_name} (keys {list(_CONFIG_KEYS[field_name])}) is {value!r}; the checkpoint "
                         f"config must give a positive integer")
    return value


def _layer_prefixes(spec: AdapterSpec, keys: Iterable[str]) -> list[str]:
    """Prefixes ``p`` such that ``p + stack + ".0." + <first required name>`` is a key (shortest first)."""
    anchor = f"{spec.stack}.0.{next(iter(spec.tensors.values()))}"
    found = {k[: len(k) - len(anchor)] for k in keys if k.endswith(anchor)}
    return sorted((p for p in found if p == "" or p.endswith(".")), key=lambda p: (len(p), p))


def _expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], layout: ModelLayout) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} for {layout.model_type} "
                         f"(d_model={layout.d_model}, n_heads={layout.n_heads}, n_kv_heads={layout.n_kv_heads}, "
                         f"head_dim={layout.head_dim}, d_ff={layout.d_ff}); check the config against the checkpoint")


def _split_rows(tensor: Optional[torch.Tensor], sizes: list[int]) -> list[Optional[torch.Tensor]]:
    if tensor is None:
        return [None] * len(sizes)
    return list(torch.split(tensor, sizes, dim=0))


def _unfuse_attention(kind: str, t: dict[str, torch.Tensor], names: dict[str, str],
                      L: ModelLayout) -> dict[str, Optional[torch.Tensor]]:
    """Checkpoint attention tensors -> separate ``nn.Linear``-convention q, k, v, o weights and biases."""
    d, h, kv, dh = L.d_model, L.n_heads, L.n_kv_heads, L.head_dim
    if kind == "linear":
        return {r: t.get(r) for r in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias")}
    conv1d = kind == "conv1d_fused_qkv"  # GPT-2 Conv1D stores in x out
    rows = (h + 2 * kv) * dh
    _expect_shape(names["qkv"], t["qkv"], (d, rows) if conv1d else (rows, d), L)
    _expect_shape(names["o"], t["o"], (h * dh, d) if conv1d else (d, h * dh), L)
    qkv = t["qkv"].T if conv1d else t["qkv"]
    out = {"o": t["o"].T if conv1d else t["o"], "o_bias": t.get("o_bias")}
    bias = t.get("qkv_bias")
    if kind == "neox_fused_interleaved":  # rows (head, {q,k,v}, head_dim): transformers' view(..., n_h, 3 d_h)
        w = qkv.reshape(h, 3, dh, d)
        b = None if bias is None else bias.reshape(h, 3, dh)
        for j, r in enumerate("qkv"):
            out[r] = w[:, j].reshape(h * dh, d)
            out[r + "_bias"] = None if b is None else b[:, j].reshape(h * dh)
        return out
    sizes = [h * dh, kv * dh, kv * dh]  # [Q; K; V] rows (GPT-2 after transposing, Phi-3 as stored)
    out.update(zip("qkv", _split_rows(qkv, sizes)))
    out.update(zip(("q_bias", "k_bias", "v_bias"), _split_rows(bias, sizes)))
    return out


def _per_head(parts: dict[str, Optional[torch.Tensor]], names: dict[str, str], L: ModelLayout) -> AttentionWeights:
    """``nn.Linear`` q/k/v/o -> per-head ``x @ W`` slices (MATH.md §6)."""
    d, dh = L.d_model, L.head_dim
    counts = {"q": L.n_heads, "k": L.n_kv_heads, "v": L.n_kv_heads}
    label = {r: names.get(r, names.get("qkv", r)) for r in counts}
    for r, n in counts.items():
        _expect_shape(label[r], parts[r], (n * dh, d), L)
        if parts[r + "_bias"] is not None:
            _expect_shape(names.get(r + "_bias", names.get("qkv_bias", r)), parts[r + "_bias"], (n * dh,), L)
    _expect_shape(names["o"], parts["o"], (d, L.n_heads * dh), L)
    heads = {r: parts[r].reshape(n, dh, d).transpose(1, 2).contiguous() for r, n in counts.items()}
    bias = {r: None if parts[r + "_bias"] is None else parts[r + "_bias"].reshape(n, dh).contiguous()
            for r, n in counts.items()}
    return AttentionWeights(
        W_Q=heads["q"], W_K=heads["k"], W_V=heads["v"],
        W_O=parts["o"].reshape(d, L.n_heads, dh).permute(1, 2, 0).contiguous(),
        b_Q=bias["q"], b_K=bias["k"], b_V=bias["v"], b_O=parts["o_bias"],
    )


def _reads(role: str, mlp: bool) -> bool:
    """Whether :meth:`Adapter.block` reads tensor ``role`` (every role but the recorded-only ones; attention
    roles only when ``mlp`` is False)."""
    return role not in RECORDED_ONLY_ROLES and (mlp or role in ATTENTION_ROLES)


def _mlp(kind: str, t: dict[str, torch.Tensor], names: dict[str, str], L: ModelLayout) -> MLPWeights:
    """Checkpoint MLP tensors -> out x in ``MLPWeights``."""
    parts = {r: t.get(r) for r in ("mlp_gate", "mlp_in", "mlp_out", "b_gate", "b_in", "b_out")}
    if kind == "conv1d":  # GPT-2 Conv1D stores in x out
        _expect_shape(names["mlp_in"], t["mlp_in"], (L.d_model, L.d_ff), L)
        _expect_shape(names["mlp_out"], t["mlp_out"], (L.d_ff, L.d_model), L)
        parts["mlp_in"], parts["mlp_out"] = t["mlp_in"].T, t["mlp_out"].T
    if kind == "phi3_fused":
        _expect_shape(names["gate_up"], t["gate_up"], (2 * L.d_ff, L.d_model), L)
        parts["mlp_gate"], parts["mlp_in"] = t["gate_up"].chunk(2, dim=0)
        parts["b_gate"], parts["b_in"] = _split_rows(t.get("gate_up_bias"), [L.d_ff, L.d_ff])
    label = {r: names.get(r, names.get("gate_up", r)) for r in parts}
    for r in ("mlp_gate", "mlp_in"):
        if parts[r] is not None:
            _expect_shape(label[r], parts[r], (L.d_ff, L.d_model), L)
    _expect_shape(label["mlp_out"], parts["mlp_out"], (L.d_model, L.d_ff), L)
    return MLPWeights(mlp_in=parts["mlp_in"].contiguous(), mlp_out=parts["mlp_out"].contiguous(),
                      activation=L.activation,
                      mlp_gate=None if parts["mlp_gate"] is None else parts["mlp_gate"].contiguous(),
                      b_in=parts["b_in"], b_gate=parts["b_gate"], b_out=parts["b_out"])


@dataclass(frozen=True)
class Adapter:
    """Reads one architecture family through its :class:`AdapterSpec`; holds no state besides the spec."""

    spec: AdapterSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def renamed(self, name: str) -> "Adapter":
        """The same adapter reporting ``architecture=name`` (used by the Llama-like fallback)."""
        return Adapter(replace(self.spec, name=name))

    def missing_tensor(self, keys: Iterable[str]) -> Optional[str]:
        """The first required layer-0 tensor name this checkpoint lacks, or ``None`` when all are present."""
        keys = set(keys)
        prefixes = _layer_prefixes(self.spec, keys)
        prefix = prefixes[0] if prefixes else self.spec.canonical_prefix
        for rel in self.spec.tensors.values():
            if f"{prefix}{self.spec.stack}.0.{rel}" not in keys:
                return f"{prefix}{self.spec.stack}.0.{rel}"
        return None

    def layout(self, config: Any, keys: Iterable[str]) -> CheckpointLayout:
        """Shape facts from ``config`` and tensor names from ``keys`` (the checkpoint's tensor names).

        Raises UnsupportedArchitectureError when layer 0 lacks a required tensor, ValueError for a config without
        the sizes or with sizes that do not divide.
        """
        config = config_dict(config)
        keys = set(keys)
        model_type = str(config.get("model_type", self.name))
        missing = self.missing_tensor(keys)
        if missing is not None:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} read with the {self.name!r} adapter: no tensor matching {missing!r}; "
                f"pass the full checkpoint, or add an adapter with {REGISTER_HINT}")
        prefix = _layer_prefixes(self.spec, keys)[0]
        base = f"{prefix}{self.spec.stack}.{{i}}."
        n_layers = _positive_int(config, "n_layers", config_value(config, "n_layers"))
        d_model = _positive_int(config, "d_model", config_value(config, "d_model"))
        n_heads = _positive_int(config, "n_heads", config_value(config, "n_heads"))
        n_kv, head_dim = n_heads, None
        if self.spec.grouped_query:
            n_kv = _positive_int(config, "n_kv_heads", config_value(config, "n_kv_heads") or n_heads)
            head_dim = config_value(config, "head_dim")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"config hidden size {d_model} is not divisible by {n_heads} heads; set head_dim "
                                 f"in the config")
            head_dim = d_model // n_heads
        head_dim = _positive_int(config, "head_dim", head_dim)
        if n_heads % n_kv:
            raise ValueError(f"config num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}; "
                             f"fix the config")
        d_ff = _positive_int(config, "d_ff", config_value(config, "d_ff") or 4 * d_model)  # GPT-2: n_inner=None
        activation = config_value(config, "activation")
        if not isinstance(activation, str):
            raise ValueError(f"config has no activation name (keys {list(_CONFIG_KEYS['activation'])}); add "
                             f"hidden_act to the config")
        last = base.format(i=n_layers - 1) + next(iter(self.spec.tensors.values()))
        if last not in keys:
            raise ValueError(f"config says {n_layers} layers but the checkpoint has no tensor {last!r}; check "
                             f"num_hidden_layers against the checkpoint")
        templates = [(r, base + rel) for r, rel in self.spec.tensors.items()]
        templates += [(r, base + rel) for r, rel in self.spec.optional.items() if (base + rel).format(i=0) in keys]
        roles = {r for r, _ in templates}
        return CheckpointLayout(
            architecture=self.name, model_type=model_type, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=head_dim, d_ff=d_ff, activation=activation,
            gated_mlp=self.spec.mlp in ("gated", "phi3_fused"),
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            tensors=tuple(templates), attention_layout=self.spec.attention, mlp_layout=self.spec.mlp,
            qk_norm=bool(roles & RECORDED_ONLY_ROLES),
        )

    def _check(self, layout: ModelLayout, i: int) -> CheckpointLayout:
        if not isinstance(layout, CheckpointLayout) or not layout.tensors:
            raise ValueError(f"layout of type {type(layout).__name__} carries no tensor names; build it with "
                             f"adapter.layout(source.config, source.keys())")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layout.n_layers:
            raise ValueError(f"layer index {i!r} is out of range for a {layout.n_layers}-layer model; use "
                             f"0..{layout.n_layers - 1}")
        return layout

    def block_tensor_names(self, layout: ModelLayout, i: int, *, mlp: bool = True) -> list[str]:
        """Exactly the checkpoint tensors :meth:`block` reads for layer ``i`` (to shard layers across processes);
        ``mlp=False``: the attention tensors only."""
        layout = self._check(layout, i)
        return [t.format(i=i) for r, t in layout.tensors if _reads(r, mlp)]

    def block(self, source: "WeightSource", layout: ModelLayout, i: int, *, dtype: torch.dtype = torch.float64,
              device: Optional[torch.device | str] = None, mlp: bool = True) -> BlockWeights:
        """Layer ``i`` as per-head attention slices and out x in MLP matrices (MATH.md §6), in ``dtype`` on
        ``device``; reads exactly :meth:`block_tensor_names` from ``source``.  ``mlp=False`` reads the attention
        tensors only and leaves ``BlockWeights.mlp`` ``None`` (composition re-reads later layers' attention)."""
        layout = self._check(layout, i)
        names = {r: t.format(i=i) for r, t in layout.tensors}
        read = {r: n for r, n in names.items() if _reads(r, mlp)}
        tensors = {r: source.get(n, dtype=dtype, device=device) for r, n in read.items()}
        attention = _per_head(_unfuse_attention(layout.attention_layout, tensors, names, layout), names, layout)
        mlp_weights = _mlp(layout.mlp_layout, tensors, names, layout) if mlp else None
        storage_eps = max(source.storage_eps(n) for r, n in read.items() if tensors[r].ndim == 2)
        return BlockWeights(index=i, attention=attention, mlp=mlp_weights, storage_eps=storage_eps, names=names)
