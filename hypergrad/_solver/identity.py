r"""The zero-product approximation :math:`A^{-1} b \approx s\, b`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._operator import LinearOperator
from .._solution import SolveStats
from .._tree import Tree, tree_batch_norm, tree_scale, tree_sub
from ._base import Callback, Monitor, Solver

__all__ = ["Identity"]


@dataclass(frozen=True)
class Identity(Solver):
    r"""Approximate :math:`A^{-1} b` by :math:`s\,b` with no operator product.

    With ``scale = 1`` this is the Jacobian-free / one-step hypergradient (the implicit term
    uses :math:`H^{-1} \approx I`); with ``scale = xi`` it is the one-step unrolled (DARTS)
    approximation :math:`H^{-1} \approx \xi I`. For BiSSL's :math:`I + H/(\lambda+\delta)`
    with large damping, ``x = v`` is within a few percent of the exact solve.

    Args:
        scale: the factor ``s``.
        compute_residual: spend one product to report the true residual ``||b - s A b||``;
            otherwise the result is ``Result.UNCHECKED``.
    """

    scale: float = 1.0
    compute_residual: bool = False
    maxiter: int = 0

    def _solve(self, operator: LinearOperator, B: Tree, X0: Tree | None,
               callback: Callback | None = None) -> tuple[Tree, SolveStats]:
        X = tree_scale(B, self.scale)
        monitor = Monitor(self, B, B, callback=callback)
        if self.compute_residual:
            residual = tree_batch_norm(tree_sub(B, monitor.product(operator, X)))
            monitor.history[0] = residual
            monitor.nonfinite = monitor.nonfinite | ~torch.isfinite(residual)
            return X, monitor.stats()
        monitor.history[0] = torch.full_like(monitor.rhs_norm, float("nan"))
        return X, monitor.stats(checked=False)
