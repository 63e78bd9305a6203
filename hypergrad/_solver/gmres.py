r"""GMRES for general (non-symmetric) systems, e.g. fixed-point hypergradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._operator import LinearOperator
from .._solution import SolveStats
from .._tree import Tree, tree_axpy, tree_batch_dot, tree_batch_norm, tree_scale
from ._base import PIVOT_RTOL, Callback, Monitor, Solver, initial_residual, safe_divide

__all__ = ["GMRES"]


@dataclass(frozen=True)
class GMRES(Solver):
    r"""Generalised minimal residual method (Saad & Schultz), batched over right-hand sides.

    Builds an orthonormal basis :math:`V` of the Krylov space by Arnoldi with modified
    Gram-Schmidt, and picks :math:`x = x_0 + V y` minimising :math:`\|b - A x\|`; Givens
    rotations keep that least-squares problem triangular, so the residual norm is known after
    every iteration at no extra cost. One product per iteration; no symmetry needed, so it
    suits :func:`hypergrad.fixed_point_grad` when the fixed-point map is not a contraction
    (where :class:`Neumann` diverges). Memory grows as ``maxiter`` trees (no restarts): keep
    ``maxiter`` modest for large models.

    A zero pivot of the rotated Hessenberg matrix (an invariant Krylov space that does not
    contain the solution: a singular, inconsistent system) ends that right-hand side at the
    least-squares iterate over the earlier columns and is reported as ``Result.SINGULAR``.
    """

    supports_callback: ClassVar[bool] = False

    def _solve(self, operator: LinearOperator, B: Tree, X0: Tree | None,
               callback: Callback | None = None) -> tuple[Tree, SolveStats]:
        X, R, used = initial_residual(operator, B, X0)
        monitor = Monitor(self, B, R, num_hvp=used, callback=callback)
        beta = tree_batch_norm(R)  # (k,)
        tiny = torch.finfo(beta.dtype).tiny
        rtol = PIVOT_RTOL * monitor.eps
        basis = [tree_scale(R, safe_divide(torch.ones_like(beta), beta, beta > tiny))]
        k, m = beta.shape[0], self.maxiter
        hess = beta.new_zeros(k, m + 1, m)  # rotated Hessenberg matrix, upper triangular part
        cs, sn = beta.new_zeros(k, m), beta.new_zeros(k, m)
        g = beta.new_zeros(k, m + 1)
        g[:, 0] = beta
        hnorm = torch.zeros_like(beta)  # largest Hessenberg column norm seen (~ ||A|| on the space)
        active = beta > 0
        valid = torch.zeros_like(beta, dtype=torch.long)  # columns used by each right-hand side
        steps = 0
        for j in range(m):
            W = monitor.product(operator, basis[j])
            column = []
            for i in range(j + 1):  # modified Gram-Schmidt
                h = tree_batch_dot(W, basis[i])
                W = tree_axpy(-h, basis[i], W)
                column.append(h)
            norm = tree_batch_norm(W)
            column.append(norm)
            basis.append(tree_scale(W, safe_divide(torch.ones_like(norm), norm, norm > tiny)))
            col = torch.stack(column, dim=1)  # (k, j + 2)
            hnorm = torch.maximum(hnorm, torch.linalg.vector_norm(col, dim=1))
            for i in range(j):  # previous rotations
                a, b = col[:, i].clone(), col[:, i + 1].clone()
                col[:, i] = cs[:, i] * a + sn[:, i] * b
                col[:, i + 1] = -sn[:, i] * a + cs[:, i] * b
            denom = torch.hypot(col[:, j], col[:, j + 1])
            # A zero pivot: A v_j lies in the span of the earlier A v_i (an invariant Krylov space
            # in which b is not reachable), so the least-squares problem gains nothing from v_j.
            # Keep the earlier columns and the residual |g_j|; unless already solved, the system is
            # singular (b has a part outside A's range on this space).
            ok = active & (denom > rtol * hnorm)
            solved = g[:, j].abs() <= rtol * g[:, 0]
            monitor.singular = monitor.singular | (active & ~ok & ~solved)
            safe = torch.where(ok, denom, torch.ones_like(denom))
            cs[:, j] = torch.where(ok, col[:, j] / safe, torch.ones_like(denom))
            sn[:, j] = torch.where(ok, col[:, j + 1] / safe, torch.zeros_like(denom))
            col[:, j] = torch.where(ok, denom, col[:, j])
            col[:, j + 1] = 0
            hess[:, : j + 2, j] = col
            g[:, j + 1] = torch.where(ok, -sn[:, j] * g[:, j], g[:, j])
            g[:, j] = torch.where(ok, cs[:, j] * g[:, j], g[:, j])
            valid = valid + ok.long()
            # An exhausted Krylov space (h_{j+1,j} ~ 0) ends this right-hand side: the solve is exact there.
            active = ok & (norm > rtol * hnorm)
            steps = j + 1
            if monitor.step(g[:, j + 1].abs()):
                break
        if steps > 0:
            kept = torch.arange(steps, device=valid.device) < valid[:, None]  # (k, steps)
            both = kept[:, :, None] & kept[:, None, :]
            eye = torch.eye(steps, dtype=hess.dtype, device=hess.device).expand(k, steps, steps)
            upper = torch.where(both, hess[:, :steps, :steps], eye)
            rhs = torch.where(kept, g[:, :steps], torch.zeros_like(g[:, :steps]))
            y = torch.linalg.solve_triangular(upper, rhs[..., None], upper=True)[..., 0]  # (k, steps)
            for i in range(steps):
                X = tree_axpy(y[:, i], basis[i], X)
        monitor.finish(operator, B, X)
        return X, monitor.stats()
