"""Hypergradients against a closed form (ridge HPO) and against central finite differences
with the inner problem re-solved by Newton's method (per-feature L2 logistic regression)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from core_helpers import F64, Ridge, generator, rel_err

import hypergrad
import hypergrad as hg


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


def _ridge_trees(ridge: Ridge):
    return {"w": ridge.w_star()}, {"log_lam": ridge.log_lam.clone()}


def test_closed_form_is_a_true_derivative(ridge):
    """Control of the truth itself: the closed form matches central differences of F(w*(l), l)."""
    def F_of(log_lam):
        return ridge.upper({"w": ridge.w_star(log_lam)}, {"log_lam": log_lam})

    h = 1e-5
    fd = (F_of(ridge.log_lam + h) - F_of(ridge.log_lam - h)) / (2 * h)
    assert float(abs(fd - ridge.hypergrad()) / abs(ridge.hypergrad())) < 1e-8


def test_implicit_grad_cg_exact_call(ridge):
    lower_loss, upper_loss = ridge.lower, ridge.upper
    inner, outer = _ridge_trees(ridge)
    grads, stats = hypergrad.implicit_grad(lower_loss, upper_loss, inner, outer, solver=hypergrad.CG(maxiter=50, tol=1e-10))
    assert set(grads) == {"log_lam"} and grads["log_lam"].shape == ()
    assert rel_err(grads["log_lam"], ridge.hypergrad()) <= 1e-8
    assert stats.result is hypergrad.Result.CONVERGED
    assert float(stats.stationarity) < 1e-12
    assert torch.allclose(stats.upper_loss, upper_loss(inner, outer))
    assert stats.num_hvp == stats.solve.iterations + 1 <= ridge.d + 2  # + the confirming true residual


SOLVERS = {
    "CG": lambda r: hg.CG(maxiter=50, tol=1e-12),
    "MINRES": lambda r: hg.MINRES(maxiter=50, tol=1e-12),
    "Neumann": lambda r: hg.Neumann(alpha=1.0 / r.lambda_max(), maxiter=3000, tol=1e-13),
}


@pytest.mark.parametrize("method", ["reverse", "forward"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_implicit_grad_matches_closed_form(ridge, name, method):
    inner, outer = _ridge_trees(ridge)
    grads, stats = hg.implicit_grad(ridge.lower, ridge.upper, inner, outer, solver=SOLVERS[name](ridge),
                                    hvp_method=method)
    err = rel_err(grads["log_lam"], ridge.hypergrad())
    assert err <= 1e-8, f"{name}/{method}: {err:.2e}"
    assert stats.result is hg.Result.CONVERGED
    assert stats.solve.solver == name


@pytest.mark.parametrize(("method", "cross"), [("finite_difference", "autograd"), ("reverse", "finite_difference")])
def test_implicit_grad_finite_difference_options(ridge, method, cross):
    inner, outer = _ridge_trees(ridge)
    grads, _ = hg.implicit_grad(ridge.lower, ridge.upper, inner, outer, solver=hg.CG(maxiter=50, tol=1e-12),
                                hvp_method=method, cross_method=cross)
    assert rel_err(grads["log_lam"], ridge.hypergrad()) <= 1e-6


def test_implicit_grad_damping_uses_shifted_hessian(ridge):
    """damping=delta gives -lam g^T (A + delta I)^{-1} w* + dF/dl (not the BiSSL rescaling)."""
    delta = 0.3
    inner, outer = _ridge_trees(ridge)
    grads, _ = hg.implicit_grad(ridge.lower, ridge.upper, inner, outer, solver=hg.CG(maxiter=50, tol=1e-12),
                                damping=delta)
    w = ridge.w_star()
    lam = torch.exp(ridge.log_lam)
    g = ridge.Xv.T @ (ridge.Xv @ w - ridge.yv) / ridge.m
    shifted = ridge.matrix() + delta * torch.eye(ridge.d, dtype=F64)
    expected = -lam * (g @ torch.linalg.solve(shifted, w)) + ridge.direct()
    assert rel_err(grads["log_lam"], expected) <= 1e-8
    assert rel_err(grads["log_lam"], ridge.hypergrad()) > 1e-3


def test_implicit_grad_warm_start_and_unused_outer_leaf(ridge):
    inner, outer = _ridge_trees(ridge)
    outer = {**outer, "unused": torch.ones(3, dtype=F64)}
    x0 = {"w": torch.ones(ridge.d, dtype=F64)}
    grads, stats = hg.implicit_grad(ridge.lower, ridge.upper, inner, outer,
                                    solver=hg.CG(maxiter=50, tol=1e-12), x0=x0)
    assert rel_err(grads["log_lam"], ridge.hypergrad()) <= 1e-8
    assert torch.equal(grads["unused"], torch.zeros(3, dtype=F64))
    assert stats.num_hvp == stats.solve.iterations + 2  # x0's residual and the confirming one


# --- fixed points, custom_root, DARTS ------------------------------------------------------

def _ridge_step(ridge: Ridge, eta: float):
    def T(i, o):
        w = i["w"]
        grad = ridge.X.T @ (ridge.X @ w - ridge.y) / ridge.n + torch.exp(o["log_lam"]) * w
        return {"w": w - eta * grad}
    return T


@pytest.mark.parametrize("solver_name", ["Neumann", "CG"])
def test_fixed_point_grad_matches_closed_form(ridge, solver_name):
    eta = 1.0 / ridge.lambda_max()
    inner, outer = _ridge_trees(ridge)
    if solver_name == "Neumann":
        grads, stats = hg.fixed_point_grad(_ridge_step(ridge, eta), ridge.upper, inner, outer,
                                           solver=hg.Neumann(alpha=1.0, maxiter=5000, tol=1e-13))
    else:
        grads, stats = hg.fixed_point_grad(_ridge_step(ridge, eta), ridge.upper, inner, outer,
                                           solver=hg.CG(maxiter=50, tol=1e-12), symmetric=True)
    assert rel_err(grads["log_lam"], ridge.hypergrad()) <= 1e-8
    assert stats.result is hg.Result.CONVERGED
    assert float(stats.stationarity) < 1e-12


def test_custom_root_backward_fills_outer_grad(ridge):
    seen = []

    @hg.custom_root(ridge.lower, solver=hg.CG(maxiter=50, tol=1e-12), on_solve=seen.append)
    def fit(outer):
        return {"w": ridge.w_star(outer["log_lam"])}

    log_lam = ridge.log_lam.clone().requires_grad_(True)
    outer = {"log_lam": log_lam}
    inner = fit(outer)
    assert torch.allclose(inner["w"], ridge.w_star())
    ridge.upper(inner, outer).backward()
    assert log_lam.grad is not None
    assert rel_err(log_lam.grad, ridge.hypergrad()) <= 1e-8
    assert len(seen) == 1 and seen[0].result is hg.Result.CONVERGED


def test_darts_grad_xi_zero_is_the_direct_partial(ridge):
    inner, outer = _ridge_trees(ridge)
    grads, stats = hg.darts_grad(ridge.lower, ridge.upper, inner, outer, xi=0.0)
    assert torch.allclose(grads["log_lam"], ridge.direct(), rtol=1e-14, atol=0)
    assert stats.num_hvp == 0


def test_darts_grad_second_order_formula(ridge):
    """With lower = ... + lam/2 ||w||^2, grad_l L is quadratic in w, so the central difference is
    exact: dF/dl ~ dF/dl(w') - xi * lam * <w, grad_w F(w')>, w' = w - xi grad_w L(w)."""
    xi = 0.05
    inner = {"w": ridge.w_star() + 0.1}
    outer = {"log_lam": ridge.log_lam.clone()}
    lam = torch.exp(ridge.log_lam)
    w = inner["w"]
    grad_l = ridge.X.T @ (ridge.X @ w - ridge.y) / ridge.n + lam * w
    w1 = w - xi * grad_l
    v = ridge.Xv.T @ (ridge.Xv @ w1 - ridge.yv) / ridge.m
    expected = ridge.direct() - xi * lam * (w @ v)
    grads, _ = hg.darts_grad(ridge.lower, ridge.upper, inner, outer, xi=xi)
    assert rel_err(grads["log_lam"], expected) <= 1e-8


def test_not_stationary_warning(ridge):
    inner, outer = _ridge_trees(ridge)
    far = {"w": inner["w"] + 0.5}
    with pytest.warns(hg.NotStationaryWarning, match="stationarity_tol"):
        hg.implicit_grad(ridge.lower, ridge.upper, far, outer, solver=hg.CG(maxiter=20, tol=1e-10))
    with pytest.warns(hg.NotStationaryWarning):
        hg.fixed_point_grad(_ridge_step(ridge, 0.1), ridge.upper, far, outer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.NotStationaryWarning)
        hg.implicit_grad(ridge.lower, ridge.upper, inner, outer, solver=hg.CG(maxiter=20, tol=1e-10))
        hg.fixed_point_grad(_ridge_step(ridge, 0.1), ridge.upper, inner, outer)
        hg.implicit_grad(ridge.lower, ridge.upper, far, outer, solver=hg.CG(maxiter=20, tol=1e-10),
                         stationarity_tol=None)


# --- logistic regression with per-feature L2 weights, against finite differences -----------

class Logistic:
    """Lower: mean logistic loss + 0.5 sum_j exp(o_j) w_j^2 + 0.005 b^2; upper: validation loss."""

    def __init__(self, seed: int = 0, n: int = 60, m: int = 40, d: int = 4) -> None:
        g = generator(seed)
        w0 = torch.randn(d, generator=g, dtype=F64)
        self.X = torch.randn(n, d, generator=g, dtype=F64)
        self.y = torch.bernoulli(torch.sigmoid(self.X @ w0 + 0.3), generator=g)
        self.Xv = torch.randn(m, d, generator=g, dtype=F64)
        self.yv = torch.bernoulli(torch.sigmoid(self.Xv @ w0 + 0.3), generator=g)
        self.log_w = torch.tensor([-1.0, 0.5, -2.0, 0.0], dtype=F64)
        self.n = n

    @staticmethod
    def _nll(X, y, w, b):
        z = X @ w + b
        return (F.softplus(z) - y * z).mean()

    def lower(self, i, o):
        return self._nll(self.X, self.y, i["w"], i["b"]) + 0.5 * (torch.exp(o["log_w"]) * i["w"] ** 2).sum() \
            + 0.005 * i["b"] ** 2

    def upper(self, i, o):
        return self._nll(self.Xv, self.yv, i["w"], i["b"])

    def solve(self, log_w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Newton's method on theta = (w, b) until ||grad|| < 1e-12 (gradient/Hessian by hand)."""
        Z = torch.cat([self.X, torch.ones(self.n, 1, dtype=F64)], dim=1)
        D = torch.diag(torch.cat([torch.exp(log_w), torch.tensor([0.01], dtype=F64)]))
        theta = torch.zeros(Z.shape[1], dtype=F64)
        for _ in range(100):
            s = torch.sigmoid(Z @ theta)
            grad = Z.T @ (s - self.y) / self.n + D @ theta
            if float(grad.norm()) < 1e-12:
                return {"w": theta[:-1], "b": theta[-1]}
            H = Z.T @ (Z * (s * (1 - s))[:, None]) / self.n + D
            theta = theta - torch.linalg.solve(H, grad)
        raise AssertionError("Newton did not converge")

    def finite_difference_grad(self, h: float = 1e-3) -> torch.Tensor:
        """Central differences of F(o) = upper(w*(o)), Richardson-extrapolated (error O(h^4))."""
        def F_of(log_w):
            return self.upper(self.solve(log_w), {"log_w": log_w})

        out = torch.zeros_like(self.log_w)
        for j in range(self.log_w.numel()):
            e = torch.zeros_like(self.log_w)
            e[j] = 1.0

            def central(step, e=e):
                return (F_of(self.log_w + step * e) - F_of(self.log_w - step * e)) / (2 * step)

            out[j] = (4 * central(h / 2) - central(h)) / 3
        return out


@pytest.fixture(scope="module")
def logistic():
    prob = Logistic()
    return prob, prob.finite_difference_grad()


@pytest.mark.parametrize("solver", [hg.CG(maxiter=50, tol=1e-12), hg.MINRES(maxiter=50, tol=1e-12)],
                         ids=["CG", "MINRES"])
@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_logistic_per_feature_weights_match_finite_differences(logistic, solver, method):
    prob, fd = logistic
    inner = prob.solve(prob.log_w)
    grads, stats = hg.implicit_grad(prob.lower, prob.upper, inner, {"log_w": prob.log_w.clone()},
                                    solver=solver, hvp_method=method)
    assert grads["log_w"].shape == (4,)
    assert rel_err(grads["log_w"], fd) <= 1e-8
    assert stats.result is hg.Result.CONVERGED
    assert float(stats.stationarity) < 1e-12


def test_logistic_first_order_approximation_is_different(logistic):
    """Control: dropping the implicit term (DARTS with xi = 0) is far from the truth."""
    prob, fd = logistic
    grads, _ = hg.darts_grad(prob.lower, prob.upper, prob.solve(prob.log_w), {"log_w": prob.log_w}, xi=0.0)
    assert rel_err(grads["log_w"], fd) > 0.5
