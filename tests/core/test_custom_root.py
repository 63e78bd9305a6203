"""``custom_root``: first and second derivatives, damping, data arguments and ``vmap``.

Every truth is computed without hypergrad: ``torch.func`` on a closed-form solution (ridge), or
on Newton's method unrolled to convergence (logistic regression, whose Hessian depends on the
inner point, so the third-derivative term of the implicit linear solve matters).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_helpers import F64, Ridge, generator, rel_err

import hypergrad as hg

TIGHT = hg.CG(maxiter=100, tol=1e-13)


def _ridge_fit(ridge: Ridge, **options):
    @hg.custom_root(ridge.lower, solver=TIGHT, **options)
    def fit(outer):
        return {"w": ridge.w_star(outer["log_lam"])}

    return fit


def _ridge_closed_form_objective(ridge: Ridge):
    def F_of(log_lam):
        return ridge.upper({"w": ridge.w_star(log_lam)}, {"log_lam": log_lam})

    return F_of


@pytest.mark.parametrize("c", [0.1, 0.0], ids=["direct-term", "no-direct-term"])
@pytest.mark.parametrize("method", ["reverse", "forward", "finite_difference"])
def test_second_derivative_matches_closed_form(c, method):
    """d2/dl2 of F(w*(l)) + c l^2 through create_graph=True and a second grad."""
    ridge = Ridge(c=c)
    truth = torch.func.hessian(_ridge_closed_form_objective(ridge))(ridge.log_lam)
    log_lam = ridge.log_lam.clone().requires_grad_(True)
    outer = {"log_lam": log_lam}
    first, = torch.autograd.grad(ridge.upper(_ridge_fit(ridge, hvp_method=method)(outer), outer), log_lam,
                                 create_graph=True)
    second, = torch.autograd.grad(first, log_lam)
    assert abs(float(first.detach()) - float(ridge.hypergrad())) <= 1e-8 * abs(float(ridge.hypergrad()))
    assert abs(float(second) - float(truth)) <= 1e-6 * abs(float(truth))
    # Control: the direct term alone (what a detached backward returned) is far from the truth.
    assert abs(2 * c - float(truth)) > 1e-3


def _per_feature_ridge(seed: int = 3, n: int = 24, d: int = 4):
    g = generator(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = X @ torch.randn(d, generator=g, dtype=F64) + 0.3 * torch.randn(n, generator=g, dtype=F64)
    Xv = torch.randn(n, d, generator=g, dtype=F64)
    yv = torch.randn(n, generator=g, dtype=F64)
    log_lam = torch.tensor([-0.5, 0.3, -1.2, 0.1], dtype=F64)
    return X, y, Xv, yv, log_lam


def ridge_with_intercept(X, y, Xv, yv):
    """Ridge with an unregularised intercept and per-feature penalties ``exp(log_lam)``."""

    def lower(i, o):
        r = X @ i["w"] + i["b"] - y
        return 0.5 * (r**2).mean() + 0.5 * (torch.exp(o["log_lam"]) * i["w"] ** 2).sum()

    def upper(i, o):
        return 0.5 * ((Xv @ i["w"] + i["b"] - yv) ** 2).mean()

    return lower, upper


def ridge_with_intercept_solution(X, y, log_lam):
    Z = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    reg = torch.diag(torch.cat([torch.exp(log_lam), torch.zeros(1, dtype=X.dtype)]))
    theta = torch.linalg.solve(Z.T @ Z / X.shape[0] + reg, Z.T @ y / X.shape[0])
    return {"w": theta[:-1], "b": theta[-1]}


def test_upper_hessian_vector_product_per_feature_weights():
    """HVP of F(w*(o), b*(o)) + 0.1 ||o||^2 w.r.t. four per-feature L2 weights."""
    X, y, Xv, yv, log_lam = _per_feature_ridge()
    lower, upper_fit = ridge_with_intercept(X, y, Xv, yv)

    def upper(i, o):
        return upper_fit(i, o) + 0.1 * (o["log_lam"] ** 2).sum()

    def closed(o_vec):
        return upper(ridge_with_intercept_solution(X, y, o_vec), {"log_lam": o_vec})

    v = torch.randn(4, generator=generator(4), dtype=F64)
    truth = torch.func.jvp(torch.func.grad(closed), (log_lam,), (v,))[1]

    @hg.custom_root(lower, solver=TIGHT)
    def fit(outer):
        return ridge_with_intercept_solution(X, y, outer["log_lam"])

    o = log_lam.clone().requires_grad_(True)
    g, = torch.autograd.grad(upper(fit({"log_lam": o}), {"log_lam": o}), o, create_graph=True)
    hv, = torch.autograd.grad(g, o, v)
    assert rel_err(g.detach(), torch.func.grad(closed)(log_lam)) <= 1e-8
    assert rel_err(hv, truth) <= 1e-6
    assert rel_err(0.2 * v, truth) > 1e-2  # the direct term alone is wrong


class _Logistic:
    """Per-feature L2 logistic regression: its Hessian depends on w, so d(H u)/dw matters."""

    def __init__(self, seed: int = 5, n: int = 40, d: int = 3) -> None:
        g = generator(seed)
        w0 = torch.randn(d, generator=g, dtype=F64)
        self.X = torch.randn(n, d, generator=g, dtype=F64)
        self.y = torch.bernoulli(torch.sigmoid(self.X @ w0), generator=g)
        self.Xv = torch.randn(n, d, generator=g, dtype=F64)
        self.yv = torch.bernoulli(torch.sigmoid(self.Xv @ w0), generator=g)
        self.log_w = torch.tensor([-1.0, 0.5, -0.2], dtype=F64)

    def lower(self, i, o):
        z = self.X @ i["w"]
        return (F.softplus(z) - self.y * z).mean() + 0.5 * (torch.exp(o["log_w"]) * i["w"] ** 2).sum()

    def upper(self, i, o):
        z = self.Xv @ i["w"]
        return (F.softplus(z) - self.yv * z).mean() + 0.05 * (o["log_w"] ** 2).sum()

    def newton(self, log_w, steps: int = 30):
        """Newton's method with a fixed number of steps (differentiable by torch.func)."""
        w = torch.zeros(self.X.shape[1], dtype=F64)
        for _ in range(steps):
            s = torch.sigmoid(self.X @ w)
            grad = self.X.T @ (s - self.y) / len(self.y) + torch.exp(log_w) * w
            H = self.X.T @ (self.X * (s * (1 - s))[:, None]) / len(self.y) + torch.diag(torch.exp(log_w))
            w = w - torch.linalg.solve(H, grad)
        return w


def test_logistic_hessian_vector_product_matches_unrolled_newton():
    prob = _Logistic()

    def truth_objective(log_w):
        return prob.upper({"w": prob.newton(log_w)}, {"log_w": log_w})

    v = torch.randn(3, generator=generator(6), dtype=F64)
    truth = torch.func.jvp(torch.func.grad(truth_objective), (prob.log_w,), (v,))[1]

    @hg.custom_root(prob.lower, solver=TIGHT)
    def fit(outer):
        return {"w": prob.newton(outer["log_w"])}

    o = prob.log_w.clone().requires_grad_(True)
    g, = torch.autograd.grad(prob.upper(fit({"log_w": o}), {"log_w": o}), o, create_graph=True)
    hv, = torch.autograd.grad(g, o, v)
    assert rel_err(g.detach(), torch.func.grad(truth_objective)(prob.log_w)) <= 1e-8
    assert rel_err(hv, truth) <= 1e-6


def test_damping_uses_the_shifted_hessian():
    r"""dF/dl = 2 c l - lambda w*^T (A + delta I)^{-1} g with A = X^T X / n + lambda I."""
    ridge, delta = Ridge(), 0.7
    lam, w = torch.exp(ridge.log_lam), ridge.w_star()
    g = ridge.Xv.T @ (ridge.Xv @ w - ridge.yv) / ridge.m
    shifted = ridge.matrix() + delta * torch.eye(ridge.d, dtype=F64)
    truth = 2 * ridge.c * ridge.log_lam - lam * (w @ torch.linalg.solve(shifted, g))
    log_lam = ridge.log_lam.clone().requires_grad_(True)
    outer = {"log_lam": log_lam}
    ridge.upper(_ridge_fit(ridge, damping=delta)(outer), outer).backward()
    assert abs(float(log_lam.grad) - float(truth)) <= 1e-10 * abs(float(truth))
    assert abs(float(ridge.hypergrad()) - float(truth)) > 1e-3  # damping changes the answer


def test_tensor_arguments_reach_lower_loss_and_get_gradients():
    """``lower_loss(inner, outer, X, y)`` receives the call's data; d upper / d y is implicit too."""
    ridge = Ridge()

    def lower(i, o, X, y):
        return 0.5 * ((X @ i["w"] - y) ** 2).mean() + 0.5 * torch.exp(o["log_lam"]) * (i["w"] ** 2).sum()

    def closed(log_lam, X, y):
        return torch.linalg.solve(X.T @ X / X.shape[0] + torch.exp(log_lam) * torch.eye(X.shape[1], dtype=F64),
                                  X.T @ y / X.shape[0])

    @hg.custom_root(lower, solver=TIGHT)
    def fit(outer, X, y):
        return {"w": closed(outer["log_lam"], X, y)}

    def truth(log_lam, y):
        return ridge.upper({"w": closed(log_lam, ridge.X, y)}, {"log_lam": log_lam})

    log_lam = ridge.log_lam.clone().requires_grad_(True)
    y = ridge.y.clone().requires_grad_(True)
    outer = {"log_lam": log_lam}
    ridge.upper(fit(outer, ridge.X, y), outer).backward()
    want_l, want_y = torch.func.grad(truth, argnums=(0, 1))(ridge.log_lam, ridge.y)
    assert abs(float(log_lam.grad) - float(want_l)) <= 1e-8 * abs(float(want_l))
    assert rel_err(y.grad, want_y) <= 1e-8


def test_vmap_over_independent_ridge_problems_equals_a_loop():
    """``vmap(grad(...))`` over three ridge problems through custom_root, fixed-iteration CG."""
    g = generator(8)
    k, n, d = 3, 20, 4
    X, y = torch.randn(k, n, d, generator=g, dtype=F64), torch.randn(k, n, generator=g, dtype=F64)
    Xv, yv = torch.randn(k, n, d, generator=g, dtype=F64), torch.randn(k, n, generator=g, dtype=F64)
    log_lam = torch.tensor([-0.3, 0.1, 0.5], dtype=F64)

    def lower(i, o, X, y):
        return 0.5 * ((X @ i["w"] - y) ** 2).mean() + 0.5 * torch.exp(o["s"]) * (i["w"] ** 2).sum()

    def closed(s, X, y):
        return torch.linalg.solve(X.T @ X / X.shape[0] + torch.exp(s) * torch.eye(X.shape[1], dtype=F64),
                                  X.T @ y / X.shape[0])

    @hg.custom_root(lower, solver=hg.CG(maxiter=2 * d, tol=0.0))
    def fit(outer, X, y):
        return {"w": closed(outer["s"], X, y)}

    def objective(s, X, y, Xv, yv):
        return 0.5 * ((Xv @ fit({"s": s}, X, y)["w"] - yv) ** 2).mean() + 0.1 * s**2

    def truth(s, X, y, Xv, yv):
        return 0.5 * ((Xv @ closed(s, X, y) - yv) ** 2).mean() + 0.1 * s**2

    batched = torch.func.vmap(torch.func.grad(objective))(log_lam, X, y, Xv, yv)
    loop = torch.stack([torch.func.grad(objective)(log_lam[j], X[j], y[j], Xv[j], yv[j]) for j in range(k)])
    expected = torch.stack([torch.func.grad(truth)(log_lam[j], X[j], y[j], Xv[j], yv[j]) for j in range(k)])
    assert torch.allclose(batched, loop, rtol=1e-12, atol=1e-15)
    assert rel_err(batched, expected) <= 1e-10
    values = torch.func.vmap(objective)(log_lam, X, y, Xv, yv)
    assert torch.allclose(values, torch.stack([truth(log_lam[j], X[j], y[j], Xv[j], yv[j]) for j in range(k)]))


def test_on_solve_sees_each_solve():
    ridge = Ridge()
    seen = []
    log_lam = ridge.log_lam.clone().requires_grad_(True)
    outer = {"log_lam": log_lam}
    first, = torch.autograd.grad(ridge.upper(_ridge_fit(ridge, on_solve=seen.append)(outer), outer), log_lam,
                                 create_graph=True)
    assert len(seen) == 1
    torch.autograd.grad(first, log_lam)
    # One solve for the implicit derivative of the first solve, one for d i*/d o met again.
    assert len(seen) == 3
    assert all(s.result is hg.Result.CONVERGED for s in seen)


@pytest.mark.parametrize("bad", [{"damping": -1.0}, {"hvp_method": "exact"}])
def test_rejects_bad_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        hg.custom_root(lambda i, o: (i["w"] ** 2).sum(), **bad)


def test_third_derivative_and_torch_func_second_derivative():
    """The implicit solve is differentiated by another implicit solve, so higher orders hold too;
    ``torch.func.jacrev(jacrev(...))`` goes through the same rules."""
    ridge = Ridge()
    F_of = _ridge_closed_form_objective(ridge)
    fit = _ridge_fit(ridge)

    def through_root(log_lam):
        outer = {"log_lam": log_lam}
        return ridge.upper(fit(outer), outer)

    log_lam = ridge.log_lam.clone().requires_grad_(True)
    d1, = torch.autograd.grad(through_root(log_lam), log_lam, create_graph=True)
    d2, = torch.autograd.grad(d1, log_lam, create_graph=True)
    d3, = torch.autograd.grad(d2, log_lam)
    truth3 = torch.func.jacrev(torch.func.jacrev(torch.func.jacrev(F_of)))(ridge.log_lam)
    assert abs(float(d3) - float(truth3)) <= 1e-6 * abs(float(truth3))
    # jacrev vmaps the backward: a fixed-iteration solve (6 unknowns, 12 iterations).
    fixed = hg.custom_root(ridge.lower, solver=hg.CG(maxiter=12, tol=0.0))(lambda o: {"w": ridge.w_star(o["log_lam"])})

    def through_fixed(log_lam):
        outer = {"log_lam": log_lam}
        return ridge.upper(fixed(outer), outer)

    truth2 = torch.func.hessian(F_of)(ridge.log_lam)
    func2 = torch.func.jacrev(torch.func.jacrev(through_fixed))(ridge.log_lam)
    assert abs(float(func2) - float(truth2)) <= 1e-6 * abs(float(truth2))
