r"""Unrolled (iterative) differentiation, ITD: reverse mode through k inner gradient steps.

From :math:`y_0` (the ``inner`` tree) the inner problem takes k gradient steps on the lower loss
:math:`L`,

.. math::
    y_{t+1} = y_t - \eta\, \nabla_y L(y_t, x), \qquad t = 0, \dots, k-1,

and the estimate is the exact derivative of the map :math:`x \mapsto F(y_k(x), x)`. Truncated
to the last T steps, :math:`y_{k-T}` is held constant. Reverse mode computes it as

.. math::
    a_k = \nabla_y F(y_k, x),\quad g = \nabla_x F(y_k, x);\qquad
    g \mathrel{-}= \eta\, \nabla^2_{xy} L(y_t, x)\, a_{t+1},\quad
    a_t = a_{t+1} - \eta\, \nabla^2_{yy} L(y_t, x)\, a_{t+1}

for :math:`t = k-1, \dots, k-T`: one Hessian(-mixed)-vector product per reversed step, and the
graphs of T steps held in memory. On a quadratic lower loss with Hessian eigenvalues in
:math:`[\mu, \ell]` and :math:`\eta \le 1/\ell`, the error to the implicit hypergradient decays
like :math:`(1 - \eta\mu)^k` (full unrolling).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ._errors import EstimatorSettingError
from ._estimate import (
    STEP_FIX,
    EstimatorStats,
    Loss2,
    check_count,
    check_positive,
    check_tol,
    descend,
    inner_grad,
)
from ._hvp import _check_scalar
from ._implicit import _autograd_only, primals
from ._tree import Tree, check_tree, tree_norm

__all__ = ["unrolled_grad"]


def unrolled_grad(
    lower_loss: Loss2,
    upper_loss: Loss2,
    inner: Mapping[str, Tensor],
    outer: Mapping[str, Tensor],
    *,
    steps: int,
    step_size: float,
    truncate: int | None = None,
    tol: float | None = None,
) -> tuple[Tree, EstimatorStats]:
    r"""Hypergradient by differentiating through ``steps`` inner gradient steps (ITD).

    .. math::
        \widehat{\nabla} = \frac{d}{dx} F(y_k(x), x), \qquad
        y_{t+1} = y_t - \eta \nabla_y L(y_t, x),\ y_0 = \texttt{inner}

    Args:
        lower_loss: ``L(inner, outer)``, scalar; must depend on every inner tensor.
        upper_loss: ``F(inner, outer)``, scalar.
        inner: the starting point :math:`y_0` (detached; warm-start it with
            ``stats.inner`` of the previous outer step).
        outer: the outer variables :math:`x`.
        steps: k >= 1, the inner gradient steps.
        step_size: :math:`\eta > 0` (below :math:`2/\ell` for an :math:`\ell`-smooth lower loss).
        truncate: differentiate through the last T steps only (``1 <= T <= steps``); the first
            ``steps - T`` run without a graph. ``None``: all of them (full ITD).
        tol: judge ``stats.inner_converged`` by the last inner gradient's norm; ``None``: not judged.

    Returns:
        ``(grads, stats)``: ``grads`` shaped like ``outer``; :class:`EstimatorStats` with
        ``grad_evals = steps + 1``, ``hvp = T`` and ``stats.inner`` = :math:`y_k`.

    Memory: the autograd graphs of T gradient evaluations (activations of T forward and
    backward passes), against one for :func:`hypergrad.implicit_grad`.

    Example:
        >>> grads, stats = unrolled_grad(lower, upper, {"w": w0}, {"log_lam": log_lam},
        ...                              steps=100, step_size=0.1, truncate=20)
        >>> w0 = stats.inner  # warm start for the next outer step
    """
    _autograd_only("unrolled_grad")
    check_tree(inner, "inner")
    check_tree(outer, "outer")
    steps = check_count(steps, "steps", 1, "unroll at least one inner step")
    eta = check_positive(step_size, "step_size", STEP_FIX)
    kept = steps if truncate is None else check_count(
        truncate, "truncate", 1, "pass the number of last steps to differentiate through, or None for all")
    if kept > steps:
        raise EstimatorSettingError(
            f"truncate must be at most steps = {steps}, got {truncate}; lower it, or pass truncate=None "
            f"to differentiate through all {steps} steps")
    tol = check_tol(tol)

    outer_d = {k: x.detach() for k, x in outer.items()}
    y, _ = descend(lambda p: lower_loss(p, outer_d), dict(inner), steps - kept, eta, "lower_loss")
    po = primals(outer)
    y_t: Tree = primals(y)  # y_{k-T}: a constant of the estimate, a leaf of the graph
    last = torch.zeros((), dtype=torch.float32)
    for _ in range(kept):  # kept >= 1: `last` is the norm of the gradient at y_{k-1}
        _, g = inner_grad(lambda p: lower_loss(p, po), y_t, "lower_loss", create_graph=True)
        y_t = {k: y_t[k] - eta * g[k] for k in y_t}
        last = tree_norm({k: v.detach() for k, v in g.items()})
    upper = _check_scalar(upper_loss(y_t, po), "upper_loss")
    keys = list(po)
    if upper.requires_grad:
        out = torch.autograd.grad(upper, [po[k] for k in keys], allow_unused=True)
        grads = {k: torch.zeros_like(po[k]) if g is None else g.detach() for k, g in zip(keys, out, strict=True)}
    else:  # F depends on neither y nor x
        grads = {k: torch.zeros_like(po[k]) for k in keys}
    stats = EstimatorStats(
        method="itd" if kept == steps else "itd-truncated", inner_steps=steps, grad_evals=steps + 1,
        hvp=kept, stationarity=last, penalty_stationarity=None, tol=tol, upper_loss=upper.detach(),
        inner={k: v.detach() for k, v in y_t.items()}, lower_inner=None, penalty=None)
    return grads, stats
