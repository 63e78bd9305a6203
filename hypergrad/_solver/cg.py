r"""Conjugate gradient for symmetric positive definite systems, with optional preconditioning."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._operator import LinearOperator
from .._solution import SolveStats
from .._tree import Tree, tree_axpy, tree_batch_dot, tree_batch_norm, tree_scale
from ._base import Callback, Monitor, Solver, initial_residual, safe_divide

__all__ = ["CG"]


@dataclass(frozen=True)
class CG(Solver):
    r"""(Preconditioned) conjugate gradient, batched over right-hand sides.

    Each iteration costs one product per right-hand side:

    .. math::
        \alpha = \frac{r^\top z}{d^\top A d},\quad x \leftarrow x + \alpha d,\quad
        r \leftarrow r - \alpha A d,\quad z = M^{-1} r,\quad
        \beta = \frac{r_{new}^\top z_{new}}{r^\top z},\quad d \leftarrow z + \beta d.

    CG assumes ``A`` symmetric positive definite. Hessians of non-convex losses are indefinite,
    so the sign of :math:`d^\top A d` is checked on every iteration (on the device): the smallest
    Rayleigh quotient is reported as ``stats.min_curvature`` and non-positive curvature as
    ``stats.breakdown`` (see ``on_breakdown``). A numerically zero curvature
    :math:`0 < d^\top A d / d^\top d \le 10\,\epsilon \max` (a null direction of a singular
    ``A``) is handled like a breakdown and reported as ``stats.singular`` (``Result.SINGULAR``):
    on an inconsistent singular system CG has no solution to find; use :class:`MINRES` for the
    minimum-norm least-squares one. Scalars accumulate in at least float32.

    Args:
        preconditioner: optional symmetric positive definite map ``r -> M^{-1} r`` on batched
            trees (leading dimension k), e.g. :class:`hypergrad.NystromPreconditioner`.

    The other arguments are those of :class:`hypergrad.Solver`.

    Example:
        >>> sol = CG(maxiter=50, tol=1e-10).solve(MatrixOperator(A), {"x": b})
        >>> x, result, stats = sol
    """

    preconditioner: Callable[[Tree], Tree] | None = None

    requires_symmetric: ClassVar[bool] = True

    def _solve(self, operator: LinearOperator, B: Tree, X0: Tree | None,
               callback: Callback | None = None) -> tuple[Tree, SolveStats]:
        X, R, used = initial_residual(operator, B, X0)
        monitor = Monitor(self, B, R, num_hvp=used, callback=callback)
        X = self._iterate(operator, X, R, monitor, self.preconditioner)
        monitor.finish(operator, B, X)
        return X, monitor.stats()

    def _iterate(self, operator: LinearOperator, X: Tree, R: Tree, monitor: Monitor,
                 preconditioner: Callable[[Tree], Tree] | None) -> Tree:
        """Up to ``maxiter`` CG iterations from the iterate ``X`` with residual ``R = B - A X``."""
        precondition = preconditioner or (lambda r: r)
        Z = precondition(R)
        D = Z
        rz = tree_batch_dot(R, Z)
        active = torch.ones_like(rz, dtype=torch.bool)
        for _ in range(self.maxiter):
            AD = monitor.product(operator, D)
            dAd = tree_batch_dot(D, AD)
            dd = tree_batch_dot(D, D)
            bad = monitor.curvature(dAd, dd)
            # A numerically zero pivot d.Ad ~ 0 (a null direction of a singular A) would give a
            # huge step: treat it as a breakdown of its own kind (reported as SINGULAR).
            bad = bad | monitor.zero_pivot(safe_divide(dAd, dd, dd > 0), monitor.history[-1])
            if self.freezes_on_breakdown:
                active = active & ~bad
                alpha = safe_divide(rz, dAd, active & ~(dAd <= 0))  # NaN passes through
            else:
                alpha = safe_divide(rz, dAd, dAd != 0)
            X = tree_axpy(alpha, D, X)
            R = tree_axpy(-alpha, AD, R)
            Z = precondition(R)
            rz_new = tree_batch_dot(R, Z)
            beta = safe_divide(rz_new, rz, rz != 0)
            if self.freezes_on_breakdown:
                # A frozen right-hand side keeps its direction: d <- 0 * z + 1 * d.
                D = tree_axpy(torch.where(active, beta, torch.ones_like(beta)), D,
                              tree_scale(Z, active.to(rz.dtype)))
                rz = torch.where(active, rz_new, rz)
            else:
                D = tree_axpy(beta, D, Z)
                rz = rz_new
            if monitor.step(tree_batch_norm(R), X):
                break
        return X
