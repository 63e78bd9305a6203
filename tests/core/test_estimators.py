"""Unrolled (ITD) and fully first-order (F2SA, V-PBGD) estimators against independent truths.

Truths: a quadratic bilevel problem whose hypergradient, penalised solution and penalty gradient
have closed forms (dense float64 ``torch.linalg.solve``); a hand-unrolled loop written with
``torch.func.grad`` (no ``autograd.grad``, no hypergrad); float64 central finite differences;
loss calls counted by wrappers. Rates are checked by fitting slopes, never by timing.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The quadratic bilevel problem
#   L(y, x) = 1/2 y'Hy - y'(Bx + b),   F(y, x) = 1/2 ||y - c||^2 + y'Ex + 1/2 ||x||^2
#   y*(x) = H^-1 (Bx + b),  grad Phi = E'y* + x + B'H^-1 (y* - c + Ex)


@dataclass
class Quadratic:
    H: Tensor
    B: Tensor
    b: Tensor
    c: Tensor
    E: Tensor
    x: Tensor
    mu: float  # smallest eigenvalue of H
    ell: float  # largest

    def lower(self, i: hg.Tree, o: hg.Tree) -> Tensor:
        y, x = i["y"], o["x"]
        return 0.5 * y @ self.H @ y - y @ (self.B @ x + self.b)

    def upper(self, i: hg.Tree, o: hg.Tree) -> Tensor:
        y, x = i["y"], o["x"]
        return 0.5 * ((y - self.c) ** 2).sum() + y @ self.E @ x + 0.5 * (x**2).sum()

    def y_star(self) -> Tensor:
        return torch.linalg.solve(self.H, self.B @ self.x + self.b)

    def hypergradient(self) -> Tensor:
        ys = self.y_star()
        return self.E.T @ ys + self.x + self.B.T @ torch.linalg.solve(self.H, ys - self.c + self.E @ self.x)

    def y_penalised(self, lam: float) -> Tensor:
        """argmin_y L + F/lam: (H + I/lam) y = Bx + b + (c - Ex)/lam."""
        n = self.H.shape[0]
        rhs = self.B @ self.x + self.b + (self.c - self.E @ self.x) / lam
        return torch.linalg.solve(self.H + torch.eye(n, dtype=F64) / lam, rhs)

    def penalty_gradient(self, lam: float) -> Tensor:
        """grad_x [F + lam (L(y_lam) - L(y*))] by the envelope theorem; grad_x L(y, x) = -B'y."""
        y_lam = self.y_penalised(lam)
        return self.E.T @ y_lam + self.x - lam * self.B.T @ (y_lam - self.y_star())

    def lower_gap(self, y: Tensor) -> float:
        d = y - self.y_star()
        return float(0.5 * d @ self.H @ d)

    def start(self) -> dict[str, Tensor]:
        return {"y": torch.zeros(self.H.shape[0], dtype=F64)}

    def outer(self) -> dict[str, Tensor]:
        return {"x": self.x.clone()}


def quadratic(seed: int, n: int = 12, m: int = 4, mu: float = 0.1, bulk: tuple[float, float] = (1.0, 2.0)) -> Quadratic:
    """H with one isolated small eigenvalue mu and the rest in ``bulk``: GD's slowest mode is 1 - eta mu."""
    g = gen(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    q = q * torch.sign(torch.diagonal(r))
    eig = torch.cat([torch.tensor([mu], dtype=F64), torch.linspace(*bulk, n - 1, dtype=F64)])
    H = q @ torch.diag(eig) @ q.T
    H = (H + H.T) / 2
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return Quadratic(H, rnd(n, m), rnd(n), rnd(n), rnd(n, m), rnd(m), mu, bulk[1])


def fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    x = torch.tensor(xs, dtype=F64)
    y = torch.tensor(ys, dtype=F64)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def err(g: dict[str, Tensor], truth: Tensor) -> float:
    return float((g["x"] - truth).norm())


# ---------------------------------------------------------------------------------------------
# ITD


@pytest.mark.parametrize("seed", [0, 1])
def test_itd_error_decays_like_the_slowest_contraction(seed):
    p = quadratic(seed)
    eta = 1.0 / p.ell
    truth = p.hypergradient()
    ks = list(range(20, 151, 10))
    errors = [err(hg.unrolled_grad(p.lower, p.upper, p.start(), p.outer(), steps=k, step_size=eta)[0], truth)
              for k in ks]
    slope = fit_slope(ks, [math.log(e) for e in errors])
    expected = math.log(1 - eta * p.mu)
    assert abs(slope - expected) < 0.03 * abs(expected), (slope, expected)
    assert errors[-1] < 1e-2 * errors[0]


def test_truncated_itd_error_decays_in_the_kept_steps():
    # From a converged prefix, keeping T steps gives grad_x F + B'H^-1 (I - A^T) grad_y F: error ~ (1 - eta mu)^T.
    p = quadratic(2)
    eta = 1.0 / p.ell
    truth = p.hypergradient()
    ts = list(range(20, 151, 10))
    errors = []
    for t in ts:
        g, stats = hg.unrolled_grad(p.lower, p.upper, p.start(), p.outer(), steps=700, step_size=eta, truncate=t)
        assert stats.method == "itd-truncated" and stats.hvp == t and stats.grad_evals == 701
        errors.append(err(g, truth))
    slope = fit_slope(ts, [math.log(e) for e in errors])
    expected = math.log(1 - eta * p.mu)
    assert abs(slope - expected) < 0.03 * abs(expected), (slope, expected)


def _logistic_problem(seed: int = 3):
    """A non-quadratic lower loss whose Hessian depends on the outer variables (per-feature decay)."""
    g = gen(seed)
    X, Xv = torch.randn(30, 4, generator=g, dtype=F64), torch.randn(20, 4, generator=g, dtype=F64)
    t, tv = torch.sign(torch.randn(30, generator=g, dtype=F64)), torch.sign(torch.randn(20, generator=g, dtype=F64))
    x = 0.3 * torch.randn(4, generator=g, dtype=F64)
    w0 = 0.1 * torch.randn(4, generator=g, dtype=F64)

    def lower_flat(w: Tensor, x: Tensor) -> Tensor:
        return F.softplus(-t * (X @ w)).mean() + 0.5 * (x.exp() * w**2).sum()

    def upper_flat(w: Tensor, x: Tensor) -> Tensor:
        return F.softplus(-tv * (Xv @ w)).mean() + 0.01 * (x**2).sum()

    return lower_flat, upper_flat, x, w0


@pytest.mark.parametrize("truncate", [None, 7])
def test_itd_equals_a_hand_unrolled_loop(truncate):
    lower_flat, upper_flat, x, w0 = _logistic_problem()
    k, eta = 25, 0.5
    kept = k if truncate is None else truncate
    # Hand loop: the untracked prefix in plain tensors, the kept steps under torch.func.grad.
    w = w0.clone()
    for _ in range(k - kept):
        w = w - eta * torch.func.grad(lower_flat)(w, x)
    w_start = w

    def unrolled(xv: Tensor) -> Tensor:
        v = w_start
        for _ in range(kept):
            v = v - eta * torch.func.grad(lower_flat)(v, xv)
        return upper_flat(v, xv)

    expected = torch.func.grad(unrolled)(x)
    got, stats = hg.unrolled_grad(lambda i, o: lower_flat(i["w"], o["x"]), lambda i, o: upper_flat(i["w"], o["x"]),
                                  {"w": w0}, {"x": x}, steps=k, step_size=eta, truncate=truncate)
    assert torch.allclose(got["x"], expected, rtol=1e-12, atol=1e-14)
    assert stats.hvp == kept and stats.inner_steps == k


def test_full_itd_matches_central_differences_of_the_unrolled_map():
    lower_flat, upper_flat, x, w0 = _logistic_problem(4)
    k, eta = 15, 0.5

    def value(xv: Tensor) -> float:
        w = w0.clone()
        for _ in range(k):
            w = w - eta * torch.func.grad(lower_flat)(w, xv)
        return float(upper_flat(w, xv))

    h = 1e-5
    fd = torch.tensor([(value(x + h * e) - value(x - h * e)) / (2 * h) for e in torch.eye(4, dtype=F64)], dtype=F64)
    got, _ = hg.unrolled_grad(lambda i, o: lower_flat(i["w"], o["x"]), lambda i, o: upper_flat(i["w"], o["x"]),
                              {"w": w0}, {"x": x}, steps=k, step_size=eta)
    assert torch.allclose(got["x"], fd, rtol=1e-7, atol=1e-9)


def test_itd_warm_start_continues_the_trajectory():
    p = quadratic(5)
    _, first = hg.unrolled_grad(p.lower, p.upper, p.start(), p.outer(), steps=10, step_size=0.5)
    _, second = hg.unrolled_grad(p.lower, p.upper, first.inner, p.outer(), steps=10, step_size=0.5)
    _, whole = hg.unrolled_grad(p.lower, p.upper, p.start(), p.outer(), steps=20, step_size=0.5)
    assert torch.allclose(second.inner["y"], whole.inner["y"], rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# F2SA


LAMS = [30.0, 100.0, 300.0, 1000.0, 3000.0]


def test_f2sa_equals_the_closed_form_penalty_gradient():
    p = quadratic(6, mu=0.5)
    for lam in (10.0, 1000.0):
        g, stats = hg.f2sa_grad(p.lower, p.upper, p.start(), p.outer(), lam=lam, steps=300, step_size=0.5,
                                tol=1e-10)
        assert stats.inner_converged
        assert torch.allclose(g["x"], p.penalty_gradient(lam), rtol=1e-9, atol=1e-11)
        assert torch.allclose(stats.inner["y"], p.y_penalised(lam), rtol=0, atol=1e-12)
        assert torch.allclose(stats.lower_inner["y"], p.y_star(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [6, 7])
def test_f2sa_bias_shrinks_like_one_over_lambda(seed):
    p = quadratic(seed, mu=0.5)
    truth = p.hypergradient()
    biases = [err(hg.f2sa_grad(p.lower, p.upper, p.start(), p.outer(), lam=lam, steps=300, step_size=0.5)[0], truth)
              for lam in LAMS]
    slope = fit_slope([math.log(v) for v in LAMS], [math.log(b) for b in biases])
    assert abs(slope + 1) < 0.2, slope
    assert biases[-1] < 0.02 * biases[0]


def test_f2sa_counts_gradient_evaluations_by_loss_calls():
    p = quadratic(8)
    calls = {"lower": 0, "upper": 0}

    def lower(i, o):
        calls["lower"] += 1
        return p.lower(i, o)

    def upper(i, o):
        calls["upper"] += 1
        return p.upper(i, o)

    _, stats = hg.f2sa_grad(lower, upper, p.start(), p.outer(), lam=10.0, steps=7, step_size=0.5, lower_steps=4)
    assert stats.grad_evals == calls["lower"] + calls["upper"] == 4 + 1 + 2 * 7 + 2
    assert stats.hvp == 0 and stats.inner_steps == 11
    calls.update(lower=0, upper=0)
    _, stats = hg.unrolled_grad(lower, upper, p.start(), p.outer(), steps=9, step_size=0.5, truncate=3)
    assert stats.grad_evals == calls["lower"] + calls["upper"] == 10
    calls.update(lower=0, upper=0)
    _, stats = hg.penalty_grad(lower, upper, p.start(), p.outer(), gamma=10.0, steps=5, step_size=0.5,
                               penalty_steps=3)
    assert stats.grad_evals == calls["lower"] + calls["upper"] == 5 + 1 + 2 * 3


# ---------------------------------------------------------------------------------------------
# V-PBGD


def test_vpbgd_joint_step_by_hand():
    # One call = the x part of grad phi_gamma at (y, x) with z solved, and y's step from the same gradient.
    p = quadratic(9, mu=0.5)
    gamma, beta = 50.0, 0.3
    y = torch.randn(p.H.shape[0], generator=gen(1), dtype=F64)
    g, stats = hg.penalty_grad(p.lower, p.upper, {"y": y}, p.outer(), gamma=gamma, steps=300, step_size=0.5,
                               penalty_step_size=beta)
    ys, x = p.y_star(), p.x
    grad_x = p.E.T @ y + x + gamma * (-p.B.T @ y + p.B.T @ ys)
    grad_y = (p.H @ y - p.B @ x - p.b) + (y - p.c + p.E @ x) / gamma
    assert torch.allclose(g["x"], grad_x, rtol=1e-10, atol=1e-10)
    assert torch.allclose(stats.inner["y"], y - beta * grad_y, rtol=0, atol=1e-12)


def test_vpbgd_gap_and_bias_as_the_paper_states():
    # Shen & Chen: the penalised solution's lower-level gap is O(1/gamma^2) (an eps-gap needs
    # gamma ~ eps^-1/2); the hypergradient bias is O(1/gamma).
    p = quadratic(10, mu=0.5)
    truth = p.hypergradient()
    gaps, biases = [], []
    for gamma in LAMS:
        g, stats = hg.penalty_grad(p.lower, p.upper, p.start(), p.outer(), gamma=gamma, steps=300, step_size=0.5,
                                   penalty_steps=300)
        gaps.append(p.lower_gap(stats.inner["y"]))
        biases.append(err(g, truth))
    logs = [math.log(v) for v in LAMS]
    assert abs(fit_slope(logs, [math.log(v) for v in gaps]) + 2) < 0.2
    assert abs(fit_slope(logs, [math.log(v) for v in biases]) + 1) < 0.2


def test_penalty_schedule():
    s = hg.PenaltySchedule(initial=10.0, power=0.5, maximum=1e3)
    values = [s(k) for k in range(0, 20000, 7)]
    assert values[0] == 10.0 and max(values) == 1e3
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert hg.PenaltySchedule(5.0)(1000) == 5.0


# ---------------------------------------------------------------------------------------------
# Bad settings: typed errors naming the argument, the value and the fix


def _call(name: str, p: Quadratic, **kw):
    base = {"unrolled": dict(steps=3, step_size=0.5), "f2sa": dict(lam=10.0, steps=3, step_size=0.5),
            "penalty": dict(gamma=10.0, steps=3, step_size=0.5)}[name]
    fn = {"unrolled": hg.unrolled_grad, "f2sa": hg.f2sa_grad, "penalty": hg.penalty_grad}[name]
    lower = kw.pop("lower", p.lower)
    return fn(lower, p.upper, kw.pop("inner", p.start()), p.outer(), **{**base, **kw})


@pytest.mark.parametrize("name", ["unrolled", "f2sa", "penalty"])
@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_non_positive_step_size_is_refused(name, bad):
    with pytest.raises(hg.EstimatorSettingError, match=r"step_size must be a finite number > 0, got .*2/L"):
        _call(name, quadratic(0), step_size=bad)
    assert issubclass(hg.EstimatorSettingError, ValueError)


@pytest.mark.parametrize("name,arg", [("f2sa", "lam"), ("penalty", "gamma")])
def test_non_positive_multiplier_is_refused(name, arg):
    with pytest.raises(hg.EstimatorSettingError, match=rf"{arg} must be a finite number > 0, got -1.0"):
        _call(name, quadratic(0), **{arg: -1.0})


def test_decreasing_penalty_schedule_is_refused():
    with pytest.raises(hg.EstimatorSettingError, match=r"power must be .*>= 0, got -0.5.*must not decrease.*power=0"):
        hg.PenaltySchedule(initial=100.0, power=-0.5)
    with pytest.raises(hg.EstimatorSettingError, match=r"maximum must be >= initial = 100.0, got 10.0"):
        hg.PenaltySchedule(initial=100.0, power=1.0, maximum=10.0)
    with pytest.raises(hg.EstimatorSettingError, match=r"initial must be a finite number > 0, got 0.0"):
        hg.PenaltySchedule(initial=0.0)


def test_bad_step_counts_are_refused():
    p = quadratic(0)
    with pytest.raises(hg.EstimatorSettingError, match=r"steps must be an integer >= 1, got 0"):
        _call("unrolled", p, steps=0)
    with pytest.raises(hg.EstimatorSettingError, match=r"truncate must be at most steps = 3, got 5; .*truncate=None"):
        _call("unrolled", p, truncate=5)
    with pytest.raises(hg.EstimatorSettingError, match=r"steps must be an integer >= 0, got 2.5"):
        _call("f2sa", p, steps=2.5)
    with pytest.raises(hg.EstimatorSettingError, match=r"penalty_steps must be an integer >= 1, got 0"):
        _call("penalty", p, penalty_steps=0)


@pytest.mark.parametrize("name", ["unrolled", "f2sa", "penalty"])
def test_lower_loss_that_ignores_the_inner_variables_is_refused(name):
    p = quadratic(0)
    frozen = torch.zeros(p.H.shape[0], dtype=F64)

    def detached(i, o):  # computed from a copy: no graph to `inner`
        return p.lower({"y": frozen}, o)

    with pytest.raises(hg.InnerDependenceError, match=r"lower_loss does not depend on the inner variables \['y'\]"):
        _call(name, p, lower=detached)

    def partial(i, o):
        return p.lower(i, o)

    inner = {**p.start(), "unused": torch.zeros(3, dtype=F64)}
    with pytest.raises(hg.InnerDependenceError, match=r"does not depend on inner\['unused'\].*Remove them"):
        _call(name, p, lower=partial, inner=inner)


@pytest.mark.parametrize("name", ["unrolled", "f2sa", "penalty"])
def test_refused_inside_torch_func_transforms(name):
    p = quadratic(0)

    def estimate(x):
        q = Quadratic(p.H, p.B, p.b, p.c, p.E, x, p.mu, p.ell)
        return _call(name, q)[0]["x"]

    with pytest.raises(hg.TransformError, match="cannot run inside vmap/grad/jvp"):
        torch.func.vmap(estimate)(torch.stack([p.x, p.x]))


def test_cost_counts_products_at_their_price():
    p = quadratic(0)
    _, stats = hg.unrolled_grad(p.lower, p.upper, p.start(), p.outer(), steps=6, step_size=0.5, truncate=4)
    assert stats.cost(hvp_cost=1.5) == 7 + 1.5 * 4


def test_inner_converged_reports_the_tolerance():
    p = quadratic(11, mu=0.5)
    _, few = hg.unrolled_grad(p.lower, p.upper, p.start(), p.outer(), steps=3, step_size=0.5, tol=1e-8)
    _, many = hg.unrolled_grad(p.lower, p.upper, p.start(), p.outer(), steps=200, step_size=0.5, tol=1e-8)
    _, none = hg.unrolled_grad(p.lower, p.upper, p.start(), p.outer(), steps=3, step_size=0.5)
    assert few.inner_converged is False and many.inner_converged is True and none.inner_converged is None
    # F2SA judges both problems: a converged lower problem with an unconverged penalised one is not converged.
    _, half = hg.f2sa_grad(p.lower, p.upper, p.start(), p.outer(), lam=10.0, steps=2, lower_steps=200,
                           step_size=0.5, tol=1e-8)
    assert float(half.stationarity) < 1e-8 and half.inner_converged is False


# ---------------------------------------------------------------------------------------------
# Modules through hypergrad.functional: BatchNorm buffers untouched unless asked


def _net_problem(update_buffers: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().train()
    g = gen(12)
    x_tr, y_tr = torch.randn(32, 4, generator=g, dtype=F64), torch.randint(0, 3, (32,), generator=g)
    x_val, y_val = torch.randn(16, 4, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)
    run = hg.functional(net, update_buffers=update_buffers)

    def lower(i, o):
        decay = sum((t**2).sum() for t in i.values())
        return F.cross_entropy(run(i, x_tr), y_tr) + 0.5 * o["log_decay"].exp() * decay

    def upper(i, o):
        return F.cross_entropy(run(i, x_val), y_val)

    inner = {k: v.detach().clone() for k, v in hg.module_params(net).items()}
    return net, lower, upper, inner, {"log_decay": torch.tensor(-2.0, dtype=F64)}


ESTIMATORS = {
    "itd": lambda lo, up, i, o: hg.unrolled_grad(lo, up, i, o, steps=4, step_size=0.1),
    "itd-truncated": lambda lo, up, i, o: hg.unrolled_grad(lo, up, i, o, steps=4, step_size=0.1, truncate=2),
    "f2sa": lambda lo, up, i, o: hg.f2sa_grad(lo, up, i, o, lam=10.0, steps=4, step_size=0.1),
    "v-pbgd": lambda lo, up, i, o: hg.penalty_grad(lo, up, i, o, gamma=10.0, steps=4, step_size=0.1),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_modules_leave_batchnorm_buffers_alone(name):
    net, lower, upper, inner, outer = _net_problem(update_buffers=False)
    before = {k: b.clone() for k, b in net.named_buffers()}
    params_before = {k: p.detach().clone() for k, p in net.named_parameters()}
    grads, stats = ESTIMATORS[name](lower, upper, inner, outer)
    assert grads["log_decay"].shape == () and torch.isfinite(grads["log_decay"])
    assert stats.method == name
    for k, b in net.named_buffers():
        assert torch.equal(b, before[k]), k
    for k, p in net.named_parameters():  # the estimator moves copies, never the module
        assert torch.equal(p.detach(), params_before[k]), k
    assert not torch.equal(stats.inner["0.weight"], inner["0.weight"])


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_modules_update_buffers_when_asked(name):
    net, lower, upper, inner, outer = _net_problem(update_buffers=True)
    before = net[1].running_mean.clone()
    ESTIMATORS[name](lower, upper, inner, outer)
    assert not torch.equal(net[1].running_mean, before)
