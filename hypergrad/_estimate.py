r"""What the unrolled and first-order estimators share: their stats, validation and inner steps.

Cost is counted in two units, both exact counts of what the code runs:

* a **gradient evaluation** is one forward and one backward of *one* of the two losses (the
  lower ``L`` or the upper ``F``), with respect to any subset of its arguments. A step on the
  penalised objective :math:`L + F/\lambda` therefore costs two.
* a **Hessian product** is one second-order backward (a Hessian- or mixed-vector product).
  Only unrolled differentiation spends them: reversing one inner step is one such product.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._errors import EstimatorSettingError, InnerDependenceError
from ._hvp import _check_scalar, primals
from ._tree import Tree, tree_norm

__all__ = ["EstimatorStats"]

Loss2 = Callable[[Tree, Tree], Tensor]


@dataclass(frozen=True)
class EstimatorStats:
    """Diagnostics of one unrolled or first-order hypergradient estimate.

    Tensors are kept as tensors (no host read inside the estimator); reading
    :attr:`inner_converged` synchronises once.

    Attributes:
        method: ``"itd"``, ``"itd-truncated"``, ``"f2sa"`` or ``"v-pbgd"``.
        inner_steps: gradient steps taken on inner variables, all inner problems together.
        grad_evals: gradient evaluations (one forward and backward of one loss; see the module).
        hvp: Hessian(-mixed)-vector products: the steps ITD differentiates through; 0 for the
            first-order methods.
        stationarity: norm of the lower loss's inner gradient at the lower problem's final
            iterate (ITD: at the last step's point, the iterate before the returned one, which
            on a convex L-smooth loss with ``step_size <= 1/L`` bounds the final one).
        penalty_stationarity: for F2SA and V-PBGD, :math:`\\|\\nabla_y (L + F/\\lambda)\\|` at the
            point where the estimate is taken; ``None`` for ITD.
        tol: the tolerance the stationarity is judged by (``None``: not judged).
        upper_loss: ``F`` at the point where the estimate is taken.
        inner: the final inner iterate (F2SA, V-PBGD: of the penalised problem). Pass it back
            as ``inner`` in the next outer step to warm-start.
        lower_inner: F2SA, V-PBGD: the final iterate of the lower problem (warm start for
            ``lower_inner``); ``None`` for ITD.
        penalty: the multiplier used (:math:`\\lambda` or :math:`\\gamma`); ``None`` for ITD.
    """

    method: str
    inner_steps: int
    grad_evals: int
    hvp: int
    stationarity: Tensor
    penalty_stationarity: Tensor | None
    tol: float | None
    upper_loss: Tensor
    inner: Tree
    lower_inner: Tree | None
    penalty: float | None

    @property
    def inner_converged(self) -> bool | None:
        """Whether every inner problem met ``tol`` (``None`` when no ``tol`` was given)."""
        if self.tol is None:
            return None
        worst = self.stationarity
        if self.penalty_stationarity is not None:
            worst = torch.maximum(worst, self.penalty_stationarity)
        return bool(worst <= self.tol)

    def cost(self, hvp_cost: float) -> float:
        """Gradient evaluations plus Hessian products counted at ``hvp_cost`` gradients each."""
        return self.grad_evals + hvp_cost * self.hvp


# ---------------------------------------------------------------------------------------------
# Validation


def check_positive(value: object, name: str, fix: str) -> float:
    """``value`` as a float, or :class:`EstimatorSettingError` unless it is a finite number > 0."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise EstimatorSettingError(f"{name} must be a finite number > 0, got {value!r}; {fix}")
    return float(value)  # type: ignore[arg-type]


def check_count(value: object, name: str, minimum: int, fix: str) -> int:
    """``value`` as an int, or :class:`EstimatorSettingError` unless it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise EstimatorSettingError(f"{name} must be an integer >= {minimum}, got {value!r}; {fix}")
    return int(value)


def check_tol(tol: object) -> float | None:
    if tol is None:
        return None
    return check_positive(tol, "tol", "pass a gradient-norm tolerance such as 1e-3, or tol=None not to judge")


STEP_FIX = "use a step below 2/L for an L-smooth inner loss (1/L is the usual choice)"


# ---------------------------------------------------------------------------------------------
# Gradients that refuse a loss the inner variables do not enter


def _independent(what: str, keys: list[str]) -> InnerDependenceError:
    return InnerDependenceError(
        f"{what} does not depend on the inner variables {keys} (its value carries no graph to "
        f"them), so no inner step can move them. Compute it from the `inner` dict it receives "
        f"(for a module: hypergrad.functional(module)(inner, x)), not from detached copies or "
        f"the module's own parameters"
    )


def _unused(what: str, keys: list[str]) -> InnerDependenceError:
    return InnerDependenceError(
        f"{what} does not depend on inner{keys}: its gradient there is identically zero, so those "
        f"variables never move. Remove them from `inner` (pass them as constants) or make "
        f"{what} use them"
    )


def inner_grad(objective: Callable[[Tree], Tensor], point: Tree, what: str, *,
               create_graph: bool = False) -> tuple[Tensor, Tree]:
    """``(objective(point), grad_point objective)``; ``point``'s leaves must require grad.

    Raises :class:`InnerDependenceError` naming the inner keys that ``objective`` ignores.
    """
    keys = list(point)
    loss = _check_scalar(objective(point), what)
    if not loss.requires_grad:
        raise _independent(what, keys)
    grads = torch.autograd.grad(loss, [point[k] for k in keys], create_graph=create_graph,
                                allow_unused=True)
    unused = [k for k, g in zip(keys, grads, strict=True) if g is None]
    if unused:
        raise _independent(what, keys) if len(unused) == len(keys) else _unused(what, unused)
    return loss, dict(zip(keys, grads, strict=True))


def both_grads(loss_fn: Loss2, point: Tree, outer: Tree, what: str) -> tuple[Tensor, Tree, Tree]:
    """``(loss, grad_inner, grad_outer)`` of ``loss_fn(point, outer)``: one backward, detached.

    ``loss_fn`` must depend on every inner key (:class:`InnerDependenceError` otherwise); outer
    keys it ignores get zeros.
    """
    pi, po = primals(point), primals(outer)
    keys_i, keys_o = list(pi), list(po)
    value = _check_scalar(loss_fn(pi, po), what)
    if not value.requires_grad:
        raise _independent(what, keys_i)
    grads = torch.autograd.grad(value, [pi[k] for k in keys_i] + [po[k] for k in keys_o], allow_unused=True)
    g_i, g_o = grads[: len(keys_i)], grads[len(keys_i):]
    unused = [k for k, g in zip(keys_i, g_i, strict=True) if g is None]
    if unused:
        raise _independent(what, keys_i) if len(unused) == len(keys_i) else _unused(what, unused)
    return (value.detach(), {k: g.detach() for k, g in zip(keys_i, g_i, strict=True)},
            {k: torch.zeros_like(po[k]) if g is None else g.detach() for k, g in zip(keys_o, g_o, strict=True)})


def descend(objective: Callable[[Tree], Tensor], start: Tree, steps: int, step_size: float,
            what: str) -> tuple[Tree, Tensor | None]:
    r"""``steps`` plain gradient steps :math:`y \leftarrow y - \eta \nabla y` from ``start`` (no graph kept).

    Returns ``(final iterate, norm of the last gradient taken)`` (``None`` when ``steps == 0``).
    """
    y = {k: v.detach() for k, v in start.items()}
    last = None
    for _ in range(steps):
        p = primals(y)
        _, g = inner_grad(objective, p, what)
        y = {k: y[k] - step_size * g[k].detach() for k in y}
        last = g
    return y, (None if last is None else tree_norm({k: v.detach() for k, v in last.items()}))
