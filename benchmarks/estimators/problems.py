"""The benchmark's problems: a quadratic with a closed-form hypergradient, and the two examples'.

``digits-l2`` is ``examples/digits_l2_hpo.py``'s problem (64 per-pixel L2 weights for logistic
regression on digits) and ``hypercleaning`` is ``examples/data_hypercleaning.py``'s (one weight
per training example, 50 % of the labels corrupted); both are imported from the example files,
and the outer loss is evaluated at the exact inner solution (dense Newton with the closed-form
Hessian of a linear softmax model, warm-started, checked by the example loss's own gradient). Inner step sizes come from explicit smoothness bounds, not from tuning.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import scipy.linalg
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

import hypergrad as hg

F64 = torch.float64
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
Loss = Callable[[hg.Tree, hg.Tree], Tensor]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (not a package) once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot import {EXAMPLES / name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def ce_smoothness(x: Tensor) -> float:
    """Upper bound on the Hessian of mean softmax cross-entropy of a linear model x W + b.

    The softmax Hessian diag(p) - p p' is at most 1/2 in the Loewner order, so the loss's
    Hessian is at most lambda_max([x 1]'[x 1] / N) / 2.
    """
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return 0.5 * float(torch.linalg.eigvalsh(xb.T @ xb / x.shape[0])[-1])


def softmax_newton(x: Tensor, y: Tensor, weights: Tensor, penalty: Tensor, start: hg.Tree, loss: Callable[[hg.Tree], Tensor],
                   tol: float = 1e-9, max_steps: int = 50) -> tuple[hg.Tree, float]:
    """Dense Newton on ``sum_n weights_n CE(x_n W + b, y_n) + 1/2 <penalty, [W; b]^2>`` (float64).

    The Hessian of a linear softmax model is formed in closed form,
    ``sum_n w_n (x~_n x~_n') (x) (diag(p_n) - p_n p_n')`` with ``x~ = [x 1]``, and each step is a
    dense solve with a backtracking line search on ``loss`` (the example's own
    lower loss). Returns the solution and ``||grad loss||`` there, by autograd on ``loss``: the
    evaluator's exactness is checked by the example's loss, not by the formula above.

    Args:
        x: (N, d) features; y: (N,) labels; weights: (N,) per-example weights (they sum the loss).
        penalty: (d + 1, C) coefficients of the squared weights (last row: the bias).
        start: ``{"W": (d, C), "b": (C,)}`` warm start.
    """
    n, d = x.shape
    xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)  # (N, d+1)
    onehot = torch.nn.functional.one_hot(y, penalty.shape[1]).to(x.dtype)  # (N, C)
    V = torch.cat([start["W"], start["b"][None]]).detach()  # (d+1, C)
    c = penalty.shape[1]

    def tree(v: Tensor) -> hg.Tree:
        return {"W": v[:d], "b": v[d]}

    for _ in range(max_steps):
        p = torch.softmax(xb @ V, dim=1)  # (N, C)
        G = xb.T @ (weights[:, None] * (p - onehot)) + penalty * V  # (d+1, C)
        if float(G.norm()) <= tol:
            break
        D = torch.einsum("n,na,ni,nj->iaj", weights, p, xb, xb)  # (d+1, C, d+1): the diag(p_n) part
        H = (D[..., None] * torch.eye(c, dtype=x.dtype)[None, :, None, :]).reshape((d + 1) * c, (d + 1) * c)
        Z = (xb[:, :, None] * p[:, None, :]).reshape(n, (d + 1) * c)  # (N, (d+1) C)
        H = H - Z.T @ (weights[:, None] * Z) + torch.diag(penalty.reshape(-1))
        # One BLAS thread: multi-threaded LAPACK on a 650 x 650 matrix was 20x slower on a busy machine.
        with threadpool_limits(limits=1):
            factor = scipy.linalg.cho_factor(((H + H.T) / 2).numpy())
            step = torch.from_numpy(scipy.linalg.cho_solve(factor, G.reshape(-1).numpy())).reshape(d + 1, c)
        with torch.no_grad():
            f0, t, slope = float(loss(tree(V))), 1.0, float((G * step).sum())
            trial = V
            while t > 1e-12:
                trial = V - t * step
                if float(loss(tree(trial))) <= f0 - 1e-4 * t * slope:
                    break
                t /= 2
        V = trial
    inner = {"W": V[:d].clone(), "b": V[d].clone()}
    stationarity = float(hg._tree.tree_norm(hg.gradient(loss, inner)))
    return inner, stationarity


# ---------------------------------------------------------------------------------------------
# The quadratic: accuracy of one estimate against the closed form


@dataclass(frozen=True)
class Quadratic:
    """L(y, x) = 1/2 y'Hy - y'(Bx + b), F(y, x) = 1/2 ||y - c||^2 + y'Ex + 1/2 ||x||^2."""

    H: Tensor
    B: Tensor
    b: Tensor
    c: Tensor
    E: Tensor
    x: Tensor
    mu: float
    ell: float

    def lower(self, i: hg.Tree, o: hg.Tree) -> Tensor:
        return 0.5 * i["y"] @ self.H @ i["y"] - i["y"] @ (self.B @ o["x"] + self.b)

    def upper(self, i: hg.Tree, o: hg.Tree) -> Tensor:
        y, x = i["y"], o["x"]
        return 0.5 * ((y - self.c) ** 2).sum() + y @ self.E @ x + 0.5 * (x**2).sum()

    def truth(self) -> Tensor:
        """Dense float64: E'y* + x + B'H^-1 (y* - c + Ex), y* = H^-1 (Bx + b)."""
        ys = torch.linalg.solve(self.H, self.B @ self.x + self.b)
        return self.E.T @ ys + self.x + self.B.T @ torch.linalg.solve(self.H, ys - self.c + self.E @ self.x)

    def start(self) -> hg.Tree:
        return {"y": torch.zeros(self.H.shape[0], dtype=F64)}

    def outer(self) -> hg.Tree:
        return {"x": self.x.clone()}


def quadratic(seed: int, n: int, m: int, mu: float = 0.05, ell: float = 1.0) -> Quadratic:
    """H with eigenvalues log-spaced in [mu, ell] and a random basis; everything else Gaussian."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    q = q * torch.sign(torch.diagonal(r))
    eig = torch.logspace(math.log10(mu), math.log10(ell), n, dtype=F64)
    H = q @ torch.diag(eig) @ q.T
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64) / math.sqrt(s[0])  # noqa: E731
    return Quadratic((H + H.T) / 2, rnd(n, m), rnd(n), rnd(n), rnd(n, m), torch.randn(m, generator=g, dtype=F64),
                     mu, ell)


# ---------------------------------------------------------------------------------------------
# Outer-loop problems


@dataclass
class OuterProblem:
    """A hyperparameter problem run by hypergradient descent (or random search).

    ``evaluate(outer, start)`` returns the outer loss at the exact inner solution (dense Newton,
    warm-started from ``start``), a test metric, the example loss's gradient norm there and
    that solution.
    """

    name: str
    description: str
    lower: Loss
    upper: Loss
    inner0: hg.Tree
    outer0: hg.Tree
    step_size: float  # inner gradient step: 1 / (bound on the lower loss's smoothness)
    penalty_step_size: float  # for L + F/lam at the smallest multiplier used
    update: Callable[[hg.Tree, hg.Tree, int], hg.Tree]  # (outer, grads, outer step) -> outer
    random_outer: Callable[[torch.Generator], hg.Tree]
    random_rule: str
    evaluate: Callable[[hg.Tree, hg.Tree], tuple[float, float, float, hg.Tree]]
    test_metric: str


def digits_l2(seed: int, small: bool, min_penalty: float) -> OuterProblem:
    ex = load_example("digits_l2_hpo")
    n = 200 if small else 600
    p = ex.make_problem(seed=seed, n_train=n, n_val=n)
    x, _ = _digits_data(seed)
    x_tr, x_val = x[:n], x[n:2 * n]
    log_lam_max = 2.0
    # L = CE + sum_j exp(log_lam_j) ||W_j||^2 / 2 + BIAS_L2 ||b||^2 / 2, log_lam clamped to [-10, 2].
    l_lower = ce_smoothness(x_tr) + math.exp(log_lam_max) + ex.BIAS_L2
    l_upper = ce_smoothness(x_val)
    lr = 4.0  # the example's normalised step in log_lam, decayed as 1/sqrt(1 + k)

    def update(outer: hg.Tree, grads: hg.Tree, k: int) -> hg.Tree:
        g = grads["log_lam"]
        step = lr / math.sqrt(1.0 + k) * g / g.norm().clamp_min(1e-30)
        return {"log_lam": (outer["log_lam"] - step).clamp(-10.0, log_lam_max)}

    def random_outer(gen: torch.Generator) -> hg.Tree:
        value = -10.0 + 12.0 * float(torch.rand((), generator=gen, dtype=F64))
        return {"log_lam": torch.full((p.num_features,), value, dtype=F64)}

    y_tr = _digits_data(seed)[1][:n]
    bias_row = torch.full((1, 10), ex.BIAS_L2, dtype=F64)

    def evaluate(outer: hg.Tree, start: hg.Tree) -> tuple[float, float, float, hg.Tree]:
        penalty = torch.cat([outer["log_lam"].exp()[:, None].expand(-1, 10), bias_row])
        inner, stationarity = softmax_newton(x_tr, y_tr, torch.full((n,), 1.0 / n, dtype=F64), penalty, start,
                                             lambda i: p.lower_loss(i, outer))
        with torch.no_grad():
            return float(p.upper_loss(inner, outer)), float(p.test_loss(inner, outer)), stationarity, inner

    return OuterProblem(
        "digits-l2", f"64 per-pixel L2 weights, logistic regression on digits ({n} train / {n} validation)",
        p.lower_loss, p.upper_loss, p.zeros(), {"log_lam": torch.full((p.num_features,), -4.0, dtype=F64)},
        1.0 / l_lower, 1.0 / (l_lower + l_upper / min_penalty), update, random_outer,
        "one shared log L2 weight, uniform in [-10, 2] (the example's search space)", evaluate, "test cross-entropy")


def _digits_data(seed: int) -> tuple[Tensor, Tensor]:
    """The digits permutation both examples use (pixels / 16)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=F64) / 16.0
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], torch.as_tensor(y)[perm]


def hypercleaning(seed: int, small: bool, min_penalty: float) -> OuterProblem:
    ex = load_example("data_hypercleaning")
    p = ex.make_problem(n_train=300, n_val=100, seed=seed) if small else ex.make_problem(seed=seed)
    n = len(p.y_tr)
    # L = mean sigmoid(a_n) CE_n + mu/2 ||params||^2 with sigmoid <= 1.
    l_lower = ce_smoothness(p.x_tr) + p.mu
    l_upper = ce_smoothness(p.x_val)
    lr = 20.0  # the example's step: a -= lr * N * grad

    def update(outer: hg.Tree, grads: hg.Tree, k: int) -> hg.Tree:
        return {"a": outer["a"] - lr * n * grads["a"]}

    def random_outer(gen: torch.Generator) -> hg.Tree:
        return {"a": -4.0 + 8.0 * torch.rand(n, generator=gen, dtype=F64)}

    penalty = torch.full((p.x_tr.shape[1] + 1, 10), p.mu, dtype=F64)

    def evaluate(outer: hg.Tree, start: hg.Tree) -> tuple[float, float, float, hg.Tree]:
        weights = torch.sigmoid(outer["a"]) / n
        inner, stationarity = softmax_newton(p.x_tr, p.y_tr, weights, penalty, start,
                                             lambda i: p.lower_loss(i, outer))
        with torch.no_grad():
            return float(p.upper_loss(inner, outer)), p.test_accuracy(inner), stationarity, inner

    return OuterProblem(
        "hypercleaning", f"one weight per training example, {n} digits with 50 % corrupted labels, "
        f"{len(p.y_val)} clean validation examples",
        p.lower_loss, p.upper_loss, p.zeros(), {"a": torch.zeros(n, dtype=F64)},
        1.0 / l_lower, 1.0 / (l_lower + l_upper / min_penalty), update, random_outer,
        "example logits uniform in [-4, 4], independently per example", evaluate, "test accuracy")


OUTER_PROBLEMS: dict[str, Callable[[int, bool, float], OuterProblem]] = {
    "digits-l2": digits_l2,
    "hypercleaning": hypercleaning,
}
