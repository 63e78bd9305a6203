"""Typed exceptions and warnings raised by hypergrad.

Every message names the argument, the value received and how to fix it.
"""

from __future__ import annotations


class HypergradError(Exception):
    """Base class of every error hypergrad raises on purpose."""


class TreeMismatchError(HypergradError, ValueError):
    """Two trees of tensors that must match differ in keys, shape, dtype or device."""


class NonFiniteError(HypergradError, FloatingPointError):
    """A right-hand side or an operator product holds NaN or infinity (raised on request only)."""


class SolverBreakdownError(HypergradError, ArithmeticError):
    """A Krylov solver met non-positive curvature or a zero denominator (raised on request only)."""


class OperatorTagError(HypergradError, ValueError):
    """A solver needs a property (symmetric, positive definite) that the operator does not declare."""


class IndefiniteSketchError(HypergradError, ValueError):
    """A Nystrom sketch of an operator that is not positive semi-definite."""


class SolveFailureError(HypergradError, ArithmeticError):
    """A hypergradient's linear solve failed (``on_failure="raise"``); ``.result`` says how."""

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class SolveFailureWarning(UserWarning):
    """A hypergradient's linear solve missed its tolerance, broke down, was singular, drifted,
    diverged or went non-finite (``on_failure="warn"``, the default)."""


class NystromRankWarning(UserWarning):
    """A Nystrom sketch kept no eigenvalue above rounding level: the preconditioner is the identity."""


class ThirdDerivativeError(HypergradError, NotImplementedError):
    """A second derivative through :func:`hypergrad.custom_root` needs third derivatives of
    ``lower_loss`` through an operation whose third derivatives torch computes wrongly
    (train-mode BatchNorm, instance norm and layer norm on torch 2.14.1)."""


class NotStationaryWarning(UserWarning):
    """The given inner point is far from stationary, so the implicit function theorem is inexact."""


class TransformError(HypergradError, RuntimeError):
    """An option that reads a tensor's value (a tolerance check, a raise-on-breakdown policy, an
    autograd-only path) was requested inside ``torch.func.vmap`` or another functorch transform."""


class EstimatorSettingError(HypergradError, ValueError):
    """A hypergradient estimator got a setting it cannot work with (a step size that is not a
    positive number, a step count below its minimum, a penalty schedule that decreases)."""


class InnerDependenceError(HypergradError, ValueError):
    """The lower loss does not depend on (some of) the inner variables, so no inner step can
    move them: the estimator would silently return the partial derivative only."""
