"""What a hypergradient does with a solve that did not do what it was asked: warn, raise or ignore.

A solve with a tolerance that misses it, and any solve that breaks down, meets a singular
direction, drifts off its true residual, diverges or goes non-finite, is a failure. A
fixed-iteration solve (``tol = atol = 0``) asked for exactly k iterations, so missing a
tolerance it never had is not one — unless it set ``report_tol``, which it is then judged by.
"""

from __future__ import annotations

import warnings
from typing import Literal

from ._errors import SolveFailureError, SolveFailureWarning
from ._func import compiling, transform_active
from ._solution import Result, SolveStats
from ._solver import Solver

__all__ = ["FailurePolicy", "check_failure_policy", "check_solve"]

FailurePolicy = Literal["warn", "raise", "ignore"]

_ALWAYS_FAILURES = (Result.NONFINITE, Result.BREAKDOWN, Result.SINGULAR, Result.DIVERGED, Result.INACCURATE)


def check_failure_policy(on_failure: object) -> None:
    """Raise ``ValueError`` unless ``on_failure`` is ``"warn"``, ``"raise"`` or ``"ignore"``."""
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")


def is_failure(result: Result, solver: Solver) -> bool:
    """Whether ``result`` is a failure for a solve by ``solver`` (see the module docstring)."""
    if result in _ALWAYS_FAILURES:
        return True
    asked_for_tolerance = solver.checks_enabled or solver.report_tol is not None
    return result is Result.MAX_ITERATIONS and asked_for_tolerance


def check_solve(stats: SolveStats, solver: Solver, on_failure: FailurePolicy, where: str) -> None:
    """Warn (:class:`SolveFailureWarning`) or raise (:class:`SolveFailureError`) on a failed solve.

    Reads the result on the host once, after the solve; does nothing under ``torch.func``
    transforms and ``torch.compile`` (the stats still say what happened) or with ``"ignore"``.
    """
    if on_failure == "ignore" or transform_active() or compiling():
        return
    result = stats.result
    if not is_failure(result, solver):
        return
    message = (
        f"{where}: the {stats.solver} solve ended {result.name} after {stats.iterations} iterations "
        f"({stats.num_hvp} products; residual {stats.residual_norm.max().item():.3g} vs threshold "
        f"{stats.threshold.max().item():.3g}), so the hypergradient carries that error: "
        f"{result.message}. Pass on_failure='ignore' to silence this or 'raise' to stop"
    )
    if on_failure == "raise":
        raise SolveFailureError(message, result)
    warnings.warn(message, SolveFailureWarning, stacklevel=3)
