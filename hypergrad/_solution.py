"""What a solve returns: the value, a result code with a fix-it message, and honest stats.

Stats hold tensors, not Python numbers, so a solve with a fixed iteration count never waits
for the device. Reading :attr:`SolveStats.result` (or ``bool(stats.converged)``) synchronises
once, after the solve.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._tree import Tree

__all__ = ["Result", "Solution", "SolveStats"]


class Result(enum.Enum):
    """How a solve ended. ``result.message`` says what it means and what to do."""

    CONVERGED = "converged: the residual norm is within max(tol * ||b||, atol)"
    MAX_ITERATIONS = (
        "stopped at maxiter with the residual above the tolerance; raise maxiter, loosen tol, "
        "add damping or a preconditioner (a fixed-iteration solve with tol=0 always ends here)"
    )
    BREAKDOWN = (
        "breakdown: a non-positive curvature denominator d.Ad <= 0 was met (for LayerwiseCG: per "
        "tensor), so the operator is not positive definite along the search direction; with "
        "on_breakdown='stop' the iterate was frozen there. Add damping, use CG instead of "
        "LayerwiseCG, or use MINRES for symmetric indefinite systems"
    )
    SINGULAR = (
        "singular: the operator is singular (or numerically singular at this precision) along the "
        "Krylov space and the system is not solved there: a zero pivot, an invariant Krylov "
        "subspace or a least-squares optimum (A r ~ 0 with r != 0) ended the solve; x is the "
        "iterate before the singular direction (MINRES: the "
        "minimum-norm least-squares solution when it could confirm one). Add damping (H + delta*I), "
        "use MINRES for the minimum-norm (least-squares) solution, or check that every inner tensor "
        "enters the lower loss"
    )
    INACCURATE = (
        "inaccurate: the solver's recurrence met the tolerance but the true residual ||b - A x|| "
        "does not: rounding limits the attainable accuracy at this "
        "precision and conditioning. Loosen tol, solve in float64, or add damping or a "
        "preconditioner"
    )
    DIVERGED = (
        "diverged: the residual grew (||b - A x|| > ||b - A x0||), so the series/iteration does not "
        "contract; raising maxiter will not help. Lower Neumann's alpha below 2 / lambda_max(A), add "
        "damping, or use CG (symmetric positive definite) / GMRES; for Refinement, make the inner solve "
        "more accurate or its inner operator closer to A"
    )
    NONFINITE = (
        "non-finite values (NaN/inf) in the right-hand side or an operator product; check the "
        "losses and inputs, or lower the learning rate that produced them"
    )
    UNCHECKED = (
        "no residual was computed (a zero-HVP approximation); pass compute_residual=True to "
        "measure the approximation error at the cost of one product"
    )

    @property
    def message(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class SolveStats:
    r"""Diagnostics of one (possibly batched) solve.

    Per-right-hand-side tensors have shape ``()`` for a single right-hand side and ``(k,)`` for
    a batched solve.

    Attributes:
        solver: the solver's name.
        iterations: iterations run.
        num_hvp: products with the operator passed to ``solve`` (a batched product of k tangents
            counts k).
        residual_norm: final ``||b - A x||`` (the solver's recurrence; exact up to rounding).
        rhs_norm: ``||b||``.
        residual_history: residual norms, shape ``(iterations + 1, ...)``, starting at ``x0``.
        threshold: the convergence threshold ``max(tol * ||b||, atol)``.
        breakdown: whether non-positive curvature (or a zero denominator) was met.
        nonfinite: whether NaN/inf appeared in the right-hand side or a product.
        min_curvature: smallest Rayleigh quotient ``d.Ad / d.d`` seen (Krylov solvers), else None.
        singular: whether the solve met a (numerically) singular direction: a zero pivot, an
            invariant Krylov subspace that does not contain the solution, or a recurrence the
            true residual did not confirm. ``None`` for solvers that cannot tell.
        diverged: whether the residual grew above its initial value (Neumann). ``None`` where
            not measured.
        inaccurate: whether the recurrence claimed convergence but the true residual misses
            the tolerance (rounding drift). ``None`` where not measured.
        checked: whether ``residual_norm`` was computed at all (False for ``Identity`` without
            ``compute_residual``).
        residual_source: ``"true"`` when ``residual_norm`` is :math:`\|b - Ax\|` recomputed
            with one product after the loop (every solve with a tolerance does this),
            ``"recurrence"`` when it is the solver's recurrence (fixed-iteration solves: equal
            to the truth up to rounding unless ``singular``), ``"none"`` when unchecked.
        inner_hvp: products with a second, cheaper operator (:class:`hypergrad.Refinement`'s
            ``inner_operator``: low precision or a sub-batch), counted apart from ``num_hvp``
            because they cost less; 0 for solvers that use only the solve's operator.
    """

    solver: str
    iterations: int
    num_hvp: int
    residual_norm: Tensor
    rhs_norm: Tensor
    residual_history: Tensor
    threshold: Tensor
    breakdown: Tensor
    nonfinite: Tensor
    min_curvature: Tensor | None = None
    singular: Tensor | None = None
    diverged: Tensor | None = None
    inaccurate: Tensor | None = None
    checked: bool = True
    residual_source: str = "recurrence"
    inner_hvp: int = 0

    @property
    def converged(self) -> Tensor:
        """Boolean tensor: residual within the threshold, everything finite and no breakdown."""
        return (self.residual_norm <= self.threshold) & ~self.nonfinite & ~self.breakdown

    @property
    def relative_residual(self) -> Tensor:
        """``||b - A x|| / ||b||`` (0 where ``b = 0``)."""
        return torch.where(self.rhs_norm > 0, self.residual_norm / self.rhs_norm.clamp_min(1e-300),
                           torch.zeros_like(self.residual_norm))

    @property
    def result(self) -> Result:
        """The worst outcome over the right-hand sides (synchronises with the device once)."""
        if not self.checked:
            return Result.NONFINITE if bool(self.nonfinite.any()) else Result.UNCHECKED
        if bool(self.nonfinite.any()):
            return Result.NONFINITE
        if bool(self.breakdown.any()):
            return Result.BREAKDOWN
        converged = self.converged
        if self.singular is not None and bool((self.singular & ~converged).any()):
            return Result.SINGULAR
        if self.diverged is not None and bool((self.diverged & ~converged).any()):
            return Result.DIVERGED
        if self.inaccurate is not None and bool((self.inaccurate & ~converged).any()):
            return Result.INACCURATE
        if bool(converged.all()):
            return Result.CONVERGED
        return Result.MAX_ITERATIONS

    def summary(self) -> dict[str, Any]:
        """Plain-Python view for logging (synchronises)."""
        return {
            "solver": self.solver,
            "result": self.result.name,
            "iterations": self.iterations,
            "num_hvp": self.num_hvp,
            "inner_hvp": self.inner_hvp,
            "residual_norm": self.residual_norm.tolist(),
            "relative_residual": self.relative_residual.tolist(),
            "min_curvature": None if self.min_curvature is None else self.min_curvature.tolist(),
            "residual_source": self.residual_source,
        }


_STATS_TENSORS = ("residual_norm", "rhs_norm", "residual_history", "threshold", "breakdown", "nonfinite",
                  "min_curvature", "singular", "diverged", "inaccurate")
_STATS_STATIC = ("solver", "iterations", "num_hvp", "checked", "residual_source", "inner_hvp")


def _flatten_stats(stats: SolveStats) -> tuple[list[Any], tuple[Any, ...]]:
    return [getattr(stats, n) for n in _STATS_TENSORS], tuple(getattr(stats, n) for n in _STATS_STATIC)


def _unflatten_stats(values: Any, context: Any) -> SolveStats:
    return SolveStats(**dict(zip(_STATS_TENSORS, values, strict=True)),
                      **dict(zip(_STATS_STATIC, context, strict=True)))


# A pytree node (tensors are children; name and counts are static), so that stats can be returned
# from torch.func.vmap (every tensor gains the batch dimension) and from compiled functions.
pytree.register_pytree_node(SolveStats, _flatten_stats, _unflatten_stats)


@dataclass(frozen=True)
class Solution:
    """``value`` (a tree shaped like the right-hand side), ``stats``, and the lazy ``result``.

    Unpacks as ``value, result, stats = solution`` (which synchronises to compute ``result``).
    """

    value: Tree
    stats: SolveStats

    @property
    def result(self) -> Result:
        return self.stats.result

    def __iter__(self) -> Iterator[Any]:
        yield self.value
        yield self.result
        yield self.stats
