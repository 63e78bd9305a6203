"""Hyperparameter optimisation with implicit hypergradients: one L2 weight per pixel.

Inner problem: multinomial logistic regression on scikit-learn's digits (training split) with a
penalty ``sum_j exp(log_lam_j) * ||W[j, :]||^2 / 2`` per input pixel j (64 hyperparameters),
solved by warm-started Newton-CG (hypergrad's CG on the Hessian operator) to a stationarity
tolerance; ``||grad_inner L||`` is printed at every step.
Outer problem: the validation cross-entropy, minimised over ``log_lam`` by gradient descent with
hypergradients from :func:`hypergrad.implicit_grad` (conjugate gradient on the inner Hessian).

Baselines at the same budget of inner solves: a grid search and a random search over one shared
L2 weight. The script prints a table (best validation loss, its test loss, inner solves,
Hessian-vector products in the inner solves and in the hypergradients) and saves a plot of the
best validation loss so far vs inner solves and vs Hessian-vector products.

Run: ``python examples/digits_l2_hpo.py [--steps 20] [--plot digits_l2_hpo.png] [--small]``.
Copy it as a template: replace ``make_problem`` by your own inner and outer losses.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import hypergrad

Loss = Callable[[hypergrad.Tree, hypergrad.Tree], torch.Tensor]
BIAS_L2 = 1e-4  # fixed tiny L2 on the bias: makes the inner problem strictly convex


@dataclass(frozen=True)
class Problem:
    """The bilevel problem: inner (train) loss, outer (validation) loss and a test loss."""

    lower_loss: Loss
    upper_loss: Loss
    test_loss: Loss
    num_features: int
    num_classes: int

    def zeros(self) -> hypergrad.Tree:
        """An inner starting point (all weights zero)."""
        return {"W": torch.zeros(self.num_features, self.num_classes, dtype=torch.float64),
                "b": torch.zeros(self.num_classes, dtype=torch.float64)}


def make_problem(seed: int = 0, n_train: int = 600, n_val: int = 600) -> Problem:
    """Digits (pixels / 16) split into train, validation and test (the rest)."""
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float64) / 16.0
    y = torch.as_tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    x_tr, y_tr = x[:n_train], y[:n_train]
    x_val, y_val = x[n_train:n_train + n_val], y[n_train:n_train + n_val]
    x_te, y_te = x[n_train + n_val:], y[n_train + n_val:]

    def lower_loss(inner: hypergrad.Tree, outer: hypergrad.Tree) -> torch.Tensor:
        logits = x_tr @ inner["W"] + inner["b"]  # (N, 10)
        penalty = 0.5 * (outer["log_lam"].exp() * (inner["W"] ** 2).sum(dim=1)).sum()
        return F.cross_entropy(logits, y_tr) + penalty + 0.5 * BIAS_L2 * (inner["b"] ** 2).sum()

    def upper_loss(inner: hypergrad.Tree, outer: hypergrad.Tree) -> torch.Tensor:
        return F.cross_entropy(x_val @ inner["W"] + inner["b"], y_val)

    def test_loss(inner: hypergrad.Tree, outer: hypergrad.Tree) -> torch.Tensor:
        return F.cross_entropy(x_te @ inner["W"] + inner["b"], y_te)

    return Problem(lower_loss, upper_loss, test_loss, x.shape[1], 10)


def solve_inner(lower_loss: Loss, outer: hypergrad.Tree, start: hypergrad.Tree,
                tol: float = 1e-10, max_steps: int = 50) -> tuple[hypergrad.Tree, int]:
    """Newton-CG from ``start`` (warm start) until ||grad_inner L|| <= tol.

    Each Newton step solves H d = -g with hypergrad's own CG on the Hessian operator (inexact:
    relative tolerance min(0.1, sqrt(||g||))), then backtracks until the loss decreases enough.
    Returns ``(inner, Hessian-vector products spent)``.
    """
    def f(p: hypergrad.Tree) -> torch.Tensor:
        return lower_loss(p, outer)

    inner, hvps = dict(start), 0
    for _ in range(max_steps):
        hessian = hypergrad.HessianOperator(f, inner, positive_definite=True)
        graph = hessian.gradient_graph()
        g = {k: v.detach() for k, v in graph.grad.items()}
        gnorm = float(graph.norm())
        if gnorm <= tol:
            break
        sol = hypergrad.CG(maxiter=200, tol=min(0.1, gnorm ** 0.5)).solve(hessian, g)
        hvps += sol.stats.num_hvp
        d = sol.value  # Newton direction is -d
        slope = sum(float((g[k] * d[k]).sum()) for k in g)
        with torch.no_grad():
            f0, t = float(f(inner)), 1.0
            while t > 1e-10:
                trial = {k: inner[k] - t * d[k] for k in inner}
                if float(f(trial)) <= f0 - 1e-4 * t * slope:
                    break
                t /= 2
        inner = trial
    return inner, hvps


def hypergradient(problem: Problem, inner: hypergrad.Tree,
                  outer: hypergrad.Tree) -> tuple[hypergrad.Tree, hypergrad.ImplicitStats]:
    """d(validation loss)/d(log_lam) at the inner solution, by the implicit function theorem."""
    return hypergrad.implicit_grad(
        problem.lower_loss, problem.upper_loss, inner, outer,
        solver=hypergrad.CG(maxiter=1000, tol=1e-10), stationarity_tol=1e-6,
    )


@dataclass
class Trace:
    """What a search did: one entry per inner solve."""

    name: str
    val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    cost: list[int] = field(default_factory=list)  # cumulative HVPs (inner + hypergradient) at each solve
    inner_hvps: int = 0
    hvps: int = 0
    seconds: float = 0.0

    def best(self) -> tuple[float, float]:
        """(best validation loss, test loss at that point)."""
        i = min(range(len(self.val)), key=self.val.__getitem__)
        return self.val[i], self.test[i]


def _evaluate(problem: Problem, trace: Trace, inner: hypergrad.Tree, outer: hypergrad.Tree) -> None:
    trace.cost.append(trace.inner_hvps + trace.hvps)
    with torch.no_grad():
        trace.val.append(float(problem.upper_loss(inner, outer)))
        trace.test.append(float(problem.test_loss(inner, outer)))


def hypergradient_descent(problem: Problem, steps: int, lr: float = 4.0,
                          init: float = -4.0, verbose: bool = True) -> Trace:
    """Normalised gradient descent on log_lam: ``steps`` inner solves and ``steps - 1`` CG solves."""
    trace, t0 = Trace("hypergradient descent (64 L2 weights)"), time.perf_counter()
    outer = {"log_lam": torch.full((problem.num_features,), init, dtype=torch.float64)}
    inner = problem.zeros()
    for step in range(steps):
        inner, hvps = solve_inner(problem.lower_loss, outer, inner)  # warm start
        trace.inner_hvps += hvps
        _evaluate(problem, trace, inner, outer)
        if step == steps - 1:
            break  # the last point is evaluated, not stepped from
        grads, stats = hypergradient(problem, inner, outer)
        trace.hvps += stats.num_hvp
        if verbose:
            print(f"step {step:2d}  val loss {trace.val[-1]:.4f}  Newton-CG {hvps:4d} HVPs, "
                  f"||grad_inner L|| {float(stats.stationarity):.1e}  CG {stats.result.name} "
                  f"after {stats.num_hvp} HVPs")
        g = grads["log_lam"]
        outer = {"log_lam": outer["log_lam"] - lr * g / g.norm()}
    trace.seconds = time.perf_counter() - t0
    return trace


def shared_l2_search(problem: Problem, log_lams: list[float], name: str) -> Trace:
    """Solve the inner problem for each shared log L2 weight (warm-started in the given order)."""
    trace, t0 = Trace(name), time.perf_counter()
    inner = problem.zeros()
    for value in log_lams:
        outer = {"log_lam": torch.full((problem.num_features,), value, dtype=torch.float64)}
        inner, hvps = solve_inner(problem.lower_loss, outer, inner)
        trace.inner_hvps += hvps
        _evaluate(problem, trace, inner, outer)
    trace.seconds = time.perf_counter() - t0
    return trace


def grid(budget: int, low: float = -10.0, high: float = 2.0) -> list[float]:
    """``budget`` log L2 weights evenly spaced in [low, high], large to small (warm starts)."""
    return [high - (high - low) * i / max(budget - 1, 1) for i in range(budget)]


def random_points(budget: int, low: float = -10.0, high: float = 2.0, seed: int = 0) -> list[float]:
    """``budget`` log-uniform draws in [low, high]."""
    u = torch.rand(budget, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (low + (high - low) * u).tolist()


def print_table(traces: list[Trace]) -> None:
    print(f"\n{'method':40s} {'best val':>9s} {'its test':>9s} {'solves':>7s} {'inner HVPs':>10s} "
          f"{'IFT HVPs':>8s} {'time s':>7s}")
    for t in traces:
        val, test = t.best()
        print(f"{t.name:40s} {val:9.4f} {test:9.4f} {len(t.val):7d} {t.inner_hvps:10d} "
              f"{t.hvps:8d} {t.seconds:7.1f}")


def plot(traces: list[Trace], path: str) -> None:
    """Best validation loss so far vs inner solves (left) and vs Hessian-vector products (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for t in traces:
        best = [min(t.val[: i + 1]) for i in range(len(t.val))]
        axes[0].plot(range(1, len(best) + 1), best, marker="o", ms=3, label=t.name)
        axes[1].plot(t.cost, best, marker="o", ms=3, label=t.name)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("inner solves")
    axes[1].set_xlabel("Hessian-vector products (inner solves + hypergradients)")
    axes[0].set_ylabel("best validation loss so far")
    axes[0].legend(fontsize=7)
    fig.suptitle("digits: 64 per-pixel L2 weights by hypergradients vs one shared L2 weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(steps: int = 20, lr: float = 4.0, small: bool = False,
         plot_path: str | None = "digits_l2_hpo.png") -> list[Trace]:
    """Run the three searches at the same number of inner solves; print the table; plot."""
    problem = make_problem(n_train=200, n_val=200) if small else make_problem()
    budget = min(steps, 4) if small else steps
    traces = [
        hypergradient_descent(problem, budget, lr),
        shared_l2_search(problem, grid(budget), f"grid search (shared L2, {budget} points)"),
        shared_l2_search(problem, random_points(budget), f"random search (shared L2, {budget} draws)"),
    ]
    print_table(traces)
    if plot_path:
        plot(traces, plot_path)
        print(f"plot: {plot_path}")
    return traces


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="inner solves per method")
    parser.add_argument("--lr", type=float, default=4.0, help="step length in log_lam space")
    parser.add_argument("--plot", default="digits_l2_hpo.png", help="PNG path ('' = no plot)")
    parser.add_argument("--small", action="store_true", help="tiny data and 4 solves (tests)")
    args = parser.parse_args()
    if not math.isfinite(args.lr) or args.lr <= 0:
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (one step and the point it reaches), got {args.steps}")
    main(args.steps, args.lr, args.small, args.plot or None)
