r"""Fully first-order hypergradient estimators: F2SA and V-PBGD (no Hessian products).

Both descend the same **value-function penalty** of the bilevel problem
:math:`\min_x \Phi(x) = F(y^*(x), x)`, :math:`y^*(x) = \arg\min_y L(y, x)`:

.. math::
    \mathcal{L}^*_\lambda(x) = \min_y \Big[ F(y, x) + \lambda \big(L(y, x) - v(x)\big) \Big],
    \qquad v(x) = \min_z L(z, x).

With :math:`y^*_\lambda = \arg\min_y L(y, x) + F(y, x)/\lambda` (the penalised problem) and
:math:`z^* = y^*(x)` (the lower problem), both stationary points of their problems, the envelope
(Danskin) theorem gives a gradient that needs first derivatives only:

.. math::
    \nabla \mathcal{L}^*_\lambda(x) = \nabla_x F(y^*_\lambda, x)
      + \lambda \big(\nabla_x L(y^*_\lambda, x) - \nabla_x L(z^*, x)\big).

**Why it approximates the hypergradient, and how fast.** With :math:`H = \nabla^2_{yy} L` at
:math:`y^*`, the stationarity of :math:`y^*_\lambda` gives
:math:`y^*_\lambda - y^* = -\tfrac{1}{\lambda} H^{-1} \nabla_y F + O(\lambda^{-2})`, so

.. math::
    \lambda \big(\nabla_x L(y^*_\lambda) - \nabla_x L(y^*)\big)
      = -\nabla^2_{xy} L\, H^{-1} \nabla_y F + O(1/\lambda),

which is the implicit-function term; adding :math:`\nabla_x F(y^*_\lambda) = \nabla_x F(y^*) +
O(1/\lambda)` gives :math:`\nabla\mathcal{L}^*_\lambda = \nabla\Phi + O(1/\lambda)` (Kwon et al.,
2023, Lemma 3.1). The penalised point's lower-level gap is
:math:`L(y^*_\lambda) - v = O(1/\lambda^2)` (Shen & Chen, 2023: an :math:`\epsilon`-gap needs
:math:`\lambda \propto \epsilon^{-1/2}`).

The multiplier amplifies inner errors: the estimate moves by about
:math:`\lambda \|\nabla^2_{xy}L\|\,(\|y - y^*_\lambda\| + \|z - z^*\|)`, so the inner problems
must be solved to well below :math:`1/\lambda` — the price of a small penalty bias.

* :func:`f2sa_grad` (F2SA, Kwon, Kwon, Wright & Nowak, ICML 2023): solves both inner problems by
  gradient steps (warm-started by the caller), then takes the estimate at their final points;
  :math:`\lambda` grows over outer steps (:class:`PenaltySchedule`).
* :func:`penalty_grad` (V-PBGD, Shen & Chen, ICML 2023): solves the lower problem by gradient
  steps, but moves the penalised variable :math:`y` *jointly* with :math:`x` — one gradient of
  :math:`F + \gamma L` at :math:`(y, x)` gives both the x estimate and y's step; the penalty
  :math:`\gamma` is fixed by the target accuracy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from ._errors import EstimatorSettingError
from ._estimate import (
    STEP_FIX,
    EstimatorStats,
    Loss2,
    both_grads,
    check_count,
    check_positive,
    check_tol,
    descend,
)
from ._hvp import _check_scalar
from ._implicit import _autograd_only
from ._tree import Tree, check_compatible, check_tree, tree_norm

__all__ = ["PenaltySchedule", "f2sa_grad", "penalty_grad"]


@dataclass(frozen=True)
class PenaltySchedule:
    r"""A non-decreasing penalty multiplier over outer steps: :math:`\lambda_k = \min(\lambda_{max}, \lambda_0 (1 + k)^p)`.

    The penalty estimators' bias shrinks like :math:`1/\lambda`, so the multiplier may only grow:
    F2SA's analysis lets it grow polynomially with the outer step (its multiplier is the ratio
    of the inner to the outer step size, both decaying polynomially); V-PBGD keeps it fixed
    (``power=0``) at a value set by the accuracy wanted.

    Args:
        initial: :math:`\lambda_0 > 0`.
        power: :math:`p \ge 0` (0: constant). A negative power would lower the multiplier, and
            raise the bias, as the outer loop goes on; it is refused.
        maximum: :math:`\lambda_{max} \ge \lambda_0` (default: no cap).

    Example:
        >>> schedule = PenaltySchedule(initial=10.0, power=0.5, maximum=1e3)
        >>> [schedule(k) for k in (0, 3, 99, 10**6)]
        [10.0, 20.0, 100.0, 1000.0]
    """

    initial: float
    power: float = 0.0
    maximum: float = math.inf

    def __post_init__(self) -> None:
        check_positive(self.initial, "PenaltySchedule: initial", "pass the first multiplier, e.g. initial=10.0")
        if (isinstance(self.power, bool) or not isinstance(self.power, numbers.Real)
                or not math.isfinite(float(self.power)) or self.power < 0):
            raise EstimatorSettingError(
                f"PenaltySchedule: power must be a finite number >= 0, got {self.power!r}: a penalty schedule "
                f"must not decrease (the estimate's bias grows like 1/lambda as lambda falls); pass power=0 "
                f"for a constant multiplier or a positive power to grow it")
        ok = isinstance(self.maximum, numbers.Real) and not isinstance(self.maximum, bool)
        if not ok or math.isnan(float(self.maximum)) or self.maximum < self.initial:
            raise EstimatorSettingError(
                f"PenaltySchedule: maximum must be >= initial = {self.initial!r}, got {self.maximum!r}; "
                f"raise it (math.inf for no cap) or lower initial")

    def __call__(self, step: int) -> float:
        """:math:`\\lambda_k` for outer step ``step`` (0, 1, ...)."""
        k = check_count(step, "PenaltySchedule: step", 0, "pass the outer step index, counting from 0")
        return float(min(self.maximum, self.initial * (1.0 + k) ** self.power))


def _penalised_grads(lower_loss: Loss2, upper_loss: Loss2, y: Tree, outer: Tree,
                     lam: float) -> tuple[Tensor, Tree, Tree]:
    r"""At ``(y, x)``: ``F``, :math:`\nabla_y (L + F/\lambda)` and :math:`\nabla_x (F + \lambda L)`, one backward."""
    upper_value: list[Tensor] = []

    def joint(p: Tree, o: Tree) -> Tensor:
        f = _check_scalar(upper_loss(p, o), "upper_loss")
        upper_value.append(f.detach())
        return f + lam * _check_scalar(lower_loss(p, o), "lower_loss")

    _, gy, gx = both_grads(joint, y, outer, "lower_loss")
    return upper_value[0], {k: v / lam for k, v in gy.items()}, gx


def _check_common(inner: Mapping[str, Tensor], outer: Mapping[str, Tensor],
                  lower_inner: Mapping[str, Tensor] | None, multiplier: object, name: str,
                  step_size: object, penalty_step_size: object) -> tuple[float, float, float]:
    check_tree(inner, "inner")
    check_tree(outer, "outer")
    if lower_inner is not None:
        check_compatible(inner, lower_inner, "inner", "lower_inner")
    lam = check_positive(multiplier, name, f"pass a penalty multiplier > 0 (the bias shrinks like 1/{name}); "
                                           f"a PenaltySchedule gives one per outer step")
    eta = check_positive(step_size, "step_size", STEP_FIX)
    eta_y = eta if penalty_step_size is None else check_positive(
        penalty_step_size, "penalty_step_size", f"{STEP_FIX}, here L + F/{name}")
    return lam, eta, eta_y


def f2sa_grad(
    lower_loss: Loss2,
    upper_loss: Loss2,
    inner: Mapping[str, Tensor],
    outer: Mapping[str, Tensor],
    *,
    lam: float,
    steps: int,
    step_size: float,
    lower_inner: Mapping[str, Tensor] | None = None,
    lower_steps: int | None = None,
    penalty_step_size: float | None = None,
    tol: float | None = None,
) -> tuple[Tree, EstimatorStats]:
    r"""F2SA's fully first-order hypergradient estimate (Kwon et al., ICML 2023).

    Gradient steps on the lower problem :math:`z \leftarrow z - \eta \nabla_z L(z, x)` and on the
    penalised problem :math:`y \leftarrow y - \eta_y \nabla_y \big(L(y, x) + F(y, x)/\lambda\big)`,
    then

    .. math::
        \widehat{\nabla} = \nabla_x F(y, x) + \lambda \big(\nabla_x L(y, x) - \nabla_x L(z, x)\big)
        \;\to\; \nabla \mathcal{L}^*_\lambda(x) = \nabla \Phi(x) + O(1/\lambda).

    Args:
        lower_loss: ``L(inner, outer)``, scalar; must depend on every inner tensor.
        upper_loss: ``F(inner, outer)``, scalar.
        inner: start of :math:`y` (the penalised problem); warm-start with ``stats.inner``.
        outer: the outer variables :math:`x`.
        lam: the multiplier :math:`\lambda > 0` (e.g. ``PenaltySchedule(...)(k)`` at outer step k).
        steps: gradient steps on :math:`y` (>= 0).
        step_size: :math:`\eta > 0` for the lower problem (below :math:`2/\ell`).
        lower_inner: start of :math:`z` (the lower problem; default ``inner``); warm-start with
            ``stats.lower_inner``.
        lower_steps: gradient steps on :math:`z` (default ``steps``).
        penalty_step_size: :math:`\eta_y` (default ``step_size``; the penalised objective's
            smoothness is :math:`\ell_L + \ell_F/\lambda`).
        tol: judge ``stats.inner_converged`` against both problems' final gradient norms.

    Returns:
        ``(grads, stats)``. Costs ``lower_steps + 2 * steps + 3`` gradient evaluations (a step
        on :math:`L + F/\lambda` evaluates both losses) and no Hessian product; memory of one
        gradient.

    Example:
        >>> schedule = PenaltySchedule(initial=10.0, power=0.5)
        >>> y, z = w0, w0
        >>> for k in range(100):
        ...     g, stats = f2sa_grad(lower, upper, y, outer, lam=schedule(k), steps=20, step_size=0.1,
        ...                          lower_inner=z)
        ...     y, z = stats.inner, stats.lower_inner
        ...     outer = {n: outer[n] - lr * g[n] for n in outer}
    """
    _autograd_only("f2sa_grad")
    lam, eta, eta_y = _check_common(inner, outer, lower_inner, lam, "lam", step_size, penalty_step_size)
    steps = check_count(steps, "steps", 0, "pass the number of gradient steps on the penalised problem")
    n_low = steps if lower_steps is None else check_count(
        lower_steps, "lower_steps", 0, "pass the number of gradient steps on the lower problem")
    tol = check_tol(tol)
    outer_d = {k: x.detach() for k, x in outer.items()}

    z, _ = descend(lambda p: lower_loss(p, outer_d), dict(inner if lower_inner is None else lower_inner), n_low, eta, "lower_loss")
    _, gz, gx_lower = both_grads(lower_loss, z, outer_d, "lower_loss")
    y, _ = descend(lambda p: lower_loss(p, outer_d) + upper_loss(p, outer_d) / lam, dict(inner), steps, eta_y,
                   "lower_loss + upper_loss / lam")
    upper_value, gy, gx_joint = _penalised_grads(lower_loss, upper_loss, y, outer_d, lam)
    grads = {k: gx_joint[k] - lam * gx_lower[k] for k in outer_d}
    stats = EstimatorStats(
        method="f2sa", inner_steps=n_low + steps, grad_evals=n_low + 1 + 2 * steps + 2, hvp=0,
        stationarity=tree_norm(gz), penalty_stationarity=tree_norm(gy), tol=tol, upper_loss=upper_value,
        inner=y, lower_inner=z, penalty=lam)
    return grads, stats


def penalty_grad(
    lower_loss: Loss2,
    upper_loss: Loss2,
    inner: Mapping[str, Tensor],
    outer: Mapping[str, Tensor],
    *,
    gamma: float,
    steps: int,
    step_size: float,
    lower_inner: Mapping[str, Tensor] | None = None,
    penalty_steps: int = 1,
    penalty_step_size: float | None = None,
    tol: float | None = None,
) -> tuple[Tree, EstimatorStats]:
    r"""V-PBGD's value-function penalty gradient (Shen & Chen, ICML 2023), one joint step.

    V-PBGD runs gradient descent on :math:`\varphi_\gamma(x, y) = F(y, x) + \gamma\,(L(y, x) - v(x))`
    over :math:`(x, y)` together, with :math:`\nabla v(x) = \nabla_x L(\hat z, x)` from ``steps``
    gradient steps :math:`z \leftarrow z - \eta \nabla_z L(z, x)`. This function returns the
    x part of that gradient and takes the y part's step, from one gradient evaluation of
    :math:`F + \gamma L`:

    .. math::
        \widehat{\nabla} = \nabla_x F(y, x) + \gamma \big(\nabla_x L(y, x) - \nabla_x L(\hat z, x)\big),
        \qquad y^+ = y - \beta\, \nabla_y \big(L(y, x) + F(y, x)/\gamma\big)

    (:math:`\beta = \gamma\alpha` for the paper's joint step size :math:`\alpha`). Step ``outer``
    along the estimate and pass ``stats.inner`` (:math:`y^+`) and ``stats.lower_inner``
    (:math:`\hat z`) back: that is V-PBGD. With ``penalty_steps = m > 1``, y first takes m - 1
    steps at fixed x (a partial inner loop; m large converges y to :math:`y^*_\gamma`).
    The lower-level gap of :math:`y^*_\gamma` is :math:`O(1/\gamma^2)` and the estimate's bias
    :math:`O(1/\gamma)` (see the module docs); the paper fixes :math:`\gamma \propto \epsilon^{-1/2}`.

    Args:
        lower_loss: ``L(inner, outer)``, scalar; must depend on every inner tensor.
        upper_loss: ``F(inner, outer)``, scalar.
        inner: the current :math:`y` (the penalised variable).
        outer: the outer variables :math:`x`.
        gamma: the penalty :math:`\gamma > 0` (constant in the paper; a :class:`PenaltySchedule`
            with ``power=0``).
        steps: gradient steps on the lower problem (>= 0).
        step_size: :math:`\eta > 0` for the lower problem.
        lower_inner: start of :math:`z` (default ``inner``).
        penalty_steps: y steps m >= 1 (the last one is the joint step).
        penalty_step_size: :math:`\beta` (default ``step_size``).
        tol: judge ``stats.inner_converged`` against both problems' final gradient norms.

    Returns:
        ``(grads, stats)``: the estimate taken at :math:`y_{m-1}`, ``stats.inner`` =
        :math:`y_m`. Costs ``steps + 2 * penalty_steps + 1`` gradient evaluations, no Hessian
        product.

    Example:
        >>> y, z = w0, w0
        >>> for k in range(300):
        ...     g, stats = penalty_grad(lower, upper, y, outer, gamma=100.0, steps=10, step_size=0.1,
        ...                             lower_inner=z)
        ...     y, z = stats.inner, stats.lower_inner
        ...     outer = {n: outer[n] - lr * g[n] for n in outer}
    """
    _autograd_only("penalty_grad")
    gamma, eta, beta = _check_common(inner, outer, lower_inner, gamma, "gamma", step_size, penalty_step_size)
    steps = check_count(steps, "steps", 0, "pass the number of gradient steps on the lower problem")
    m = check_count(penalty_steps, "penalty_steps", 1, "the last y step is the joint step; pass 1 for V-PBGD")
    tol = check_tol(tol)
    outer_d = {k: x.detach() for k, x in outer.items()}

    z, _ = descend(lambda p: lower_loss(p, outer_d), dict(inner if lower_inner is None else lower_inner), steps, eta, "lower_loss")
    _, gz, gx_lower = both_grads(lower_loss, z, outer_d, "lower_loss")
    y, _ = descend(lambda p: lower_loss(p, outer_d) + upper_loss(p, outer_d) / gamma, dict(inner), m - 1, beta,
                   "lower_loss + upper_loss / gamma")
    upper_value, gy, gx_joint = _penalised_grads(lower_loss, upper_loss, y, outer_d, gamma)
    grads = {k: gx_joint[k] - gamma * gx_lower[k] for k in outer_d}
    y_next = {k: y[k] - beta * gy[k] for k in y}
    stats = EstimatorStats(
        method="v-pbgd", inner_steps=steps + m, grad_evals=steps + 1 + 2 * m, hvp=0,
        stationarity=tree_norm(gz), penalty_stationarity=tree_norm(gy), tol=tol, upper_loss=upper_value,
        inner=y_next, lower_inner=z, penalty=gamma)
    return grads, stats
