r"""MINRES for symmetric (possibly indefinite) systems."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._operator import LinearOperator
from .._solution import SolveStats
from .._tree import Tree, tree_axpy, tree_batch_dot, tree_batch_norm, tree_scale, tree_zeros_like
from ._base import Callback, Monitor, Solver, initial_residual, safe_divide

__all__ = ["MINRES"]


@dataclass(frozen=True)
class MINRES(Solver):
    r"""Minimum-residual method (Paige & Saunders) for symmetric, possibly indefinite ``A``.

    Builds the Lanczos basis :math:`v_1, v_2, \dots` of the Krylov space and picks the iterate
    minimising :math:`\|b - A x\|` over it, using Givens rotations on the tridiagonal Lanczos
    matrix. One product per iteration; the residual norm comes from the recurrence
    (:math:`|\bar\phi|`). Unlike CG it is well defined on indefinite systems (the SimCLR
    Hessian), at the price of a slower decrease of the error on SPD ones. Non-positive
    curvature is reported in ``stats.min_curvature`` but is not a breakdown here.
    """

    requires_symmetric: ClassVar[bool] = True

    def _solve(self, operator: LinearOperator, B: Tree, X0: Tree | None,
               callback: Callback | None = None) -> tuple[Tree, SolveStats]:
        X, R, used = initial_residual(operator, B, X0)
        monitor = Monitor(self, B, R, num_hvp=used, callback=callback)
        beta1 = tree_batch_norm(R)
        zero = torch.zeros_like(beta1)
        beta, old_beta = beta1, zero
        r_prev, r_curr, y = tree_zeros_like(R), R, R
        dbar, eps_ln, phibar = zero, zero, beta1
        cs, sn = -torch.ones_like(beta1), zero
        w, w_prev = tree_zeros_like(R), tree_zeros_like(R)
        tiny = torch.finfo(beta1.dtype).tiny
        for _ in range(self.maxiter):
            live = beta > tiny
            v = tree_scale(y, safe_divide(torch.ones_like(beta), beta, live))
            y = monitor.product(operator, v)
            y = tree_axpy(-safe_divide(beta, old_beta, old_beta > tiny), r_prev, y)
            alpha = tree_batch_dot(v, y)
            monitor.curvature(alpha, tree_batch_dot(v, v))
            y = tree_axpy(-safe_divide(alpha, beta, live), r_curr, y)
            r_prev, r_curr = r_curr, y
            old_beta, beta = beta, tree_batch_norm(y)
            # Apply the previous rotation, then build the next one.
            old_eps = eps_ln
            delta = cs * dbar + sn * alpha
            gbar = sn * dbar - cs * alpha
            eps_ln = sn * beta
            dbar = -cs * beta
            gamma = torch.hypot(gbar, beta).clamp_min(tiny)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * phibar
            phibar = sn * phibar
            w_prev, w_old = w, w_prev
            w = tree_scale(tree_axpy(-old_eps, w_old, tree_axpy(-delta, w_prev, v)), 1.0 / gamma)
            X = tree_axpy(phi, w, X)
            if monitor.step(phibar.abs(), X):
                break
        # Lanczos breakdown (beta = 0) means the Krylov space is invariant: the solve is exact,
        # not a failure, so MINRES never reports breakdown from curvature.
        monitor.breakdown = torch.zeros_like(monitor.breakdown)
        return X, monitor.stats()
