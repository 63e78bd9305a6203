r"""MINRES for symmetric (possibly indefinite or singular) systems."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._operator import LinearOperator
from .._solution import SolveStats
from .._tree import Tree, tree_axpy, tree_batch_dot, tree_batch_norm, tree_scale, tree_zeros_like
from ._base import PIVOT_RTOL, Callback, Monitor, Solver, initial_residual, safe_divide

__all__ = ["MINRES"]


def _where(mask: Tensor, a: Tree, b: Tree) -> Tree:
    """Per right-hand side: ``a`` where ``mask`` (shape ``(k,)``), else ``b``."""
    return {key: torch.where(mask.reshape((-1,) + (1,) * (a[key].dim() - 1)), a[key], b[key]) for key in a}


@dataclass(frozen=True)
class MINRES(Solver):
    r"""Minimum-residual method (Paige & Saunders) for symmetric, possibly indefinite ``A``.

    Builds the Lanczos basis :math:`v_1, v_2, \dots` of the Krylov space and picks the iterate
    minimising :math:`\|b - A x\|` over it, using Givens rotations on the tridiagonal Lanczos
    matrix :math:`T_k`. One product per iteration; the residual norm comes from the recurrence
    (:math:`|\bar\phi|`). Unlike CG it is well defined on indefinite systems (the SimCLR
    Hessian), at the price of a slower decrease of the error on SPD ones. Non-positive
    curvature is reported in ``stats.min_curvature`` but is not a breakdown here.

    **Singular systems.** From :math:`x_0 = 0` the iterates lie in
    :math:`\mathcal K_k(A, b)`. Two events end the iteration for a right-hand side, each tested
    relative to the largest Lanczos entry seen (``PIVOT_RTOL * eps``):

    * the Lanczos vector vanishes (:math:`\beta_{k+1} \approx 0`, an invariant Krylov space) with
      :math:`T_k` non-singular: the least-squares problem over the space is solved exactly. For
      a consistent system (:math:`b \in \mathrm{range}(A)`) the Krylov space lies in
      :math:`\mathrm{range}(A)`, so the iterate is the **minimum-norm solution**
      :math:`A^+ b`;
    * the rotated pivot :math:`\gamma_k` vanishes (:math:`T_k` singular: :math:`b` has a
      component in the null space, an inconsistent system). The step would divide by zero, so
      the iterate stays :math:`x_{k-1}`, a least-squares solution, and ``stats.singular`` is set
      (``Result.SINGULAR``). With a tolerance, the confirming true residual
      :math:`r = b - A x` lies in the null space (its Krylov part), and the iterate is projected
      to :math:`x - \frac{r^\top x}{r^\top r} r`: the **minimum-norm least-squares solution**
      :math:`A^+ b` (the answer MINRES-QLP gives), at no extra product. A fixed-iteration solve
      keeps :math:`x_{k-1}` (least squares, not minimum norm).
    """

    requires_symmetric: ClassVar[bool] = True

    def _solve(self, operator: LinearOperator, B: Tree, X0: Tree | None,
               callback: Callback | None = None) -> tuple[Tree, SolveStats]:
        X, R, used = initial_residual(operator, B, X0)
        monitor = Monitor(self, B, R, num_hvp=used, callback=callback)
        beta1 = tree_batch_norm(R)
        zero = torch.zeros_like(beta1)
        one = torch.ones_like(beta1)
        beta, old_beta = beta1, zero
        r_prev, r_curr, y = tree_zeros_like(R), R, R
        dbar, eps_ln, phibar = zero, zero, beta1
        cs, sn = -one, zero
        w, w_prev = tree_zeros_like(R), tree_zeros_like(R)
        rtol = PIVOT_RTOL * monitor.eps
        loose = monitor.eps ** 0.5
        anorm = zero  # largest Lanczos column norm seen: an estimate of ||A|| on the Krylov space
        active = beta1 > 0
        for _ in range(self.maxiter):
            v = tree_scale(y, safe_divide(one, beta, active))
            y = monitor.product(operator, v)
            y = tree_axpy(-safe_divide(beta, old_beta, old_beta > 0), r_prev, y)
            alpha = tree_batch_dot(v, y)
            monitor.curvature(alpha, tree_batch_dot(v, v), is_breakdown=False)  # fine for MINRES
            y = tree_axpy(-safe_divide(alpha, beta, active), r_curr, y)
            r_prev, r_curr = r_curr, y
            old_beta, beta = beta, tree_batch_norm(y)
            anorm = torch.maximum(anorm, torch.sqrt(old_beta**2 + alpha**2 + beta**2))
            # Apply the previous rotation, then build the next one.
            old_eps = eps_ln
            delta = cs * dbar + sn * alpha
            gbar = sn * dbar - cs * alpha
            eps_ln = sn * beta
            dbar = -cs * beta
            gamma = torch.hypot(gbar, beta)
            # Already solved to rounding level: a near-zero pivot now is noise, not singularity.
            solved = phibar.abs() <= rtol * beta1
            # ||A r_{k-1}|| = phibar_{k-1} * hypot(gbar_k, dbar_{k+1}) (Choi, Paige & Saunders 2011):
            # at ~0 with r_{k-1} != 0, x_{k-1} already solves the least-squares problem and b has a
            # null-space part (inconsistent system). Stop there: the next pivot would be ~0.
            least_squares = phibar.abs() * torch.hypot(gbar, dbar) <= loose * anorm * phibar.abs()
            zero_pivot = active & (least_squares | (gamma <= rtol * anorm)) & ~solved
            monitor.singular = monitor.singular | zero_pivot
            zero_pivot = zero_pivot | (active & solved & (gamma <= rtol * anorm))
            step_ok = active & ~zero_pivot
            gamma_safe = torch.where(step_ok, gamma, one)
            cs = torch.where(step_ok, gbar / gamma_safe, cs)
            sn = torch.where(step_ok, beta / gamma_safe, sn)
            phi = torch.where(step_ok, cs * phibar, zero)
            phibar = torch.where(step_ok, sn * phibar, phibar)
            w_new = tree_scale(tree_axpy(-old_eps, w_prev, tree_axpy(-delta, w, v)), 1.0 / gamma_safe)
            w_prev, w = _where(step_ok, w, w_prev), _where(step_ok, w_new, w)
            X = tree_axpy(phi, w, X)
            # An invariant Krylov space (beta ~ 0) or a singular step ends this right-hand side.
            active = step_ok & (beta > rtol * anorm)
            if monitor.step(phibar.abs(), X):
                break
        if self.checks_enabled and monitor.iterations > 0:
            X = self._minimum_norm(operator, B, X, monitor, anorm)
        return X, monitor.stats()

    @staticmethod
    def _minimum_norm(operator: LinearOperator, B: Tree, X: Tree, monitor: Monitor, anorm: Tensor) -> Tree:
        r"""Confirm by the true residual :math:`r = b - Ax`; on an inconsistent singular system, return
        the minimum-norm least-squares solution.

        A right-hand side that missed the tolerance is tested for least-squares optimality with one
        more product: :math:`\|A r\| \le \sqrt{\epsilon}\,\|A\|\,\|r\|` means :math:`b` has a
        null-space part that no :math:`x` can fit (the system is inconsistent), so the solve is
        ``SINGULAR``. The Krylov space meets the null space only along :math:`r`, so removing the
        iterate's component along :math:`r` leaves :math:`A x` unchanged and gives :math:`A^+ b`.
        """
        R = monitor.verify(operator, B, X)
        missed = monitor.true_residual > monitor.threshold  # type: ignore[operator]
        if bool(missed.any()):  # a tolerance solve reads values on the host anyway
            AR = monitor.product(operator, R)
            rnorm = tree_batch_norm(R)
            least_squares = missed & (tree_batch_norm(AR) <= monitor.eps ** 0.5 * anorm * rnorm)
            monitor.singular = monitor.singular | least_squares
        rr = tree_batch_dot(R, R)
        coeff = safe_divide(tree_batch_dot(R, X), rr, monitor.singular & (rr > 0))
        return tree_axpy(-coeff, R, X)
