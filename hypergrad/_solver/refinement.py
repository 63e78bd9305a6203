r"""Iterative refinement: inexact inner corrections (cheap operator) under exact outer residuals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._operator import LinearOperator
from .._solution import SolveStats
from .._tree import Tree, tree_axpy, tree_batch_norm, tree_sub
from ._base import Callback, Monitor, Solver, initial_residual
from .cg import CG

__all__ = ["Refinement"]

DEFAULT_INNER = CG(maxiter=2, tol=0.0)  # immutable, so one shared default instance is safe


@dataclass(frozen=True)
class Refinement(Solver):
    r"""Iterative refinement: each outer step solves for a correction with a cheap inner solve.

    .. math::
        d_j \approx M^{-1} r_j \ \text{(inner solver on the inner operator } M),\qquad
        x_{j+1} = x_j + d_j,\qquad r_{j+1} = b - A x_{j+1}\ \text{(one product with } A).

    From :math:`x_0 = 0` the first correction needs no product with ``A`` (:math:`r_0 = b`). The
    error obeys :math:`e_{j+1} = A^{-1} r_j - d_j`: **each outer step contracts the error by the
    inner solve's relative accuracy on** :math:`r_j`, measured against :math:`A^{-1}` — about
    the inner solver's own relative error on :math:`M` plus the mismatch
    :math:`\|I - M^{-1} A\|`. As long as that is below 1 the iteration converges to the solution
    of :math:`A x = b` however inexact :math:`M` is: the residuals with ``A`` remove ``M``'s bias.

    Two levers, one solver:

    * **mixed precision** — ``inner_operator = hypergrad.low_precision(A)``: bfloat16/float16
      products in the corrections, float32 residuals, vectors and Krylov scalars. bfloat16
      products alone plateau at their rounding level (~1e-2); refinement does not.
    * **a cheap operator as preconditioner** — ``inner_operator`` = the Hessian of a sub-batch
      (optionally lowered too), or any cheaper approximation of ``A``.

    ``inner`` is one solver for every correction, or a tuple: correction ``j`` uses ``inner[j]``
    (the last one repeats). ``(CG(maxiter=2, tol=0.0), Identity())`` runs 2 inner CG iterations,
    one residual, then the product-free correction :math:`d = r` (good when
    :math:`A \approx I`, as BiSSL's :math:`I + H/(\lambda+\delta)`).

    Cost (``maxiter = J`` corrections, fixed iterations): the inner solves' products with ``M``
    (``stats.inner_hvp``; in ``stats.num_hvp`` when ``inner_operator`` is ``None``) plus
    :math:`J - 1` products with ``A`` (``stats.num_hvp``), plus one for the final residual with
    ``true_residual=True``. Without it (``true_residual=False`` and ``tol = atol = 0``) the
    last correction is not checked: ``stats.residual_norm`` is then the last inner solve's
    residual :math:`\|r - M d\|` (an estimate that ignores :math:`M \ne A`; NaN after an
    ``Identity`` correction) and the result is ``Result.UNCHECKED``. With a tolerance every residual is the true one (no confirming product
    is needed) and the solve stops at the first outer step that meets it. A residual above the
    initial one is reported as ``Result.DIVERGED`` (the corrections do not contract: make the
    inner solve more accurate, or ``M`` closer to ``A``).

    Breakdowns, non-finite values and the smallest curvature of the inner solves (seen through
    ``M``) are reported in the stats; with ``on_breakdown="stop"`` a right-hand side whose inner
    solve broke down keeps its iterate from then on.

    Args:
        inner: the inner solver, or a tuple of them (one per correction, the last repeats).
            Fixed-iteration inner solvers (``tol=0``) never synchronise with the device.
        inner_operator: ``M``; ``None`` uses ``A`` itself (plain restarted refinement).
        true_residual: spend one product with ``A`` on the final residual of a
            fixed-iteration solve (see above).
        maxiter: outer steps (corrections).

    The other arguments are those of :class:`hypergrad.Solver`.

    Example:
        >>> low = hypergrad.low_precision(A)  # built once, reused by every solve
        >>> solver = Refinement(inner=CG(maxiter=2, tol=0.0), inner_operator=low, maxiter=3, tol=0.0)
        >>> x, result, stats = solver.solve(A, b)
    """

    inner: Solver | tuple[Solver, ...] = DEFAULT_INNER
    inner_operator: LinearOperator | None = None
    true_residual: bool = True
    maxiter: int = 3

    requires_symmetric: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        inner = self.inner if isinstance(self.inner, tuple) else (self.inner,)
        if not inner or not all(isinstance(s, Solver) for s in inner):
            raise ValueError(f"Refinement: inner must be a hypergrad solver or a non-empty tuple of them, "
                             f"got {self.inner!r}; e.g. inner=hypergrad.CG(maxiter=2, tol=0.0)")
        if self.inner_operator is not None and not isinstance(self.inner_operator, LinearOperator):
            raise ValueError(f"Refinement: inner_operator must be None or a hypergrad.LinearOperator, got "
                             f"{type(self.inner_operator).__name__}; e.g. hypergrad.low_precision(operator)")
        if not isinstance(self.true_residual, bool):
            raise ValueError(f"Refinement: true_residual must be a bool, got {self.true_residual!r}")

    @property
    def inner_solvers(self) -> tuple[Solver, ...]:
        return self.inner if isinstance(self.inner, tuple) else (self.inner,)

    def inner_at(self, step: int) -> Solver:
        """The inner solver of correction ``step`` (0-based; the last one repeats)."""
        solvers = self.inner_solvers
        return solvers[min(step, len(solvers) - 1)]

    @property
    def reads_values(self) -> bool:
        return super().reads_values or any(s.reads_values for s in self.inner_solvers)

    def _solve(self, operator: LinearOperator, B: Tree, X0: Tree | None,
               callback: Callback | None = None) -> tuple[Tree, SolveStats]:
        X, R, used = initial_residual(operator, B, X0)
        monitor = Monitor(self, B, R, num_hvp=used, callback=callback)
        inner_operator = operator if self.inner_operator is None else self.inner_operator
        active = torch.ones_like(monitor.rhs_norm, dtype=torch.bool)
        checked = True
        for step in range(self.maxiter):
            solution = self.inner_at(step).solve(inner_operator, R, batched=True)
            inner = solution.stats
            if self.inner_operator is None:
                monitor.num_hvp += inner.num_hvp
            else:
                monitor.inner_hvp += inner.num_hvp
            monitor.inner_hvp += inner.inner_hvp
            self._absorb(monitor, inner)
            if self.freezes_on_breakdown:
                active = active & ~inner.breakdown
            X = tree_axpy(active.to(monitor.rhs_norm.dtype), solution.value, X)
            if step == self.maxiter - 1 and not (self.true_residual or self.checks_enabled):
                # No product for the last residual: report the inner solve's ||r - M d|| (unchecked;
                # NaN when the inner solve has no residual either, e.g. Identity, which is not a fault).
                estimate = torch.where(active, inner.residual_norm.to(monitor.rhs_norm.dtype), monitor.history[-1])
                nonfinite = monitor.nonfinite | (inner.nonfinite & active)
                monitor.true_residual = None
                monitor.step(estimate, X)
                monitor.nonfinite = nonfinite
                checked = False
                break
            R = tree_sub(B, monitor.product(operator, X))
            residual = tree_batch_norm(R)
            monitor.true_residual = residual
            monitor.diverged = residual > monitor.history[0]
            if monitor.step(residual, X):
                break
        return X, monitor.stats(checked=checked)

    @staticmethod
    def _absorb(monitor: Monitor, inner: SolveStats) -> None:
        """Carry the inner solve's breakdown, non-finite and curvature flags into the outer stats."""
        monitor.breakdown = monitor.breakdown | inner.breakdown
        monitor.nonfinite = monitor.nonfinite | inner.nonfinite
        if inner.min_curvature is not None:
            low = inner.min_curvature.to(monitor.rhs_norm.dtype)
            monitor.min_curvature = low if monitor.min_curvature is None else torch.minimum(monitor.min_curvature, low)
