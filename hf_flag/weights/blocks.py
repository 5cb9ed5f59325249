"""The canonical, architecture-free view of one model's weights.

Adapters (``hf_flag.weights.adapters``) turn a checkpoint's tensors into these objects; the analysis
(``hf_flag.analyze``) reads only these objects. This file is the contract between the two.

Conventions (MATH.md, section 6):

* Attention heads use the ``x @ W`` convention: ``W_Q[h]`` is ``(d_model, head_dim)`` and maps the residual
  stream into head ``h``'s query space; ``W_O[h]`` is ``(head_dim, d_model)`` and writes back.  Read subspaces
  are ``col(W_Q[h])``, ``col(W_K[h])``, ``col(W_V[h])`` (subspaces of R^d_model); the write subspace is
  ``row(W_O[h])``.
* Key/value tensors are stored per *KV head* (``n_kv_heads`` of them).  Query head ``h`` uses KV head
  ``kv_head_of(h)`` = ``h // (n_heads // n_kv_heads)``, exactly as transformers' ``repeat_kv``.
* MLP matrices use the ``nn.Linear`` convention, out x in: ``mlp_in`` is ``(d_ff, d_model)``, ``mlp_out`` is
  ``(d_model, d_ff)``.  For a gated MLP (SwiGLU, GeGLU), ``mlp_in`` is the *up* projection and ``mlp_gate`` the
  gate projection; both share the hidden space R^d_ff with ``mlp_out`` (the *down* projection).
* Tensors are returned in the dtype the caller asked for (float64 for geometry); ``storage_eps`` records the
  relative precision the weights were stored in (``WeightSource.storage_eps``: a float dtype's epsilon, 2^-b for
  b-bit quantisation), which sets the flag tolerance (MATH.md section 4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class ModelLayout:
    """Shape facts of a transformer, read from its config by an adapter."""

    architecture: str  # adapter name, e.g. "llama", "gpt2", "bert"
    model_type: str  # config.model_type as written in the checkpoint
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    activation: str  # e.g. "gelu_new", "silu", "relu", "identity"
    gated_mlp: bool
    tied_embeddings: bool = False

    @property
    def kv_group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        """Index of the KV head that query head ``head`` attends with (transformers' ``repeat_kv``)."""
        return head // self.kv_group_size

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class AttentionWeights:
    """One block's attention, sliced per head, ``x @ W`` convention (see module docstring)."""

    W_Q: torch.Tensor  # (n_heads, d_model, head_dim)
    W_K: torch.Tensor  # (n_kv_heads, d_model, head_dim)
    W_V: torch.Tensor  # (n_kv_heads, d_model, head_dim)
    W_O: torch.Tensor  # (n_heads, head_dim, d_model)
    b_Q: Optional[torch.Tensor] = None  # (n_heads, head_dim)
    b_K: Optional[torch.Tensor] = None  # (n_kv_heads, head_dim)
    b_V: Optional[torch.Tensor] = None  # (n_kv_heads, head_dim)
    b_O: Optional[torch.Tensor] = None  # (d_model,)


@dataclass
class MLPWeights:
    """One block's MLP, ``nn.Linear`` convention (out x in)."""

    mlp_in: torch.Tensor  # (d_ff, d_model); the "up" projection of a gated MLP
    mlp_out: torch.Tensor  # (d_model, d_ff); the "down" projection
    activation: str
    mlp_gate: Optional[torch.Tensor] = None  # (d_ff, d_model), gated MLPs only
    b_in: Optional[torch.Tensor] = None  # (d_ff,)
    b_gate: Optional[torch.Tensor] = None  # (d_ff,)
    b_out: Optional[torch.Tensor] = None  # (d_model,)


@dataclass
class BlockWeights:
    """Everything the analysis needs from one transformer block."""

    index: int
    attention: Optional[AttentionWeights]
    mlp: Optional[MLPWeights]
    storage_eps: float  # coarsest WeightSource.storage_eps among the block's 2-D (and stacked 3-D) weights read
    names: dict = field(default_factory=dict)  # role -> checkpoint tensor name(s), for provenance
    # mixture-of-experts blocks (Mixtral, Qwen2-MoE): the routed experts, each an MLP of its own, and the router
    # (n_experts, d_model), nn.Linear layout (logits = x @ router.T); ``mlp`` is then the shared expert, if any
    experts: tuple = ()
    router: Optional[torch.Tensor] = None


@dataclass
class LinearLayer:
    """One layer of a plain MLP chain (``nn.Sequential`` of ``nn.Linear``), out x in."""

    name: str
    weight: torch.Tensor  # (out, in)
    bias: Optional[torch.Tensor]
    activation_after: str  # activation between this layer and the next ("identity" for none)
    storage_dtype: str  # as WeightSource.storage_dtype reports it: "float32", "bfloat16", "Q4_1", ...
    storage_eps: float  # relative precision of the stored weight, as WeightSource.storage_eps reports it
