r"""hypergrad under ``torch.func.vmap``: per-task Hessian products and hypergradients.

The meta-learning problem (iMAML-style, Rajeswaran et al. 2019): task ``t`` has training data
:math:`(X_t, y_t)`, validation data :math:`(V_t, z_t)` and its own inner solution

.. math::
    w_t^* = \arg\min_w \tfrac{1}{2n}\|X_t w - y_t\|^2 + \tfrac{\lambda}{2}\|w - w_0\|^2,
    \qquad \lambda = e^{\ell},

with the outer variables :math:`o = (w_0, \ell)` shared by every task. With
:math:`A_t = X_t^\top X_t / n + \lambda I` and :math:`g_t = V_t^\top (V_t w_t^* - z_t)/m`, the
closed form of the task's hypergradient of :math:`F_t = \tfrac{1}{2m}\|V_t w_t^* - z_t\|^2` is

.. math::
    \frac{dF_t}{dw_0} = \lambda A_t^{-1} g_t, \qquad
    \frac{dF_t}{d\ell} = \lambda\, g_t^\top A_t^{-1} (w_0 - w_t^*).

Every test compares three independent computations: the vmapped call (the ``torch.func``
backend), a Python loop of single calls outside any transform (the autograd backend), and the
closed form by ``torch.linalg.solve`` (or central finite differences for logistic regression).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_helpers import F64, generator
from torch import Tensor
from torch.func import vmap

import hypergrad as hg

TASKS, N, M, D = 5, 24, 16, 4


class MetaRidge:
    """A batch of ridge-regression tasks sharing the outer regulariser (centre ``w0``, ``log_lam``)."""

    def __init__(self, seed: int = 0) -> None:
        g = generator(seed)
        w_true = torch.randn(TASKS, D, generator=g, dtype=F64)
        self.X = torch.randn(TASKS, N, D, generator=g, dtype=F64)
        self.y = torch.einsum("tnd,td->tn", self.X, w_true) + 0.3 * torch.randn(TASKS, N, generator=g, dtype=F64)
        self.V = torch.randn(TASKS, M, D, generator=g, dtype=F64)
        self.z = torch.einsum("tmd,td->tm", self.V, w_true) + 0.3 * torch.randn(TASKS, M, generator=g, dtype=F64)
        self.outer = {"w0": torch.randn(D, generator=g, dtype=F64), "log_lam": torch.tensor(-0.7, dtype=F64)}

    @staticmethod
    def lower(i: dict[str, Tensor], o: dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        w = i["w"]
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * o["log_lam"].exp() * ((w - o["w0"]) ** 2).sum()

    @staticmethod
    def upper(i: dict[str, Tensor], o: dict[str, Tensor], V: Tensor, z: Tensor) -> Tensor:
        return 0.5 * ((V @ i["w"] - z) ** 2).mean()

    def matrix(self, t: int) -> Tensor:
        return self.X[t].T @ self.X[t] / N + self.outer["log_lam"].exp() * torch.eye(D, dtype=F64)

    def w_star(self, t: int) -> Tensor:
        lam = self.outer["log_lam"].exp()
        return torch.linalg.solve(self.matrix(t), self.X[t].T @ self.y[t] / N + lam * self.outer["w0"])

    def closed_form(self, t: int) -> dict[str, Tensor]:
        lam = self.outer["log_lam"].exp()
        w = self.w_star(t)
        s = torch.linalg.solve(self.matrix(t), self.V[t].T @ (self.V[t] @ w - self.z[t]) / M)
        return {"w0": lam * s, "log_lam": lam * s @ (self.outer["w0"] - w)}


@pytest.fixture(scope="module")
def meta() -> MetaRidge:
    return MetaRidge()


def _stack(trees: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def _assert_close(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        err = float((a[k] - b[k]).norm() / b[k].norm())
        assert err <= rtol, f"{k}: relative error {err:.3g} > {rtol:g}"


def _task_grad(meta: MetaRidge, solver: hg.Solver, **kwargs):
    def one(w: Tensor, X: Tensor, y: Tensor, V: Tensor, z: Tensor):
        return hg.implicit_grad(lambda i, o: meta.lower(i, o, X, y), lambda i, o: meta.upper(i, o, V, z),
                                {"w": w}, meta.outer, solver=solver, **kwargs)

    return one


SOLVERS = {"CG": hg.CG(maxiter=D + 2, tol=0.0), "MINRES": hg.MINRES(maxiter=D + 2, tol=0.0)}


@pytest.mark.parametrize("method", ["reverse", "forward", "finite_difference"])
@pytest.mark.parametrize("solver_name", sorted(SOLVERS))
def test_vmapped_implicit_grad_equals_loop_and_closed_form(meta, solver_name, method):
    one = _task_grad(meta, SOLVERS[solver_name], hvp_method=method)
    W = torch.stack([meta.w_star(t) for t in range(TASKS)])
    grads, stats = vmap(one)(W, meta.X, meta.y, meta.V, meta.z)
    loop = [one(W[t], meta.X[t], meta.y[t], meta.V[t], meta.z[t]) for t in range(TASKS)]
    truth = _stack([meta.closed_form(t) for t in range(TASKS)])
    # The ridge Hessian is constant, so even finite-difference products are exact up to rounding.
    _assert_close(grads, _stack([g for g, _ in loop]), 1e-12 if method != "finite_difference" else 1e-9)
    _assert_close(grads, truth, 1e-9)
    # Per-task stats come back batched (task dimension first), counts stay Python ints.
    assert stats.solve.iterations == D + 2 and stats.num_hvp == D + 2
    assert stats.solve.residual_history.shape == (TASKS, D + 3)
    assert stats.stationarity.shape == (TASKS,) and float(stats.stationarity.max()) < 1e-12
    assert stats.result is hg.Result.MAX_ITERATIONS  # tol=0: a fixed-iteration solve never "converges"
    assert float(stats.solve.relative_residual.max()) < 1e-10
    for t in range(TASKS):
        assert torch.allclose(stats.upper_loss[t], loop[t][1].upper_loss, rtol=1e-14, atol=0)
        # Residuals before CG/MINRES reach rounding level (exact in D steps in exact arithmetic).
        assert torch.allclose(stats.solve.residual_history[t, :D], loop[t][1].solve.residual_history[:D],
                              rtol=1e-6, atol=0)


@pytest.mark.parametrize("cross", ["autograd", "finite_difference"])
def test_vmapped_implicit_grad_damping_and_cross_method(meta, cross):
    """Damping delta: dF/dw0 = lam (A + delta I)^{-1} g, dF/dl = lam g^T (A + delta I)^{-1} (w0 - w)."""
    delta = 0.25
    one = _task_grad(meta, hg.CG(maxiter=D + 2, tol=0.0), damping=delta, cross_method=cross)
    W = torch.stack([meta.w_star(t) for t in range(TASKS)])
    grads, _ = vmap(one)(W, meta.X, meta.y, meta.V, meta.z)
    lam = meta.outer["log_lam"].exp()
    truth = []
    for t in range(TASKS):
        g = meta.V[t].T @ (meta.V[t] @ W[t] - meta.z[t]) / M
        s = torch.linalg.solve(meta.matrix(t) + delta * torch.eye(D, dtype=F64), g)
        truth.append({"w0": lam * s, "log_lam": lam * s @ (meta.outer["w0"] - W[t])})
    _assert_close(grads, _stack(truth), 1e-9 if cross == "autograd" else 1e-7)


def test_func_backend_outside_transforms_matches_autograd(meta):
    w = meta.w_star(0)
    args = (lambda i, o: meta.lower(i, o, meta.X[0], meta.y[0]), lambda i, o: meta.upper(i, o, meta.V[0], meta.z[0]),
            {"w": w}, meta.outer)
    solver = hg.CG(maxiter=50, tol=1e-12)
    g_func, s_func = hg.implicit_grad(*args, solver=solver, backend="func")
    g_auto, s_auto = hg.implicit_grad(*args, solver=solver, backend="autograd")
    _assert_close(g_func, meta.closed_form(0), 1e-10)
    _assert_close(g_auto, meta.closed_form(0), 1e-10)
    assert s_func.result is hg.Result.CONVERGED and s_func.num_hvp == s_auto.num_hvp


def test_vmap_over_outer_variables(meta):
    """Batched hyperparameters with one task: vmap over (w0, log_lam) candidates, in_dims for outer."""
    X, y, V, z = meta.X[0], meta.y[0], meta.V[0], meta.z[0]
    W0 = torch.randn(3, D, generator=generator(5), dtype=F64)
    L = torch.tensor([-1.0, 0.0, 0.5], dtype=F64)

    def one(w0: Tensor, log_lam: Tensor) -> dict[str, Tensor]:
        outer = {"w0": w0, "log_lam": log_lam}
        lam = log_lam.exp()
        w = torch.linalg.solve(X.T @ X / N + lam * torch.eye(D, dtype=F64), X.T @ y / N + lam * w0)
        return hg.implicit_grad(lambda i, o: meta.lower(i, o, X, y), lambda i, o: meta.upper(i, o, V, z),
                                {"w": w}, outer, solver=hg.CG(maxiter=D + 2, tol=0.0))[0]

    grads = vmap(one)(W0, L)
    for j in range(3):
        meta_j = MetaRidge()
        meta_j.outer = {"w0": W0[j], "log_lam": L[j]}
        _assert_close({k: v[j] for k, v in grads.items()}, meta_j.closed_form(0), 1e-9)


# --- per-task logistic regression: a non-quadratic inner problem ------------------------------

def _logistic_lower(i, o, X, y):
    z = X @ i["w"]
    return (F.softplus(z) - y * z).mean() + 0.5 * o["log_lam"].exp() * ((i["w"] - o["w0"]) ** 2).sum()


def _logistic_upper(i, o, V, z):
    s = V @ i["w"]
    return (F.softplus(s) - z * s).mean()


def _newton(outer: dict[str, Tensor], X: Tensor, y: Tensor, steps: int = 25) -> Tensor:
    """Fixed-step Newton by hand (gradient and Hessian written out; vmap-friendly: no tolerance)."""
    lam = outer["log_lam"].exp()
    w = outer["w0"].clone()
    for _ in range(steps):
        s = torch.sigmoid(X @ w)
        grad = X.T @ (s - y) / X.shape[0] + lam * (w - outer["w0"])
        H = X.T @ (X * (s * (1 - s))[:, None]) / X.shape[0] + lam * torch.eye(X.shape[1], dtype=X.dtype)
        w = w - torch.linalg.solve(H, grad)
    return w


def test_vmapped_logistic_hypergradients_equal_loop_and_finite_differences(meta):
    g = generator(11)
    Y = torch.bernoulli(torch.sigmoid(meta.X @ torch.randn(D, generator=g, dtype=F64)), generator=g)
    Z = torch.bernoulli(torch.sigmoid(meta.V @ torch.randn(D, generator=g, dtype=F64)), generator=g)
    outer = meta.outer

    def one(X, y, V, z):
        w = _newton(outer, X, y)  # the inner solve itself runs under vmap
        return hg.implicit_grad(lambda i, o: _logistic_lower(i, o, X, y), lambda i, o: _logistic_upper(i, o, V, z),
                                {"w": w}, outer, solver=hg.CG(maxiter=2 * D, tol=0.0))

    grads, stats = vmap(one)(meta.X, Y, meta.V, Z)
    assert float(stats.stationarity.max()) < 1e-12
    loop = _stack([one(meta.X[t], Y[t], meta.V[t], Z[t])[0] for t in range(TASKS)])
    _assert_close(grads, loop, 1e-12)

    # Truth: central differences of F_t(w*(o), o) with the inner problem re-solved by Newton.
    h = 1e-5
    flat = torch.cat([outer["w0"], outer["log_lam"].reshape(1)])
    fd = torch.zeros(TASKS, D + 1, dtype=F64)
    for j in range(D + 1):
        e = torch.zeros(D + 1, dtype=F64)
        e[j] = h
        for t in range(TASKS):
            vals = []
            for sgn in (1, -1):
                o = {"w0": (flat + sgn * e)[:D], "log_lam": (flat + sgn * e)[D]}
                vals.append(_logistic_upper({"w": _newton(o, meta.X[t], Y[t])}, o, meta.V[t], Z[t]))
            fd[t, j] = (vals[0] - vals[1]) / (2 * h)
    _assert_close(grads, {"w0": fd[:, :D], "log_lam": fd[:, D]}, 1e-7)


# --- Hessian products under vmap ---------------------------------------------------------------

def _quartic(p: dict[str, Tensor], a: Tensor) -> Tensor:
    """f(p) = sum a * w^4 + (w . b)^2 + sum b^2 w: Hessian 12 a w^2 I-diag + 2 b b^T, and 2 w for (b, w)."""
    return (a * p["w"] ** 4).sum() + (p["w"] @ p["b"]) ** 2 + (p["b"] ** 2 * p["w"]).sum()


@pytest.mark.parametrize("method", ["reverse", "forward", "finite_difference"])
def test_hvp_and_hessian_operator_under_vmap(method):
    g = generator(3)
    P = {"w": torch.randn(TASKS, 3, generator=g, dtype=F64), "b": torch.randn(TASKS, 3, generator=g, dtype=F64)}
    Vt = {"w": torch.randn(TASKS, 3, generator=g, dtype=F64), "b": torch.randn(TASKS, 3, generator=g, dtype=F64)}
    a = torch.rand(TASKS, 3, generator=g, dtype=F64)
    out = vmap(lambda p, v, a: hg.hvp(lambda q: _quartic(q, a), p, v, method=method))(P, Vt, a)
    out_op = vmap(lambda p, v, a: hg.HessianOperator(lambda q: _quartic(q, a), p, method=method).mv(v))(P, Vt, a)
    tol = 1e-6 if method == "finite_difference" else 1e-12
    for t in range(TASKS):
        # Dense truth by double backward outside any transform, on the flattened (w, b).
        def flat_f(x, t=t):
            return _quartic({"w": x[:3], "b": x[3:]}, a[t])

        H = torch.autograd.functional.hessian(flat_f, torch.cat([P["w"][t], P["b"][t]]))
        expected = H @ torch.cat([Vt["w"][t], Vt["b"][t]])
        for got in (out, out_op):
            err = float((torch.cat([got["w"][t], got["b"][t]]) - expected).norm() / expected.norm())
            assert err <= tol, (method, t, err)


def test_mixed_vjp_under_vmap(meta):
    """d/do <grad_w L, u> for the ridge lower loss: w0 -> -lam u, log_lam -> lam (w - w0) . u."""
    W = torch.randn(TASKS, D, generator=generator(4), dtype=F64)
    U = torch.randn(TASKS, D, generator=generator(6), dtype=F64)
    out = vmap(lambda w, u, X, y: hg.mixed_vjp(lambda i, o: meta.lower(i, o, X, y), {"w": w}, meta.outer,
                                               {"w": u}))(W, U, meta.X, meta.y)
    lam = meta.outer["log_lam"].exp()
    _assert_close(out, {"w0": -lam * U, "log_lam": lam * ((W - meta.outer["w0"]) * U).sum(1)}, 1e-13)


# --- what cannot run under vmap: typed errors ------------------------------------------------------

def test_tolerance_checked_solver_under_vmap_raises_transform_error(meta):
    W = torch.stack([meta.w_star(t) for t in range(TASKS)])
    for solver in (hg.CG(maxiter=10, tol=1e-8), hg.CG(maxiter=10, tol=0.0, on_breakdown="raise"),
                   hg.MINRES(maxiter=10, tol=0.0, on_nonfinite="raise")):
        with pytest.raises(hg.TransformError, match=r"tol=0\.0"):
            vmap(lambda *a, s=solver: _task_grad(meta, s)(*a)[0])(W, meta.X, meta.y, meta.V, meta.z)
    # Outside vmap the same solver runs (and converges): the error is about the transform only.
    _, stats = _task_grad(meta, hg.CG(maxiter=10, tol=1e-8))(W[0], meta.X[0], meta.y[0], meta.V[0], meta.z[0])
    assert stats.result is hg.Result.CONVERGED


def test_autograd_backend_under_vmap_raises_and_bad_backend_is_rejected(meta):
    W = torch.stack([meta.w_star(t) for t in range(TASKS)])
    one = _task_grad(meta, hg.CG(maxiter=4, tol=0.0), backend="autograd")
    with pytest.raises(hg.TransformError, match="backend='func'"):
        vmap(lambda *a: one(*a)[0])(W, meta.X, meta.y, meta.V, meta.z)
    with pytest.raises(ValueError, match="backend"):
        _task_grad(meta, hg.CG(maxiter=4, tol=0.0), backend="jax")(W[0], meta.X[0], meta.y[0], meta.V[0], meta.z[0])
    with pytest.raises(ValueError, match="backend"):
        hg.HessianOperator(lambda p: (p["w"] ** 2).sum(), {"w": W[0]}, backend="numpy")


# --- custom_root on the same tasks: forward under vmap, backward under vmap(grad) and grad(vmap) ---

def _fit(meta: MetaRidge, solver: hg.Solver):
    @hg.custom_root(meta.lower, solver=solver)
    def fit(outer: dict[str, Tensor], X: Tensor, y: Tensor) -> dict[str, Tensor]:
        lam = outer["log_lam"].exp()
        A = X.T @ X / X.shape[0] + lam * torch.eye(X.shape[1], dtype=X.dtype)
        return {"w": torch.linalg.solve(A, X.T @ y / X.shape[0] + lam * outer["w0"])}

    return fit


def test_custom_root_forward_under_vmap_and_vmap_grad_equal_loop_and_closed_form(meta):
    fit = _fit(meta, hg.CG(maxiter=D + 2, tol=0.0))

    def task_loss(outer, X, y, V, z):
        return meta.upper(fit(outer, X, y), outer, V, z)

    W = vmap(lambda X, y: fit(meta.outer, X, y)["w"])(meta.X, meta.y)
    torch.testing.assert_close(W, torch.stack([meta.w_star(t) for t in range(TASKS)]), rtol=1e-13, atol=0)

    per_task = vmap(torch.func.grad(task_loss), in_dims=(None, 0, 0, 0, 0))(meta.outer, meta.X, meta.y, meta.V, meta.z)
    loop = []
    for t in range(TASKS):  # plain autograd, outside any transform: .backward() through custom_root
        outer = {k: v.clone().requires_grad_(True) for k, v in meta.outer.items()}
        task_loss(outer, meta.X[t], meta.y[t], meta.V[t], meta.z[t]).backward()
        loop.append({k: v.grad for k, v in outer.items()})
    _assert_close(per_task, _stack(loop), 1e-12)
    _assert_close(per_task, _stack([meta.closed_form(t) for t in range(TASKS)]), 1e-9)

    # The iMAML meta-gradient: grad of the task-averaged loss, tasks vmapped inside.
    meta_grad = torch.func.grad(lambda o: vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(
        o, meta.X, meta.y, meta.V, meta.z).mean())(meta.outer)
    _assert_close(meta_grad, {k: v.mean(0) for k, v in _stack([meta.closed_form(t) for t in range(TASKS)]).items()},
                  1e-9)


def test_custom_root_with_a_tolerance_checked_solver_under_vmap_raises(meta):
    fit = _fit(meta, hg.CG(maxiter=20, tol=1e-10))

    def task_loss(outer, X, y, V, z):
        return meta.upper(fit(outer, X, y), outer, V, z)

    with pytest.raises(hg.TransformError, match=r"CG\(maxiter=20, tol=0\.0\)"):
        vmap(torch.func.grad(task_loss), in_dims=(None, 0, 0, 0, 0))(meta.outer, meta.X, meta.y, meta.V, meta.z)


def test_autograd_only_entry_points_raise_transform_error_under_vmap(meta):
    W = torch.stack([meta.w_star(t) for t in range(TASKS)])

    def fixed_point(w, X, y, V, z):
        step = lambda i, o: {"w": i["w"] - 0.1 * torch.func.grad(lambda p: meta.lower(p, o, X, y))(i)["w"]}  # noqa: E731
        return hg.fixed_point_grad(step, lambda i, o: meta.upper(i, o, V, z), {"w": w}, meta.outer)[0]

    def darts(w, X, y, V, z):
        return hg.darts_grad(lambda i, o: meta.lower(i, o, X, y), lambda i, o: meta.upper(i, o, V, z), {"w": w},
                             meta.outer, xi=0.1)[0]

    for fn, name in ((fixed_point, "fixed_point_grad"), (darts, "darts_grad")):
        with pytest.raises(hg.TransformError, match=name):
            vmap(fn)(W, meta.X, meta.y, meta.V, meta.z)
