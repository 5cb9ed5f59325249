"""scikit-learn's digits (1797 8x8 images, 10 classes, ships offline): the MLP and small ResNet of claims 3 and 4.

One cached training function serves both claims: every logged point records the Neural Collapse metrics of the
penultimate features (MATH.md §5) and, for the ResNet, the pair diagnostics of each residual block (MATH.md §2-§4).

Residual blocks as layer pairs.  A block computes ``relu(x + conv2(relu(conv1(x))))``; its shared hidden space is
conv1's output channels = conv2's input channels (``c_mid``).  ``W_l`` = conv1's weight ``(c_mid, c_in, kh, kw)``
reshaped to ``(c_mid, c_in*kh*kw)`` and augmented with conv1's bias; ``W_next`` = conv2's weight
``(c_out, c_mid, kh, kw)`` permuted to ``(c_out, kh, kw, c_mid)`` and reshaped to ``(c_out*kh*kw, c_mid)``, so that
``W_next^T W_next = sum_{o, kh, kw} w[o, :, kh, kw] w[o, :, kh, kw]^T`` is the channel Gram matrix.  The ReLU's
per-channel rescaling symmetry (conv1 output channel c times a, conv2 input channel c over a) is exactly the
diagonal of this imbalance, so ``diag D`` obeys the weight-decay law as in an MLP; the skip connection adds to
conv2's output and does not touch the pair.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from hf_flag.harness.experiments.common import Trace, deterministic, flag_identity_fraction, train
from hf_flag.geometry.pairs import augment
from hf_flag.geometry.collapse import class_means, level2_alignment, level3_alignment, neural_collapse
from hf_flag.geometry.pairs import (
    commutator_baseline,
    commutator_ratio,
    imbalance_diagonal_norm,
    imbalance_norm,
    transport_scores,
)

TRANSPORT_K = 4  # top-k window of the transport scores of a residual block (MATH.md §4)


def load_digits_tensors(device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as ``(X (1797, 64) float32, standardised per pixel, y (1797,) int64)``; offline (bundled with
    scikit-learn).  Constant pixels (zero variance) stay 0."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    std = x.std(0)
    x = ((x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))).to(device=device, dtype=torch.float32)
    return x, torch.tensor(data.target, dtype=torch.int64, device=device)


class ResidualBlock(nn.Module):
    """``relu(x + conv2(relu(conv1(x))))``, 3x3 convolutions, no normalisation (keeps the weight geometry plain)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResNetTrunk(nn.Module):
    """8x8 digit -> stem conv -> residual blocks -> 2x2 average pool -> flat ``channels * 16`` vector."""

    def __init__(self, channels: int, n_blocks: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range(n_blocks))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torch's default conv init leaves this no-BN net stuck at chance
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x.view(-1, 1, 8, 8)))
        for block in self.blocks:
            h = block(h)
        return nn.functional.avg_pool2d(h, 2).flatten(1)


class DigitsNet(nn.Module):
    """``trunk -> fc1 -> relu -> fc``; the penultimate features are ``relu(fc1(trunk(x)))``, ``fc`` the classifier."""

    def __init__(self, trunk: nn.Module, trunk_dim: int, hidden: int, n_classes: int = 10) -> None:
        super().__init__()
        self.trunk, self.fc1, self.fc = trunk, nn.Linear(trunk_dim, hidden), nn.Linear(hidden, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(self.trunk(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@dataclass(frozen=True)
class DigitsRun:
    arch: str  # "mlp" or "resnet"
    weight_decay: float
    epochs: int
    log_every: int  # epochs
    lr: float = 0.05
    batch_size: int = 128
    hidden: int = 64  # penultimate feature dimension
    mlp_width: int = 128
    channels: int = 16
    n_blocks: int = 2
    seed: int = 0


def build_model(run: DigitsRun) -> DigitsNet:
    if run.arch == "mlp":
        trunk = nn.Sequential(nn.Linear(64, run.mlp_width), nn.ReLU(), nn.Linear(run.mlp_width, run.mlp_width),
                              nn.ReLU())
        return DigitsNet(trunk, run.mlp_width, run.hidden)
    if run.arch == "resnet":
        return DigitsNet(ResNetTrunk(run.channels, run.n_blocks), run.channels * 16, run.hidden)
    raise ValueError(f"digits: arch {run.arch!r} unknown; use 'mlp' or 'resnet'")


def conv_pair(block: ResidualBlock) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(W_l, W_next, bias_l)`` of a residual block, reshaped as in the module docstring."""
    w1, w2 = block.conv1.weight.detach(), block.conv2.weight.detach()
    W_l = w1.reshape(w1.shape[0], -1)
    W_next = w2.permute(0, 2, 3, 1).reshape(-1, w2.shape[1])
    return W_l, W_next, None if block.conv1.bias is None else block.conv1.bias.detach()


def collapse_probe(model: DigitsNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """NC1-NC4, Level-2 / Level-3 alignment and the last-pair commutator (MATH.md §3, §5) on the training set."""
    feats = model.features(x).double()
    W, b = model.fc.weight.detach(), model.fc.bias.detach()
    nc = neural_collapse(feats, y, W, classifier_bias=b)
    means = class_means(feats, y, n_classes=W.shape[0])
    l2 = level2_alignment(W, means, global_mean=feats.mean(0))
    l3 = level3_alignment(W, means, global_mean=feats.mean(0))
    logits = feats @ W.double().T + b.double()
    return {
        "nc1": nc["nc1_covariance_pinv"], "nc2_etf": nc["nc2_simplex_etf_error"],
        "nc2_equinorm": nc["nc2_mean_norms_cv"], "nc3": nc["nc3_self_duality"],
        "nc4": 1.0 - nc["nc4_clf_ncc_agreement"],
        "level2_error": l2["level2_subspace_error"], "level2_angle": l2["level2_max_angle"],
        "level2_error_baseline": l2["level2_subspace_error_baseline"],
        "level3_basis": l3["level3_basis_score"], "level3_kappa": l3["kappa"],
        "kappa_last": float(commutator_ratio(model.fc1.weight.detach(), W, bias_l=model.fc1.bias.detach())),
        "train_error": float((logits.argmax(1) != y).double().mean()),
        "loss": float(nn.functional.cross_entropy(logits, y)),
    }


def block_probe(model: DigitsNet) -> dict[str, float]:
    """Per residual block: imbalance (full, diagonal), kappa, flag identity fraction, transport scores."""
    out: dict[str, float] = {}
    for i, block in enumerate(getattr(model.trunk, "blocks", [])):
        W, W_next, bias = conv_pair(block)
        W_aug = augment(W, bias)
        out[f"b{i}_full"] = float(imbalance_norm(W, W_next, bias_l=bias))
        out[f"b{i}_diag"] = float(imbalance_diagonal_norm(W, W_next, bias_l=bias))
        out[f"b{i}_kappa"] = float(commutator_ratio(W, W_next, bias_l=bias))
        out[f"b{i}_flag_id"], out[f"b{i}_flag_soft"], _ = flag_identity_fraction(W_aug, W_next)
        sub, basis = transport_scores(W_aug, W_next, TRANSPORT_K)
        out[f"b{i}_subspace"], out[f"b{i}_basis"] = float(sub), float(basis)
    return out


def is_block_key(key: str) -> bool:
    """Whether a trace key is a residual-block metric (``b<i>_...``) of :func:`block_probe`."""
    return key[:1] == "b" and key[1:2].isdigit()


def null_kappas(model: DigitsNet) -> dict[str, float]:
    """Random-rotation baselines of kappa (Haar RMS, closed form, MATH.md §3) for the last pair and every residual
    block."""
    pairs = {"kappa_last": (model.fc1.weight.detach(), model.fc.weight.detach(), model.fc1.bias.detach())}
    pairs.update({f"b{i}_kappa": conv_pair(b) for i, b in enumerate(getattr(model.trunk, "blocks", []))})
    return {k + "_baseline": float(commutator_baseline(W, Wn, bias_l=bias)) for k, (W, Wn, bias) in pairs.items()}


@dataclass
class DigitsResult:
    run: DigitsRun
    trace: Trace  # steps are epochs
    baseline_start: dict[str, float]
    baseline_end: dict[str, float]
    steps_per_epoch: int


@functools.lru_cache(maxsize=16)
def train_digits(run: DigitsRun, threads: int = 1, device: Optional[torch.device] = None) -> DigitsResult:
    """Train ``run`` with plain minibatch SGD (cross-entropy, reshuffled every epoch); log every ``log_every``
    epochs.  Cached: claims 3 and 4 share the ResNet runs."""
    with deterministic(run.seed, threads) as gen:
        x, y = load_digits_tensors(device)
        model = build_model(run).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
        n = x.shape[0]
        spe = -(-n // run.batch_size)
        order: list[torch.Tensor] = []

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            i = (step - 1) % spe
            if i == 0:
                order[:] = [torch.randperm(n, generator=gen).to(x.device)]
            idx = order[0][i * run.batch_size:(i + 1) * run.batch_size]
            return x[idx], y[idx]

        baselines: dict[str, dict[str, float]] = {}

        def probe(model_: nn.Module, step: int) -> dict[str, float]:
            if step in (0, run.epochs * spe):
                baselines["start" if step == 0 else "end"] = null_kappas(model_)
            return {**collapse_probe(model_, x, y), **block_probe(model_)}

        trace = train(model, opt, batch, nn.functional.cross_entropy, steps=run.epochs * spe,
                      record_every=run.log_every * spe, probe=probe)
    trace.steps = [s // spe for s in trace.steps]
    return DigitsResult(run, trace, baselines["start"], baselines["end"], spe)


#: The digits runs shared by claims 3 and 4 (weight decay is set per run); ``QUICK_RUNS`` for ``--quick``.
FULL_RUNS = {"mlp": DigitsRun("mlp", 0.0, epochs=160, log_every=8, lr=0.05, batch_size=64),
             "resnet": DigitsRun("resnet", 0.0, epochs=64, log_every=4, lr=0.03, batch_size=128)}
QUICK_RUNS = {"mlp": DigitsRun("mlp", 0.0, epochs=30, log_every=3, lr=0.05, batch_size=64),
              "resnet": DigitsRun("resnet", 0.0, epochs=12, log_every=2, lr=0.03, batch_size=128)}
WEIGHT_DECAYS = (0.0, 0.01)
