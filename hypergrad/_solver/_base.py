"""Shared machinery of the iterative solvers: validation, batching, bookkeeping."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .._errors import NonFiniteError, OperatorTagError, SolverBreakdownError, TransformError
from .._func import vmap_active
from .._operator import LinearOperator
from .._solution import Result, Solution, SolveStats
from .._tree import Tree, check_compatible, tree_batch_norm

BreakdownPolicy = Literal["stop", "continue", "raise"]
NonfinitePolicy = Literal["report", "raise"]
Callback = Callable[[int, Tree], None]


def _batch_size(B: Mapping[str, Tensor]) -> int:
    return next(iter(B.values())).shape[0]


PIVOT_RTOL = 10.0
"""A pivot (Rayleigh quotient, Lanczos or Hessenberg entry) at most ``PIVOT_RTOL * eps * scale``
is numerically zero: ``scale`` is the largest such quantity seen, ``eps`` the leaves' precision."""


def leaf_eps(B: Mapping[str, Tensor]) -> float:
    """Machine epsilon of the leaves' dtype (the precision the products are computed in)."""
    return float(torch.finfo(next(iter(B.values())).dtype).eps)


class Monitor:
    """Bookkeeping of one batched solve: residual history, HVP count, breakdown, singularity and NaN flags."""

    def __init__(self, solver: Solver, B: Tree, R0: Tree, num_hvp: int = 0,
                 callback: Callback | None = None) -> None:
        self.solver = solver
        self.callback = callback
        self.rhs_norm = tree_batch_norm(B)
        self.stop_threshold = torch.clamp_min(solver.tol * self.rhs_norm, solver.atol)
        self.threshold = torch.clamp_min(solver.reporting_tol * self.rhs_norm, solver.atol)
        self.history = [tree_batch_norm(R0)]
        self.nonfinite = ~torch.isfinite(self.rhs_norm) | ~torch.isfinite(self.history[0])
        self.breakdown = torch.zeros_like(self.nonfinite)
        self.singular = torch.zeros_like(self.nonfinite)
        self.diverged = torch.zeros_like(self.nonfinite)  # set by solvers that can diverge (Neumann)
        self.inaccurate = torch.zeros_like(self.nonfinite)
        self.min_curvature: Tensor | None = None
        self.max_curvature: Tensor | None = None
        self.true_residual: Tensor | None = None
        self.num_hvp = num_hvp
        self.inner_hvp = 0  # products with a second, cheaper operator (Refinement)
        self.iterations = 0
        self.eps = leaf_eps(B)

    def product(self, operator: LinearOperator, X: Tree) -> Tree:
        """Apply the operator to k stacked trees and count k products."""
        self.num_hvp += _batch_size(X)
        return operator.matmat(X)

    def curvature(self, dAd: Tensor, dd: Tensor, *, is_breakdown: bool = True) -> Tensor:
        """Record the Rayleigh quotients d.Ad/d.d; return the mask of non-positive curvature.

        With ``is_breakdown`` (CG-type solvers) non-positive curvature is also a breakdown.
        """
        quotient = torch.where(dd > 0, dAd / dd.clamp_min(torch.finfo(dd.dtype).tiny),
                               torch.full_like(dAd, float("inf")))
        self.min_curvature = quotient if self.min_curvature is None else torch.minimum(self.min_curvature, quotient)
        seen = torch.where(torch.isfinite(quotient), quotient.abs(), torch.zeros_like(quotient))
        self.max_curvature = seen if self.max_curvature is None else torch.maximum(self.max_curvature, seen)
        self.nonfinite = self.nonfinite | ~torch.isfinite(dAd)
        bad = (dAd <= 0) & (dd > 0)
        if is_breakdown:
            self.breakdown = self.breakdown | bad
        return bad

    def zero_pivot(self, quotient: Tensor, residual_norm: Tensor) -> Tensor:
        """Mask of numerically zero positive curvature ``0 < q <= PIVOT_RTOL * eps * max q`` met
        while the residual is still above rounding level: a singular direction. Records it."""
        scale = quotient.abs() if self.max_curvature is None else self.max_curvature
        tiny = PIVOT_RTOL * self.eps
        unsolved = residual_norm > 10 * tiny * self.rhs_norm
        mask = (quotient > 0) & (quotient <= tiny * scale) & unsolved
        self.singular = self.singular | mask
        return mask

    def step(self, residual_norm: Tensor, X: Tree | None = None) -> bool:
        """Record an iteration (and show the iterate ``X`` to the callback); return True when done.

        Synchronises with the device only on the solver's check interval.
        """
        self.iterations += 1
        if self.callback is not None and X is not None:
            self.callback(self.iterations, X)
        self.history.append(residual_norm)
        self.nonfinite = self.nonfinite | ~torch.isfinite(residual_norm)
        if not self.solver.checks_enabled or self.iterations % self.solver.check_every_or_one != 0:
            return False
        finished = (residual_norm <= self.stop_threshold) | self.nonfinite
        if self.solver.on_breakdown != "continue":
            finished = finished | self.breakdown | self.singular
        return bool(finished.all())

    def verify(self, operator: LinearOperator, B: Tree, X: Tree) -> Tree:
        """Spend one product per right-hand side on the true residual ``B - A X``; record its norm.

        A recurrence that claimed convergence while the truth misses the tolerance (rounding drift)
        marks the solve inaccurate.
        Returns the true residual tree.
        """
        AX = self.product(operator, X)
        R = {k: B[k] - AX[k] for k in B}
        true_norm = tree_batch_norm(R)
        recurrence = self.history[-1]
        claimed = recurrence <= self.stop_threshold
        drifted = claimed & (true_norm > self.threshold)
        self.inaccurate = self.inaccurate | drifted
        self.nonfinite = self.nonfinite | ~torch.isfinite(true_norm)
        self.true_residual = true_norm
        return R

    def finish(self, operator: LinearOperator, B: Tree, X: Tree) -> None:
        """Confirm a solve with a tolerance by its true residual (one product per right-hand side).

        Fixed-iteration solves (``tol = atol = 0`` or ``check_every=None``) spend nothing here.
        """
        if self.true_residual is None and self.solver.checks_enabled and self.iterations > 0:
            self.verify(operator, B, X)

    def stats(self, *, checked: bool = True) -> SolveStats:
        source = "none" if not checked else ("true" if self.true_residual is not None else "recurrence")
        return SolveStats(
            solver=type(self.solver).__name__,
            iterations=self.iterations,
            num_hvp=self.num_hvp,
            residual_norm=self.history[-1] if self.true_residual is None else self.true_residual,
            rhs_norm=self.rhs_norm,
            residual_history=torch.stack(self.history),
            threshold=self.threshold,
            breakdown=self.breakdown,
            nonfinite=self.nonfinite,
            min_curvature=self.min_curvature,
            singular=self.singular,
            diverged=self.diverged,
            inaccurate=self.inaccurate,
            checked=checked,
            residual_source=source,
            inner_hvp=self.inner_hvp,
        )


@dataclass(frozen=True)
class Solver(abc.ABC):
    r"""An immutable, validated solver configuration for :math:`A x = b`.

    Args:
        maxiter: iterations (each costs one operator product per right-hand side).
        tol: relative tolerance: stop when :math:`\|b - Ax\| \le \max(tol\,\|b\|, atol)`.
        atol: absolute tolerance.
        check_every: check convergence every this many iterations (each check synchronises
            with the device once). ``None``, or ``tol = atol = 0``, runs exactly ``maxiter``
            iterations with no host synchronisation at all.
        on_breakdown: at non-positive curvature, ``"stop"`` freezes that right-hand side's
            iterate (reported in the stats), ``"continue"`` keeps iterating (reported too),
            ``"raise"`` stops and raises :class:`SolverBreakdownError` after the solve.
        on_nonfinite: ``"report"`` flags NaN/inf in the stats; ``"raise"`` raises
            :class:`NonFiniteError` after the solve. Values are never zeroed.
        report_tol: relative tolerance used only to *report* the result after the solve
            (``Result.CONVERGED`` when :math:`\|b - Ax\| \le \max(report\_tol\,\|b\|, atol)`),
            without any check inside the loop: a fixed-iteration solve (``tol=0``) can say
            afterwards whether it met it. ``None`` reports against ``tol``.

    Honesty: a solve with a tolerance (:attr:`checks_enabled`) confirms its outcome with the
    true residual :math:`\|b - Ax\|` (one more product per right-hand side, counted in
    ``num_hvp``), which ``stats.residual_norm`` then holds (``residual_source == "true"``); a
    zero pivot or an invariant Krylov subspace that does not contain the solution is reported as
    ``Result.SINGULAR``, a recurrence that claimed convergence the truth does not confirm as
    ``Result.INACCURATE``.
    Fixed-iteration solves spend no extra product and report the recurrence.
    """

    maxiter: int = 100
    tol: float = 1e-6
    atol: float = 0.0
    check_every: int | None = 1
    on_breakdown: BreakdownPolicy = "stop"
    on_nonfinite: NonfinitePolicy = "report"
    report_tol: float | None = None

    requires_symmetric: ClassVar[bool] = False
    supports_callback: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.maxiter, bool) or not isinstance(self.maxiter, int) or self.maxiter < 0:
            raise ValueError(f"{name}: maxiter must be a non-negative int, got {self.maxiter!r}")
        for field_name in ("tol", "atol"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}: {field_name} must be a number >= 0, got {value!r}")
        if self.check_every is not None and (not isinstance(self.check_every, int) or self.check_every < 1):
            raise ValueError(f"{name}: check_every must be None or an int >= 1, got {self.check_every!r}")
        if self.on_breakdown not in ("stop", "continue", "raise"):
            raise ValueError(f"{name}: on_breakdown must be 'stop', 'continue' or 'raise', got {self.on_breakdown!r}")
        if self.on_nonfinite not in ("report", "raise"):
            raise ValueError(f"{name}: on_nonfinite must be 'report' or 'raise', got {self.on_nonfinite!r}")
        if self.report_tol is not None and (isinstance(self.report_tol, bool) or not isinstance(self.report_tol, (int, float))
                                            or not self.report_tol >= 0):
            raise ValueError(f"{name}: report_tol must be None or a number >= 0, got {self.report_tol!r}")

    @property
    def reporting_tol(self) -> float:
        """The relative tolerance a finished solve is judged against (``report_tol`` or ``tol``)."""
        return float(self.tol if self.report_tol is None else self.report_tol)

    @property
    def checks_enabled(self) -> bool:
        """Whether the loop ever synchronises to test convergence."""
        return self.check_every is not None and (self.tol > 0 or self.atol > 0)

    @property
    def reads_values(self) -> bool:
        """Whether a solve reads tensor values on the host (tolerance checks, raise policies).

        Such a solve cannot run under ``torch.func.vmap`` and breaks a ``torch.compile`` graph.
        """
        checks = self.checks_enabled and self.maxiter > 0
        return checks or self.on_breakdown == "raise" or self.on_nonfinite == "raise"

    @property
    def check_every_or_one(self) -> int:
        return self.check_every or 1

    @property
    def freezes_on_breakdown(self) -> bool:
        return self.on_breakdown in ("stop", "raise")

    def solve(self, operator: LinearOperator, b: Tree, x0: Tree | None = None, *, batched: bool = False,
              callback: Callback | None = None) -> Solution:
        """Solve :math:`A x = b`.

        Args:
            operator: the linear operator ``A``.
            b: right-hand side tree; with ``batched=True`` every leaf has a leading dimension k
                (k systems with the same operator, sharing batched products).
            x0: optional initial guess shaped like ``b`` (costs one extra product).
            batched: see ``b``.
            callback: ``callback(iteration, x)`` after every iteration, with the iterate shaped
                like ``b`` (for monitoring and benchmarks; the solver does not read it, and it
                must not modify ``x``). A callback that reads values synchronises with the device.

        Returns:
            :class:`Solution` with the value shaped like ``b`` and :class:`SolveStats`.

        Raises:
            TransformError: under ``torch.func.vmap`` with a solver that reads values
                (:attr:`reads_values`): use a fixed-iteration solve (``tol=0`` or
                ``check_every=None``) with the report policies.
        """
        if self.reads_values and vmap_active():
            reasons = [f"{name}={getattr(self, name)!r}" for name in ("on_breakdown", "on_nonfinite")
                       if getattr(self, name) == "raise"]
            if self.checks_enabled:
                reasons.insert(0, f"tol={self.tol}, atol={self.atol}, check_every={self.check_every}")
            raise TransformError(
                f"{type(self).__name__} with {', '.join(reasons)} reads tensor values on the host, which "
                f"torch.func.vmap cannot batch; use a fixed-iteration solve, e.g. "
                f"{type(self).__name__}(maxiter={self.maxiter}, tol=0.0) with the 'report'/'stop' "
                f"policies, and read the per-task stats afterwards"
            )
        if not isinstance(operator, LinearOperator):
            raise TypeError(
                f"operator must be a hypergrad.LinearOperator, got {type(operator).__name__}; "
                f"wrap a function with hypergrad.FunctionOperator(fn, symmetric=...)"
            )
        if self.requires_symmetric and not operator.symmetric:
            raise OperatorTagError(
                f"{type(self).__name__} needs a symmetric operator, but {type(operator).__name__} is "
                f"tagged symmetric=False; use GMRES (any non-symmetric operator), or Neumann when the "
                f"fixed-point map is a contraction (spectral radius of I - alpha*A below 1); or declare "
                f"symmetric=True if it is"
            )
        if not b:
            raise ValueError("b must be a non-empty tree of tensors")
        if callback is not None and not self.supports_callback:
            raise ValueError(f"{type(self).__name__} does not form its iterate on every iteration, so it takes "
                             f"no callback; use CG, MINRES, LayerwiseCG or Neumann to watch iterates")
        if x0 is not None:
            check_compatible(b, x0, "b", "x0")
        B = dict(b) if batched else {k: v.unsqueeze(0) for k, v in b.items()}
        X0 = None if x0 is None else (dict(x0) if batched else {k: v.unsqueeze(0) for k, v in x0.items()})
        watch = callback
        if callback is not None and not batched:
            def watch(iteration: int, X: Tree) -> None:
                callback(iteration, {k: v[0] for k, v in X.items()})
        X, stats = self._solve(operator, B, X0, watch)
        if self.on_nonfinite == "raise" and bool(stats.nonfinite.any()):
            raise NonFiniteError(
                f"{type(self).__name__}: non-finite values in the right-hand side or an operator product "
                f"(rhs norm {stats.rhs_norm.tolist()}); check the losses and inputs"
            )
        if self.on_breakdown == "raise" and bool(stats.breakdown.any()):
            raise SolverBreakdownError(
                f"{type(self).__name__}: non-positive curvature (min d.Ad/d.d = "
                f"{None if stats.min_curvature is None else stats.min_curvature.min().item():.3g}) "
                f"after {stats.iterations} iterations; the operator is not positive definite. "
                f"Add damping or use hypergrad.MINRES"
            )
        if self.on_breakdown == "raise" and stats.result is Result.SINGULAR:
            raise SolverBreakdownError(f"{type(self).__name__} after {stats.iterations} iterations: "
                                       f"{Result.SINGULAR.message}")
        if not batched:
            X = {k: v[0] for k, v in X.items()}
            stats = _unbatch_stats(stats)
        return Solution(X, stats)

    @abc.abstractmethod
    def _solve(self, operator: LinearOperator, B: Tree, X0: Tree | None,
               callback: Callback | None = None) -> tuple[Tree, SolveStats]:
        """Solve for k stacked right-hand sides; return the stacked solution and stats."""


def _unbatch_stats(stats: SolveStats) -> SolveStats:
    return SolveStats(
        solver=stats.solver,
        iterations=stats.iterations,
        num_hvp=stats.num_hvp,
        residual_norm=stats.residual_norm[0],
        rhs_norm=stats.rhs_norm[0],
        residual_history=stats.residual_history[:, 0],
        threshold=stats.threshold[0],
        breakdown=stats.breakdown[0],
        nonfinite=stats.nonfinite[0],
        min_curvature=None if stats.min_curvature is None else stats.min_curvature[0],
        singular=None if stats.singular is None else stats.singular[0],
        diverged=None if stats.diverged is None else stats.diverged[0],
        inaccurate=None if stats.inaccurate is None else stats.inaccurate[0],
        checked=stats.checked,
        residual_source=stats.residual_source,
        inner_hvp=stats.inner_hvp,
    )


def safe_divide(num: Tensor, den: Tensor, mask: Tensor) -> Tensor:
    """``num / den`` where ``mask``, else 0 (no division by zero, no host sync)."""
    return torch.where(mask, num / torch.where(mask, den, torch.ones_like(den)), torch.zeros_like(num))


def initial_residual(operator: LinearOperator, B: Tree, X0: Tree | None) -> tuple[Tree, Tree, int]:
    """``(X, R = B - A X, products used)`` for a zero or given initial guess."""
    if X0 is None:
        return {k: torch.zeros_like(v) for k, v in B.items()}, dict(B), 0
    AX = operator.matmat(X0)
    return dict(X0), {k: B[k] - AX[k] for k in B}, _batch_size(B)
