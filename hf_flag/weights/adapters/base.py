"""Declarative architecture adapters and the one generic loader that reads them.

An adapter only answers "which tensor is which, in which layout" (docs/ARCHITECTURE.md).  Every family is one
:class:`AdapterSpec` in the architecture table (``table.py``): the layer stack's name, the tensor name of each role
relative to one layer, and the storage layout of the attention and MLP tensors.  :class:`Adapter` turns
(spec, weight source, layer index) into a :class:`~hf_flag.weights.blocks.BlockWeights` in the canonical per-head
``x @ W`` layout of MATH.md §6:

* ``W_Q[h]``, ``W_K[g]``, ``W_V[g]`` are ``(d_model, head_dim)``; ``W_O[h]`` is ``(head_dim, d_model)``;
  KV head ``g`` is stored once and query head ``h`` uses ``g = h // (n_heads // n_kv_heads)`` (``repeat_kv``).
* MLP matrices are out x in (``nn.Linear``); GPT-2's ``Conv1D`` (in x out) is transposed.

Roles (the same names in every family): attention ``q``, ``k``, ``v``, ``o`` or fused ``qkv``; MLP ``mlp_gate``,
``mlp_in`` (the up projection), ``mlp_out`` (down) or fused ``mlp_gate_up``; mixture of experts ``router``,
``experts_gate``, ``experts_in``, ``experts_out`` or fused ``experts_gate_up`` (stacked over experts) and the
shared expert's ``shared_gate``, ``shared_in``, ``shared_out``, ``shared_router``; ``<role>_bias`` for every bias;
``q_norm`` / ``k_norm`` (recorded only).

Attention layouts (``AdapterSpec.attention``):

``"linear"``            separate ``nn.Linear`` q (n_h d_h, d), k/v (n_kv d_h, d), o (d, n_h d_h); optional biases.
``"conv1d_fused_qkv"``  GPT-2: ``c_attn`` (d, 3d) in x out = [Q | K | V]; ``c_proj`` (d, d) in x out.
``"fused_qkv"``         Phi-3: ``qkv_proj`` rows [Q (n_h d_h); K (n_kv d_h); V (n_kv d_h)].
``"fused_qkv_grouped"`` rows in n_kv groups, each (n_h / n_kv query heads, one key, one value) of d_h rows:
                        GPT-NeoX (n_kv = n_h: rows (head, {q,k,v}, d_h)) and Falcon (transformers'
                        ``FalconAttention._split_heads``: n_kv = num_kv_heads, 1 for multi-query, n_h for neither).

MLP layouts (``AdapterSpec.mlp``): ``"linear"`` (in, out), ``"conv1d"`` (GPT-2, in x out), ``"gated"``
(gate, up, down), ``"fused_gate_up"`` (Phi-3 ``gate_up_proj`` rows [gate; up], then down), ``"moe"`` (a router and
experts stacked (n_experts, out, in): ``experts_gate_up`` rows [gate; up] as transformers >= 5 holds them, or
``experts_gate`` + ``experts_in`` as GGUF stores them; optional shared expert, gated).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

import torch

from hf_flag.errors import InputError, UnsupportedArchitectureError
from hf_flag.weights.blocks import AttentionWeights, BlockWeights, MLPWeights, ModelLayout
from hf_flag.weights.weight_source import integer_weight_error

if TYPE_CHECKING:
    from hf_flag.weights.weight_source import WeightSource

ATTENTION_LAYOUTS: dict[str, tuple[str, ...]] = {  # layout -> required roles
    "linear": ("q", "k", "v", "o"),
    "conv1d_fused_qkv": ("qkv", "o"),
    "fused_qkv": ("qkv", "o"),
    "fused_qkv_grouped": ("qkv", "o"),
}
MLP_LAYOUTS: dict[str, tuple[str, ...]] = {
    "linear": ("mlp_in", "mlp_out"),
    "conv1d": ("mlp_in", "mlp_out"),
    "gated": ("mlp_gate", "mlp_in", "mlp_out"),
    "fused_gate_up": ("mlp_gate_up", "mlp_out"),
    "moe": ("router", "experts_out"),  # + experts_gate_up, or experts_gate and experts_in (whichever is present)
}
GATED_MLP_LAYOUTS = frozenset({"gated", "fused_gate_up", "moe"})
#: roles recorded in ``BlockWeights.names`` / the layout but never read: a per-head RMSNorm on q and k (Qwen3,
#: Gemma 3) acts after the projection, so it does not change the read subspace col(W_Q[h]) (MATH.md §6); the shared
#: expert's scalar gate (Qwen2-MoE) scales its output and is no subspace.
RECORDED_ONLY_ROLES = frozenset({"q_norm", "k_norm", "shared_router"})
#: roles the attention part of a block is built from (``block(..., mlp=False)`` reads only these)
ATTENTION_ROLES = frozenset({"q", "k", "v", "o", "qkv", "q_bias", "k_bias", "v_bias", "o_bias", "qkv_bias"})
REGISTER_HINT = "hf_flag.weights.adapters.register_adapter(model_type, adapter)"

# config field -> candidate config.json keys, first present (not None) wins
_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "n_heads": ("num_attention_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "d_ff": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"),
    "d_ff_expert": ("moe_intermediate_size", "intermediate_size"),
    "d_ff_shared": ("shared_expert_intermediate_size",),
    "n_experts": ("num_experts", "num_local_experts"),
    "activation": ("hidden_activation", "hidden_act", "activation_function", "activation"),
}


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp's converter (``convert_hf_to_gguf.py``) writes one family to GGUF: its GGUF architecture name
    (a value of gguf-py's ``MODEL_ARCH_NAMES``) and the reorderings it applies, as (regular expression on the GGUF
    tensor name, transform name in ``hf_flag.weights.gguf_source.GGUF_TRANSFORMS``), each undone on read.

    The config facts GGUF does not store are family data here: activation, the MLP activation the family's modules
    apply (its transformers config class's default; ``None``: the file cannot be read); config_keys, GGUF metadata
    key (after ``"<arch>."``) -> config key where the family names it otherwise than
    ``gguf_source.GGUF_CONFIG_KEYS``; config, fixed config values that describe the tensors as read.
    """

    arch: str
    transforms: tuple[tuple[str, str], ...] = ()
    activation: Optional[str] = None
    config_keys: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterSpec:
    """Where one family keeps its tensors.  All names are relative to one layer, ``<prefix><stack>.<i>.<name>``.

    name: adapter name (``ModelLayout.architecture``); stack: the layer list, e.g. ``"layers"`` or
    ``"encoder.layer"`` (any prefix before it, such as ``"model."`` or ``"bert."``, is found in the checkpoint);
    tensors: role -> name for the roles the layouts require; optional: role -> name for roles read when present
    (biases, MoE alternatives; ``q_norm``/``k_norm`` are recorded only); grouped_query: read
    ``num_key_value_heads`` and ``head_dim`` from the config (else ``n_kv_heads = n_heads`` and
    ``head_dim = d_model / n_heads``, as the family's module does); kv_heads: a rule config -> n_kv_heads that
    replaces that lookup (Falcon); canonical_prefix: the prefix named in error messages and used for GGUF names;
    gguf: the family's GGUF storage (``None``: not read from GGUF); alternatives: other checkpoint forms of the same
    family (tried in order when this spec's layer-0 tensors are not all present), such as the per-expert tensors of
    mixture-of-experts Hub checkpoints, whose names hold ``{e}`` for the expert index and are stacked on read.
    """

    name: str
    stack: str
    attention: str
    mlp: str
    tensors: Mapping[str, str]
    optional: Mapping[str, str] = field(default_factory=dict)
    grouped_query: bool = False
    kv_heads: Optional[Callable[[Mapping[str, Any]], int]] = None
    canonical_prefix: str = ""
    gguf: Optional[GGUFLayout] = None
    alternatives: tuple["AdapterSpec", ...] = ()

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_LAYOUTS:
            raise InputError(f"AdapterSpec {self.name!r}: attention={self.attention!r}; use one of "
                             f"{sorted(ATTENTION_LAYOUTS)}")
        if self.mlp not in MLP_LAYOUTS:
            raise InputError(f"AdapterSpec {self.name!r}: mlp={self.mlp!r}; use one of {sorted(MLP_LAYOUTS)}")
        missing = [r for r in ATTENTION_LAYOUTS[self.attention] + MLP_LAYOUTS[self.mlp] if r not in self.tensors]
        if missing:
            raise InputError(f"AdapterSpec {self.name!r}: tensors has no entry for roles {missing}; add their "
                             f"per-layer names")

    def roles(self) -> dict[str, str]:
        """Every role -> per-layer name, required and optional."""
        return {**self.tensors, **self.optional}


@dataclass(frozen=True)
class CheckpointLayout(ModelLayout):
    """A :class:`ModelLayout` plus where layer ``i``'s tensors live in this checkpoint.

    tensors: (role, name template with ``{i}``) for every role present in the checkpoint (read roles and
    recorded-only roles); attention_layout / mlp_layout: the spec's storage layouts; qk_norm: the block applies a
    per-head RMSNorm to q and k after projection (Qwen3, Gemma 3), which leaves col(W_Q[h]) unchanged (MATH.md §6);
    n_experts: routed experts per block (0: dense MLP); d_ff is then one expert's hidden size.
    """

    tensors: tuple[tuple[str, str], ...] = ()
    attention_layout: str = "linear"
    mlp_layout: str = "linear"
    qk_norm: bool = False
    n_experts: int = 0


def config_dict(config: Any) -> dict:
    """A transformers ``PretrainedConfig`` or a mapping, as a plain dict."""
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise InputError(f"config of type {type(config).__name__} is not a dict or PretrainedConfig; pass "
                     f"source.config or model.config")


def config_value(config: Mapping, field_name: str) -> Any:
    """The first non-None value among the config keys that mean ``field_name`` (``_CONFIG_KEYS``), else None."""
    return next((config[k] for k in _CONFIG_KEYS[field_name] if config.get(k) is not None), None)


def _positive_int(config: Mapping, field_name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"config {field_name} (keys {list(_CONFIG_KEYS[field_name])}) is {value!r}; the checkpoint "
                         f"config must give a positive integer")
    return value


def _layer_prefixes(spec: AdapterSpec, keys: Iterable[str]) -> list[str]:
    """Prefixes ``p`` such that ``p + stack + ".0." + <first required name>`` is a key (shortest first)."""
    anchor = f"{spec.stack}.0.{next(iter(spec.tensors.values()))}"
    found = {k[: len(k) - len(anchor)] for k in keys if k.endswith(anchor)}
    return sorted((p for p in found if p == "" or p.endswith(".")), key=lambda p: (len(p), p))


def _expand(template: str, i: int, n_experts: int) -> list[str]:
    """The tensor names of ``template`` in layer ``i``: one, or one per expert when it holds ``{e}``."""
    if "{e}" in template:
        return [template.format(i=i, e=e) for e in range(n_experts)]
    return [template.format(i=i)]


def _expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], layout: ModelLayout) -> None:
    if tuple(tensor.shape) != shape:
        raise InputError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} for {layout.model_type} "
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
    if kind == "fused_qkv_grouped":  # rows (kv group, (h/kv q heads, k, v), d_h): FalconAttention._split_heads
        group = h // kv + 2
        w = qkv.reshape(kv, group, dh, d)
        b = None if bias is None else bias.reshape(kv, group, dh)
        for r, sl in (("q", slice(0, group - 2)), ("k", slice(group - 2, group - 1)), ("v", slice(group - 1, group))):
            out[r] = w[:, sl].reshape(-1, d)
            out[r + "_bias"] = None if b is None else b[:, sl].reshape(-1)
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


def _mlp(kind: str, t: dict[str, torch.Tensor], names: dict[str, str], L: ModelLayout,
         prefix: str = "mlp") -> MLPWeights:
    """Checkpoint MLP tensors -> out x in ``MLPWeights`` (``prefix``: the role prefix, ``"shared"`` for the shared
    expert of a mixture-of-experts block)."""
    roles = {part: f"{prefix}_{part}" for part in ("gate", "in", "out")}
    parts = {p: t.get(r) for p, r in roles.items()}
    biases = {p: t.get(r + "_bias") for p, r in roles.items()}
    label = {p: names.get(r, r) for p, r in roles.items()}
    if kind == "conv1d":  # GPT-2 Conv1D stores in x out
        _expect_shape(label["in"], parts["in"], (L.d_model, L.d_ff), L)
        _expect_shape(label["out"], parts["out"], (L.d_ff, L.d_model), L)
        parts["in"], parts["out"] = parts["in"].T, parts["out"].T
    if kind == "fused_gate_up":
        label["gate"] = label["in"] = names["mlp_gate_up"]
        _expect_shape(label["in"], t["mlp_gate_up"], (2 * L.d_ff, L.d_model), L)
        parts["gate"], parts["in"] = t["mlp_gate_up"].chunk(2, dim=0)
        biases["gate"], biases["in"] = _split_rows(t.get("mlp_gate_up_bias"), [L.d_ff, L.d_ff])
    for p in ("gate", "in"):
        if parts[p] is not None:
            _expect_shape(label[p], parts[p], (L.d_ff, L.d_model), L)
    _expect_shape(label["out"], parts["out"], (L.d_model, L.d_ff), L)
    return MLPWeights(mlp_in=parts["in"].contiguous(), mlp_out=parts["out"].contiguous(), activation=L.activation,
                      mlp_gate=None if parts["gate"] is None else parts["gate"].contiguous(),
                      b_in=biases["in"], b_gate=biases["gate"], b_out=biases["out"])


def _experts(t: dict[str, torch.Tensor], names: dict[str, str], L: "CheckpointLayout") -> tuple[MLPWeights, ...]:
    """Stacked expert tensors (n_experts, out, in) -> one gated ``MLPWeights`` per expert.  ``experts_gate_up``
    rows are [gate; up] per expert (transformers' ``Qwen2MoeExperts`` / ``MixtralExperts``: ``chunk(2)``)."""
    e, f, d = L.n_experts, L.d_ff, L.d_model
    if "experts_gate_up" in t:
        _expect_shape(names["experts_gate_up"], t["experts_gate_up"], (e, 2 * f, d), L)
        gate, up = t["experts_gate_up"].chunk(2, dim=1)
    else:
        gate, up = t["experts_gate"], t["experts_in"]
        _expect_shape(names["experts_gate"], gate, (e, f, d), L)
        _expect_shape(names["experts_in"], up, (e, f, d), L)
    _expect_shape(names["experts_out"], t["experts_out"], (e, d, f), L)
    return tuple(MLPWeights(mlp_in=up[j].contiguous(), mlp_out=t["experts_out"][j].contiguous(),
                            mlp_gate=gate[j].contiguous(), activation=L.activation) for j in range(e))


def _missing_tensor(spec: AdapterSpec, keys: set) -> Optional[str]:
    """The first required layer-0 tensor name (expert 0 for per-expert names) ``keys`` lacks, else ``None``."""
    prefixes = _layer_prefixes(spec, keys)
    prefix = prefixes[0] if prefixes else spec.canonical_prefix
    for rel in spec.tensors.values():
        name = f"{prefix}{spec.stack}.0.{rel}".format(e=0)
        if name not in keys:
            return name
    return None


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
        """The first required layer-0 tensor name this checkpoint lacks (in the spec's own form), or ``None`` when
        the spec or one of its alternatives has all of them."""
        keys = set(keys)
        missing = [_missing_tensor(spec, keys) for spec in (self.spec, *self.spec.alternatives)]
        return None if None in missing else missing[0]

    def layout(self, config: Any, keys: Iterable[str]) -> CheckpointLayout:
        """Shape facts from ``config`` and tensor names from ``keys`` (the checkpoint's tensor names).

        Raises UnsupportedArchitectureError when layer 0 lacks a required tensor, ValueError for a config without
        the sizes or with sizes that do not divide.
        """
        config = config_dict(config)
        keys = set(keys)
        model_type = str(config.get("model_type", self.name))
        missing = self.missing_tensor(keys)
        packed = sorted(k for k in keys if k.endswith(".qweight"))  # GPTQ/AWQ: int4 packed in int32, no .weight
        if missing is not None and packed:
            raise integer_weight_error(model_type, packed[0], "packed integers")
        if missing is not None:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} read with the {self.name!r} adapter: no tensor matching {missing!r}; "
                f"pass the full checkpoint, or add an adapter with {REGISTER_HINT}")
        spec = next(s for s in (self.spec, *self.spec.alternatives) if _missing_tensor(s, keys) is None)
        return self._layout(spec, config, keys, model_type)

    def _layout(self, spec: AdapterSpec, config: dict, keys: set, model_type: str) -> CheckpointLayout:
        """:meth:`layout` for the checkpoint form ``spec`` (this spec or one of its alternatives)."""
        prefix = _layer_prefixes(spec, keys)[0]
        base = f"{prefix}{spec.stack}.{{i}}."
        n_layers = _positive_int(config, "n_layers", config_value(config, "n_layers"))
        d_model = _positive_int(config, "d_model", config_value(config, "d_model"))
        n_heads = _positive_int(config, "n_heads", config_value(config, "n_heads"))
        n_kv, head_dim = n_heads, None
        if spec.kv_heads is not None:
            n_kv = _positive_int(config, "n_kv_heads", spec.kv_heads(config))
        elif spec.grouped_query:
            n_kv = _positive_int(config, "n_kv_heads", config_value(config, "n_kv_heads") or n_heads)
        if spec.grouped_query:
            head_dim = config_value(config, "head_dim")
        if head_dim is None:
            if d_model % n_heads:
                raise InputError(f"config hidden size {d_model} is not divisible by {n_heads} heads; set head_dim "
                                 f"in the config")
            head_dim = d_model // n_heads
        head_dim = _positive_int(config, "head_dim", head_dim)
        if n_heads % n_kv:
            raise InputError(f"config num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}; "
                             f"fix the config")
        n_experts = 0
        if spec.mlp == "moe":
            n_experts = _positive_int(config, "n_experts", config_value(config, "n_experts"))
            d_ff = _positive_int(config, "d_ff_expert", config_value(config, "d_ff_expert"))
        else:
            d_ff = _positive_int(config, "d_ff", config_value(config, "d_ff") or 4 * d_model)  # GPT-2: n_inner=None
        activation = config_value(config, "activation")
        if not isinstance(activation, str):
            raise InputError(f"config has no activation name (keys {list(_CONFIG_KEYS['activation'])}); add "
                             f"hidden_act to the config")
        last = base.format(i=n_layers - 1) + next(iter(spec.tensors.values()))
        if last not in keys:
            raise InputError(f"config says {n_layers} layers but the checkpoint has no tensor {last!r}; check "
                             f"num_hidden_layers against the checkpoint")
        templates = [(r, base + rel) for r, rel in spec.tensors.items()]
        templates += [(r, base + rel) for r, rel in spec.optional.items() if (base + rel).format(i=0, e=0) in keys]
        roles = {r for r, _ in templates}
        if spec.mlp == "moe" and "experts_gate_up" not in roles and not {"experts_gate", "experts_in"} <= roles:
            wanted = [base.format(i=0) + spec.optional.get(r, r) for r in ("experts_gate_up", "experts_gate")]
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} read with the {self.name!r} adapter: layer 0 has neither {wanted[0]!r} "
                f"nor {wanted[1]!r} (with its up projection); pass the full checkpoint, or add an adapter with "
                f"{REGISTER_HINT}")
        return CheckpointLayout(
            architecture=self.name, model_type=model_type, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=head_dim, d_ff=d_ff, activation=activation,
            gated_mlp=spec.mlp in GATED_MLP_LAYOUTS,
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            tensors=tuple(templates), attention_layout=spec.attention, mlp_layout=spec.mlp,
            qk_norm=bool(roles & {"q_norm", "k_norm"}), n_experts=n_experts,
        )

    def _check(self, layout: ModelLayout, i: int) -> CheckpointLayout:
        if not isinstance(layout, CheckpointLayout) or not layout.tensors:
            raise InputError(f"layout of type {type(layout).__name__} carries no tensor names; build it with "
                             f"adapter.layout(source.config, source.keys())")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layout.n_layers:
            raise InputError(f"layer index {i!r} is out of range for a {layout.n_layers}-layer model; use "
                             f"0..{layout.n_layers - 1}")
        return layout

    def block_tensor_names(self, layout: ModelLayout, i: int, *, mlp: bool = True) -> list[str]:
        """Exactly the checkpoint tensors :meth:`block` reads for layer ``i`` (to shard layers across processes);
        ``mlp=False``: the attention tensors only."""
        layout = self._check(layout, i)
        return [n for r, t in layout.tensors if _reads(r, mlp) for n in _expand(t, i, layout.n_experts)]

    def block(self, source: "WeightSource", layout: ModelLayout, i: int, *, dtype: torch.dtype = torch.float64,
              device: Optional[torch.device | str] = None, mlp: bool = True) -> BlockWeights:
        """Layer ``i`` as per-head attention slices and out x in MLP matrices (MATH.md §6), in ``dtype`` on
        ``device``; reads exactly :meth:`block_tensor_names` from ``source``.  ``mlp=False`` reads the attention
        tensors only and leaves ``BlockWeights.mlp`` ``None`` (composition re-reads later layers' attention)."""
        layout = self._check(layout, i)
        names = {r: t.replace("{i}", str(i)) for r, t in layout.tensors}  # per-expert names keep their {e}
        read = {r: _expand(t, i, layout.n_experts) for r, t in layout.tensors if _reads(r, mlp)}
        tensors = {r: torch.stack([source.get(n, dtype=dtype, device=device) for n in ns]) if len(ns) > 1 or
                   "{e}" in names[r] else source.get(ns[0], dtype=dtype, device=device) for r, ns in read.items()}
        attention = _per_head(_unfuse_attention(layout.attention_layout, tensors, names, layout), names, layout)
        mlp_weights, experts, router = None, (), None
        if mlp and layout.mlp_layout == "moe":
            experts, router = _experts(tensors, names, layout), tensors["router"]
            _expect_shape(names["router"], router, (layout.n_experts, layout.d_model), layout)
            if "shared_out" in tensors:
                d_shared = tensors["shared_out"].shape[-1]  # its own hidden size (shared_expert_intermediate_size)
                mlp_weights = _mlp("gated", tensors, names, replace(layout, d_ff=d_shared), prefix="shared")
        elif mlp:
            mlp_weights = _mlp(layout.mlp_layout, tensors, names, layout)
        return BlockWeights(index=i, attention=attention, mlp=mlp_weights,
                            storage_eps=self.block_storage_eps(source, layout, i, mlp=mlp), names=names,
                            experts=experts, router=router)

    def block_storage_eps(self, source: "WeightSource", layout: ModelLayout, i: int, *, mlp: bool = True) -> float:
        """``BlockWeights.storage_eps`` of layer ``i`` without reading it: the coarsest ``source.storage_eps`` among
        the 2-D weights (and per-expert tensors, stacked) :meth:`block` reads."""
        layout = self._check(layout, i)
        return max(source.storage_eps(n) for r, t in layout.tensors if _reads(r, mlp)
                   for n in _expand(t, i, layout.n_experts) if len(source.shape(n)) + ("{e}" in t) >= 2)
