r"""Truncated Neumann series (Richardson iteration)."""

from __future__ import annotations

from dataclasses import dataclass

from .._operator import LinearOperator
from .._solution import SolveStats
from .._tree import Tree, tree_axpy, tree_batch_norm
from ._base import Callback, Monitor, Solver, initial_residual

__all__ = ["Neumann"]


@dataclass(frozen=True)
class Neumann(Solver):
    r"""Truncated Neumann series :math:`A^{-1} b \approx \alpha \sum_{j=0}^{K-1} (I - \alpha A)^j b`.

    Run as Richardson iteration from :math:`x_0` (default 0):
    :math:`x \leftarrow x + \alpha r,\ r \leftarrow r - \alpha A r`, so after ``maxiter = K``
    iterations (K products) ``x`` holds K terms of the series and ``r = b - A x`` exactly (up to
    rounding): the reported residual costs nothing extra.

    Converges when every eigenvalue of :math:`I - \alpha A` lies in (-1, 1), i.e. for
    :math:`0 < \alpha < 2/\lambda_{max}(A)` with ``A`` positive definite. No symmetry is needed,
    so it also serves fixed-point (non-symmetric) systems. A series whose final residual is above
    the initial one is reported as ``stats.diverged`` / ``Result.DIVERGED`` (more terms will not
    help; lower ``alpha``). The residual is exact here, so no confirming product is spent.

    Args:
        alpha: step size (a learning rate of the inner problem, typically).
    """

    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"Neumann: alpha must be a number > 0, got {self.alpha!r}; use e.g. 1/L for an L-smooth inner loss")

    def _solve(self, operator: LinearOperator, B: Tree, X0: Tree | None,
               callback: Callback | None = None) -> tuple[Tree, SolveStats]:
        X, R, used = initial_residual(operator, B, X0)
        monitor = Monitor(self, B, R, num_hvp=used, callback=callback)
        for _ in range(self.maxiter):
            X = tree_axpy(self.alpha, R, X)
            R = tree_axpy(-self.alpha, monitor.product(operator, R), R)
            residual = tree_batch_norm(R)
            monitor.diverged = residual > monitor.history[0]
            if monitor.step(residual, X):
                break
        return X, monitor.stats()
