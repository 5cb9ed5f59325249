"""Decay-rate law (MATH.md §2): fits against closed forms and a deep linear net trained with torch SGD."""
import math

import pytest
import torch

from hf_flag.geometry.dynamics import (GATED_LINEAR, NO_LAW, fit_decay_rate, imbalance_law_scope,
                                       momentum_decay_factor, optimizer_family, predicted_decay_curve,
                                       predicted_decay_rate)


@pytest.mark.parametrize("rate", [1e-4, 2e-3, 0.37])
def test_fit_recovers_exact_exponential(rate):
    steps = [0, 7, 10, 55, 100, 240]
    values = [3.5 * math.exp(-rate * s) for s in steps]
    fitted, r2 = fit_decay_rate(steps, values)
    assert abs(fitted - rate) <= 1e-12
    assert r2 == pytest.approx(1.0, abs=1e-12)


def test_fit_ignores_non_positive_values_and_growth_is_negative():
    steps = [0, 1, 2, 3, 4, 5]
    values = [math.exp(0.5 * s) for s in steps]
    values[1], values[3] = 0.0, -2.0
    fitted, r2 = fit_decay_rate(steps, values)
    assert fitted == pytest.approx(-0.5, abs=1e-12)
    assert r2 == pytest.approx(1.0, abs=1e-12)


def test_fit_r_squared_matches_numpy_polyfit():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    steps = np.arange(20.0)
    logs = 1.0 - 0.1 * steps + 0.2 * rng.standard_normal(20)
    fitted, r2 = fit_decay_rate(steps.tolist(), np.exp(logs).tolist())
    slope, icpt = np.polyfit(steps, logs, 1)
    resid = logs - (slope * steps + icpt)
    assert fitted == pytest.approx(-slope, rel=1e-10)
    assert r2 == pytest.approx(1 - resid.var() / logs.var(), rel=1e-10)


@pytest.mark.parametrize(
    "steps, values",
    [([0, 1, 2], [1.0, 0.0, -1.0]), ([0, 1], [1.0, 0.5]), ([0, 1, 2], [1.0, 2.0]), ([3, 3, 3], [1.0, 2.0, 3.0])],
)
def test_fit_rejects_too_few_points(steps, values):
    with pytest.raises(ValueError, match="fit_decay_rate"):
        fit_decay_rate(steps, values)


def test_predicted_rates_and_laws():
    lr, wd = 0.01, 0.1
    rate, law = predicted_decay_rate("SGD", lr, wd, full_batch=True)
    assert law.startswith("SGD: (1 - lr wd)^2 per step (full-batch GD: exact")
    assert rate == pytest.approx(-2 * math.log(1 - lr * wd), rel=1e-14)
    assert rate == pytest.approx(2 * lr * wd, rel=1e-3)
    rate_mb, law = predicted_decay_rate("sgd", lr, wd, full_batch=False)
    assert rate_mb == rate and "minibatch SGD" in law and "floor" in law and "exact" not in law
    assert "exact only for full-batch GD" in predicted_decay_rate("SGD", lr, wd)[1]  # batch unknown: both stated
    # momentum: slow root of z^2 - (1 + beta - lr wd) z + beta = 0, ~ 2 lr wd / (1 - beta) (MATH.md §2)
    rate, law = predicted_decay_rate("sgd", lr, wd, momentum=0.9)
    b = 1 + 0.9 - lr * wd
    assert rate == pytest.approx(-2 * math.log((b + math.sqrt(b * b - 3.6)) / 2), rel=1e-12)
    assert rate > 2 * lr * wd / 0.1 and law.startswith("SGD momentum")  # second order adds 12 % here
    small = predicted_decay_rate("sgd", 1e-4, 1e-2, momentum=0.9, dampening=0.5)[0]
    assert small == pytest.approx(2 * 1e-4 * 1e-2 * 0.5 / 0.1, rel=1e-4)
    assert predicted_decay_rate("sgd", 1e-4, 1e-2, momentum=0.9, nesterov=True)[0] == pytest.approx(
        2 * 1e-4 * 1e-2 / 0.1, rel=1e-4)
    for name in ("adamw_torch", "AdamW", "Adam", "adafactor"):
        rate, law = predicted_decay_rate(name, lr, wd)
        assert rate is None and law.startswith(NO_LAW), name
    assert "adafactor" in predicted_decay_rate("adafactor", lr, wd)[1]
    assert predicted_decay_rate("SGD", lr, 0.0)[0] == 0.0
    names = ("AdamW", "adamw_torch_fused", "paged_adamw_32bit", "SGD", "adam", "lion")
    assert [optimizer_family(n) for n in names] == ["adamw", "adamw", "adamw", "sgd", "adam", None]
    with pytest.raises(ValueError, match="optimizer=None"):
        predicted_decay_rate(None, lr, wd)


def test_momentum_factor_complex_roots_and_law_scope():
    # complex roots (lr wd large against (1 - sqrt beta)^2): |z| = sqrt(beta)
    assert momentum_decay_factor(0.5, 0.9) == pytest.approx(math.sqrt(0.9), rel=1e-15)
    assert imbalance_law_scope("identity") == "full"
    assert [imbalance_law_scope(a) for a in ("relu", "leaky_relu", GATED_LINEAR)] == ["diagonal"] * 3
    assert [imbalance_law_scope(a) for a in ("gelu", "silu", "tanh", "unknown", None)] == [None] * 5
    assert predicted_decay_curve(2.0, [10, 20, 40], 0.1) == pytest.approx([2.0, 2 * math.exp(-1), 2 * math.exp(-3)])


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0, weight_decay=0.1), dict(lr=0.1, weight_decay=float("nan")),
                                    dict(lr=0.1, weight_decay=0.1, momentum=1.0), dict(lr=2.0, weight_decay=0.6)])
def test_predicted_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="predicted_decay_rate"):
        predicted_decay_rate("SGD", **kwargs)


def _imbalance_norm(layers):
    """sqrt(sum_l ||W_{l+1}^T W_{l+1} - [W_l|b_l][W_l|b_l]^T||_F^2), formed directly (MATH.md §2)."""
    total = 0.0
    for a, b in zip(layers[:-1], layers[1:]):
        w = a.weight.detach()
        if a.bias is not None:
            w = torch.cat([w, a.bias.detach()[:, None]], dim=1)
        total += float((b.weight.detach().T @ b.weight.detach() - w @ w.T).norm() ** 2)
    return math.sqrt(total)


@pytest.mark.parametrize("bias", [False, True])
def test_deep_linear_net_imbalance_decays_at_predicted_rate(bias):
    torch.manual_seed(0)
    X, Y = torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    layers = [torch.nn.Linear(8, 16, bias=bias), torch.nn.Linear(16, 16, bias=bias), torch.nn.Linear(16, 4, bias=bias)]
    net = torch.nn.Sequential(*layers).double()
    lr, wd = 0.05, 0.1
    opt = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=wd)
    steps, values = [], []
    for step in range(300):
        if step % 10 == 0:
            steps.append(step)
            values.append(_imbalance_norm(layers))
        opt.zero_grad()
        ((net(X) - Y) ** 2).mean().backward()
        opt.step()
    fitted, r2 = fit_decay_rate(steps, values)
    predicted, law = predicted_decay_rate("SGD", lr, wd, full_batch=True)
    assert "full-batch GD: exact" in law
    assert fitted == pytest.approx(predicted, rel=0.01)
    assert r2 > 0.9999
