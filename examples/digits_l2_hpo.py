"""Hyperparameter optimisation with implicit hypergradients: one L2 weight per pixel.

Inner problem: multinomial logistic regression on scikit-learn's digits (training split), with a
penalty ``sum_j exp(log_lam_j) * ||W[:, j]||^2 / 2`` per input pixel j. Outer problem: the
validation cross-entropy, minimised over ``log_lam`` by gradient descent with hypergradients from
:func:`hypergrad.implicit_grad` (conjugate gradient on the inner Hessian).

Run: ``python examples/digits_l2_hpo.py [--steps 15]``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import hypergrad


def load(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Standardised digits features, split 50/50 into train and validation."""
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float64) / 16.0
    y = torch.as_tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    half = len(y) // 2
    return x[:half], y[:half], x[half:], y[half:]


def main(steps: int = 15, lr: float = 1.0) -> list[float]:
    x_tr, y_tr, x_val, y_val = load()
    num_features, num_classes = x_tr.shape[1], 10

    def lower_loss(inner: hypergrad.Tree, outer: hypergrad.Tree) -> torch.Tensor:
        logits = x_tr @ inner["W"] + inner["b"]  # (N, 10)
        penalty = 0.5 * (outer["log_lam"].exp() * (inner["W"] ** 2).sum(dim=1)).sum()
        return F.cross_entropy(logits, y_tr) + penalty

    def upper_loss(inner: hypergrad.Tree, outer: hypergrad.Tree) -> torch.Tensor:
        return F.cross_entropy(x_val @ inner["W"] + inner["b"], y_val)

    def solve_inner(outer: hypergrad.Tree, start: hypergrad.Tree) -> hypergrad.Tree:
        inner = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        opt = torch.optim.LBFGS(list(inner.values()), lr=1.0, max_iter=500, tolerance_grad=1e-10,
                                tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = lower_loss(inner, outer)
            loss.backward()
            return loss

        opt.step(closure)
        return {k: v.detach() for k, v in inner.items()}

    outer = {"log_lam": torch.full((num_features,), -4.0, dtype=torch.float64)}
    inner = {"W": torch.zeros(num_features, num_classes, dtype=torch.float64),
             "b": torch.zeros(num_classes, dtype=torch.float64)}
    history = []
    for step in range(steps):
        inner = solve_inner(outer, inner)  # warm start from the previous solution
        grads, stats = hypergrad.implicit_grad(
            lower_loss, upper_loss, inner, outer,
            solver=hypergrad.CG(maxiter=100, tol=1e-8), stationarity_tol=1e-6,
        )
        val = float(stats.upper_loss)
        history.append(val)
        print(f"step {step:2d}  val loss {val:.4f}  CG {stats.result.name} after "
              f"{stats.num_hvp} HVPs  ||grad_inner L|| {float(stats.stationarity):.1e}")
        outer = {"log_lam": outer["log_lam"] - lr * grads["log_lam"] / grads["log_lam"].norm()}
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1.0, help="step length in log_lam space")
    args = parser.parse_args()
    main(args.steps, args.lr)
