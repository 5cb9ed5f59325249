"""Shared plumbing of the reproduction experiments: seeding, data, models, one training loop, result types.

Experiments are an integration layer: every number they report comes from ``hf_flag.geometry`` (MATH.md §2-§5);
this module only builds networks, trains them deterministically and records what the probes return.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from hf_flag.geometry.flags import flag_relative_position, identity_agreement

__all__ = [
    "ACTIVATIONS",
    "FLAG_GAP_RATIO",
    "FLAG_TAU",
    "flag_identity_fraction",
    "ClaimResult",
    "SEEDS",
    "Trace",
    "deterministic",
    "fmt",
    "linear_layers",
    "make_mlp",
    "make_optimizer",
    "markdown_table",
    "mlp_pairs",
    "teacher_regression",
    "train",
    "MLPRun",
    "least_squares_slope",
    "train_teacher_mlp",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"linear": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}
VERDICTS = ("supported", "not supported", "out of scope here")
FLAG_TAU = 0.05  # radians: an angle below this counts as a shared direction (trained nets are never exactly aligned)
FLAG_GAP_RATIO = 1.05  # cut a flag where sigma_i >= 1.05 sigma_{i+1} (MATH.md §4: only at significant gaps)
SEEDS = (0, 1, 2)  # every verdict is judged over these seeds (data order and initialisation), with their spread


@dataclass
class ClaimResult:
    """What one claim module hands to the report writer: a verdict with its numbers, markdown, figures, data."""

    key: str
    title: str
    verdict: str
    evidence: str  # one line: the numbers behind the verdict
    markdown: str  # body of the section (tables, method notes), without the heading
    figures: dict[str, Any] = field(default_factory=dict)  # file stem -> matplotlib Figure
    data: dict[str, Any] = field(default_factory=dict)  # JSON-able numbers behind the tables
    rules: list[dict] = field(default_factory=list)  # every rule version's outcome (rules.judge), current last

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"ClaimResult {self.key!r}: verdict {self.verdict!r} must be one of {VERDICTS}")


@dataclass
class Trace:
    """Metrics recorded during training: ``values[name][i]`` was measured after ``steps[i]`` optimizer steps."""

    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def record(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append(step)
        for name, value in metrics.items():
            self.values.setdefault(name, []).append(float(value))

    def first(self, name: str) -> float:
        return self.values[name][0]

    def last(self, name: str) -> float:
        return self.values[name][-1]


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[torch.Generator]:
    """Seed torch, force deterministic kernels and a fixed thread count; restore the previous settings on exit."""
    if threads < 1:
        raise ValueError(f"deterministic: threads={threads} must be >= 1")
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        yield torch.Generator().manual_seed(seed)
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def make_mlp(
    widths: Sequence[int], activation: str, *, bias: bool = True, dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
) -> nn.Sequential:
    """``nn.Sequential`` of ``len(widths) - 1`` ``nn.Linear`` layers with ``activation`` between them."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"make_mlp: activation {activation!r} unknown; use one of {sorted(ACTIVATIONS)}")
    if len(widths) < 3:
        raise ValueError(f"make_mlp: widths {list(widths)} must name at least 3 sizes (two layers, one pair)")
    mods: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(n_in, n_out, bias=bias, dtype=dtype, device=device))
        if i < len(widths) - 2:
            mods.append(ACTIVATIONS[activation]())
    return nn.Sequential(*mods)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def mlp_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """Adjacent ``(W_l, W_next, bias_l)`` of an MLP chain, detached (MATH.md §2: the bias of layer l augments W_l)."""
    layers = linear_layers(model)
    return [
        (a.weight.detach(), b.weight.detach(), None if a.bias is None else a.bias.detach())
        for a, b in zip(layers[:-1], layers[1:])
    ]


def teacher_regression(
    n: int, d_in: int, d_out: int, *, generator: torch.Generator, hidden: int = 64, dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs ``x`` and targets ``y = 2 tanh(2 x T1 / sqrt(d_in)) T2 / sqrt(hidden)`` of a random tanh teacher.

    A nonlinear teacher, so that ReLU/GELU students use their nonlinearity and a linear student cannot fit exactly.
    """
    x = torch.randn(n, d_in, generator=generator, dtype=dtype)
    t1 = torch.randn(d_in, hidden, generator=generator, dtype=dtype) / math.sqrt(d_in)
    t2 = torch.randn(hidden, d_out, generator=generator, dtype=dtype) / math.sqrt(hidden)
    y = 2.0 * torch.tanh(2.0 * x @ t1) @ t2
    return x.to(device), y.to(device)


def make_optimizer(
    name: str, params: Any, *, lr: float, weight_decay: float, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """Plain SGD (``weight_decay`` = L2 through the gradient, MATH.md §2) or AdamW (decoupled decay)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"make_optimizer: optimizer {name!r} unknown; use 'sgd' or 'adamw'")


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    steps: int,
    record_every: int,
    probe: Callable[[nn.Module, int], dict[str, float]],
) -> Trace:
    """Run ``steps`` optimizer steps on ``batch(step)``; call ``probe(model, step)`` at step 0 and every
    ``record_every`` steps (and at the end). Raises ``FloatingPointError`` if the loss stops being finite."""
    if steps < 1 or record_every < 1:
        raise ValueError(f"train: steps={steps} and record_every={record_every} must be >= 1")
    trace = Trace()
    model.train()
    with torch.no_grad():
        trace.record(0, probe(model, 0))
    for step in range(1, steps + 1):
        x, y = batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train: loss became {loss.item()} at step {step}; lower the learning rate")
        loss.backward()
        optimizer.step()
        if step % record_every == 0 or step == steps:
            with torch.no_grad():
                trace.record(step, probe(model, step))
    return trace


def fmt(x: Optional[float], digits: int = 3) -> str:
    """Compact number for tables: 3 significant digits, scientific when tiny or huge, 'n/a' for None/NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    x = float(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats and None go through :func:`fmt`."""
    cell = lambda v: fmt(v) if isinstance(v, float) or v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class MLPRun:
    """One MLP on the tanh-teacher regression task (:func:`teacher_regression`)."""

    activation: str
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 0.01
    steps: int = 2000
    record_every: int = 50
    widths: tuple[int, ...] = (16, 32, 32, 8)
    n_samples: int = 512
    batch_size: Optional[int] = None  # None: full batch, i.e. plain GD (the exact law of MATH.md §2)
    seed: int = 0


def train_teacher_mlp(
    run: MLPRun, probe: Callable[[nn.Module, int], dict[str, float]], *, threads: int = 1,
    device: Optional[torch.device] = None,
) -> Trace:
    """Train ``run`` deterministically (float64) and return the probe's trace plus the full-data ``"loss"``.

    The seed fixes data and initialisation, so runs that differ only in activation, optimizer or weight decay start
    from the same weights.
    """
    with deterministic(run.seed, threads) as gen:
        x, y = teacher_regression(run.n_samples, run.widths[0], run.widths[-1], generator=gen, device=device)
        model = make_mlp(run.widths, run.activation, device=device)
        opt = make_optimizer(run.optimizer, model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
        mse = nn.functional.mse_loss

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            if run.batch_size is None:
                return x, y
            idx = torch.randint(0, run.n_samples, (run.batch_size,), generator=gen).to(x.device)
            return x[idx], y[idx]

        def full_probe(m: nn.Module, step: int) -> dict[str, float]:
            return {**probe(m, step), "loss": float(mse(m(x), y))}

        return train(model, opt, batch, mse, steps=run.steps, record_every=run.record_every, probe=full_probe)


def least_squares_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Slope of the least-squares line through the origin, ``sum(x y) / sum(x^2)``."""
    sxx = math.fsum(a * a for a in x)
    if sxx == 0:
        raise ValueError("least_squares_slope: all x are zero; pass at least one nonzero predicted value")
    return math.fsum(a * b for a, b in zip(x, y)) / sxx


def flag_identity_fraction(W_l: torch.Tensor, W_next: torch.Tensor) -> tuple[float, float, bool]:
    """Fraction of the non-trivial rank-matrix entries equal to ``min(i, j)`` (the identity permutation), its soft
    analogue (mean ``soft_ij / min(i, j)``) and whether the block matrix is a (partial) permutation (MATH.md §4).

    The fractions are NaN (shown as "n/a" in tables) when neither flag has a significant cut below n, i.e. there is
    no non-trivial entry to compare; uses tau = ``FLAG_TAU`` and gap ratio ``FLAG_GAP_RATIO``."""
    pos = flag_relative_position(W_l, W_next, tau=FLAG_TAU, storage_eps=torch.finfo(W_l.dtype).eps,
                                 gap_ratio=FLAG_GAP_RATIO)
    return (*identity_agreement(pos), pos.is_permutation)
