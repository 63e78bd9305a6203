r"""Implicit hypergradients through the implicit function theorem (IFT).

For an inner solution :math:`i^*(o)` of :math:`\nabla_i L(i, o) = 0` and an outer objective
:math:`F(i, o)`, the total derivative is

.. math::
    \frac{dF}{do} = \partial_o F - (\nabla^2_{o i} L)\, u, \qquad H u = \partial_i F,
    \quad H = \nabla^2_{i i} L.

For a fixed point :math:`i^* = T(i^*, o)` it is

.. math::
    \frac{dF}{do} = \partial_o F + (\partial_o T)^\top u, \qquad (I - \partial_i T)^\top u = \partial_i F.

Both only call the operator and solver layer.

:func:`implicit_grad` has two backends with one meaning: ``"autograd"`` (a ``create_graph``
gradient graph, reused for every product and the mixed term) and ``"func"`` (the same
quantities from ``torch.func.grad``/``vjp``/``jvp`` alone), which runs inside ``torch.func.vmap``
(one hypergradient per task) and under ``torch.compile``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._errors import NotStationaryWarning, TransformError
from ._failure import FailurePolicy, check_failure_policy, check_solve
from ._func import Backend, compiling, transform_active, use_func, vjp, vmap_active
from ._hvp import GradientGraph, HVPMethod, VJPGraph, _check_scalar, _grads, gradient, primals
from ._operator import DampedOperator, FunctionOperator, HessianOperator, LinearOperator
from ._solution import Result, SolveStats
from ._solver import CG, Identity, Neumann, Solver
from ._tree import Tree, check_compatible, check_tree, tree_norm, tree_sub
from .distributed import DistributedOperator, all_reduce_mean

__all__ = ["ImplicitStats", "darts_grad", "fixed_point_grad", "implicit_grad"]

Loss2 = Callable[[Tree, Tree], Tensor]


@dataclass(frozen=True)
class ImplicitStats:
    """Diagnostics of one hypergradient.

    Attributes:
        solve: stats of the linear solve.
        stationarity: :math:`\\|\\nabla_i L\\|` at the given inner point (the IFT assumes 0);
            for the fixed-point form, :math:`\\|T(i, o) - i\\|`.
        upper_loss: the outer objective's value.
    """

    solve: SolveStats
    stationarity: Tensor
    upper_loss: Tensor

    @property
    def result(self) -> Result:
        return self.solve.result

    @property
    def num_hvp(self) -> int:
        return self.solve.num_hvp


# A pytree node, so that stats can be returned from torch.func.vmap (one entry per task).
pytree.register_pytree_node(
    ImplicitStats,
    lambda s: ([s.solve, s.stationarity, s.upper_loss], None),
    lambda values, _: ImplicitStats(*values),
)


def _upper_grads(upper_loss: Loss2, pi: Tree, po: Tree) -> tuple[Tensor, Tree, Tree]:
    loss = _check_scalar(upper_loss(pi, po), "upper_loss")
    keys_i, keys_o = list(pi), list(po)
    g = _grads([loss], [pi[k] for k in keys_i] + [po[k] for k in keys_o], None)
    return (loss.detach(), dict(zip(keys_i, g[: len(keys_i)], strict=True)),
            dict(zip(keys_o, g[len(keys_i):], strict=True)))


def _autograd_only(name: str) -> None:
    if transform_active():
        raise TransformError(
            f"{name} has no torch.func path (it needs requires_grad_ and torch.autograd.grad), so it "
            f"cannot run inside vmap/grad/jvp; call it outside the transform, or use implicit_grad, which "
            f"runs there (backend='func')"
        )


def _warn_if_not_stationary(stationarity: Tensor, tol: float | None, what: str) -> None:
    if tol is not None and float(stationarity) > tol:
        warnings.warn(
            f"{what} = {float(stationarity):.3g} > stationarity_tol = {tol:g}: the inner point is not "
            f"a solution, so the implicit hypergradient is approximate; run the inner solver longer "
            f"(or pass stationarity_tol=None to silence this check)",
            NotStationaryWarning,
            stacklevel=3,
        )


def _fd_mixed(lower_loss: Loss2, inner: Tree, outer: Tree, u: Tree, eps: float | None,
              backend: Backend = "auto") -> Tree:
    r""":math:`\partial_o \langle \nabla_i L, u\rangle \approx (\nabla_o L(i + h u) - \nabla_o L(i - h u)) / 2h`."""
    unorm = tree_norm(u)
    dtype = next(iter(inner.values())).dtype
    h = (torch.finfo(dtype).eps ** (1 / 3) if eps is None else eps) / unorm.clamp_min(torch.finfo(unorm.dtype).tiny)
    plus = gradient(lambda o: lower_loss({k: inner[k] + h.to(dtype) * u[k] for k in inner}, o), outer,
                    backend=backend)
    minus = gradient(lambda o: lower_loss({k: inner[k] - h.to(dtype) * u[k] for k in inner}, o), outer,
                     backend=backend)
    return {k: torch.where(unorm > 0, (plus[k] - minus[k]) / (2 * h).to(dtype), torch.zeros_like(plus[k]))
            for k in outer}


def lower_hessian(lower_loss: Loss2, graph: GradientGraph, inner: Tree, outer: Tree, *,
                  method: HVPMethod, damping: float, fd_eps: float | None = None) -> LinearOperator:
    r""":math:`\nabla^2_{ii} L + \delta I` at ``(inner, outer)``; reverse mode reuses ``graph``."""

    def f(p: Tree) -> Tensor:
        return lower_loss(p, outer)

    operator: LinearOperator = (
        HessianOperator.from_graph(graph, f, inner) if method == "reverse"
        else HessianOperator(f, inner, method=method, fd_eps=fd_eps)
    )
    return DampedOperator(operator, damping, 1.0) if damping > 0 else operator


def implicit_grad(
    lower_loss: Loss2,
    upper_loss: Loss2,
    inner: Mapping[str, Tensor],
    outer: Mapping[str, Tensor],
    solver: Solver | None = None,
    *,
    hvp_method: HVPMethod = "reverse",
    damping: float = 0.0,
    cross_method: Literal["autograd", "finite_difference"] = "autograd",
    fd_eps: float | None = None,
    x0: Tree | None = None,
    distributed: bool = False,
    group: object = None,
    stationarity_tol: float | None = 1e-3,
    backend: Backend = "auto",
    on_failure: FailurePolicy = "warn",
) -> tuple[Tree, ImplicitStats]:
    r"""Total derivative of ``upper_loss(inner*(outer), outer)`` w.r.t. ``outer`` by the IFT.

    .. math::
        \frac{dF}{do} = \partial_o F - (\nabla^2_{o i} L)\,(H + \delta I)^{-1} \partial_i F

    Args:
        lower_loss: ``L(inner, outer)``, scalar; ``inner`` is (approximately) its minimiser.
        upper_loss: ``F(inner, outer)``, scalar.
        inner: the inner solution, dict name -> tensor (detached internally).
        outer: the outer variables, dict name -> tensor.
        solver: any :class:`hypergrad.Solver` (default ``CG(maxiter=100, tol=1e-6)``).
        hvp_method: ``"reverse"`` (the first-order graph is built once and reused for every
            product and for the mixed term), ``"forward"`` or ``"finite_difference"``.
        damping: :math:`\delta` added to the Hessian. Note: the result then uses
            :math:`(H + \delta I)^{-1}`, *not* the BiSSL reference's rescaled
            :math:`(I + H/(\lambda + \delta))^{-1}` (see the docs' BiSSL page).
        cross_method: mixed term by ``"autograd"`` or central ``"finite_difference"``.
        fd_eps: finite-difference step for the mixed term.
        x0: warm start for the solve (costs one product).
        distributed: average the right-hand side, every product and the result across
            ``torch.distributed`` ranks (each rank holding a shard of a mean-reduced loss).
        group: process group for ``distributed``.
        stationarity_tol: warn (:class:`NotStationaryWarning`) when :math:`\|\nabla_i L\|`
            exceeds it; ``None`` skips the check (and its one host synchronisation). Under
            ``torch.func.vmap`` and ``torch.compile`` the check is skipped (it would read a
            value): ``stats.stationarity`` still holds :math:`\|\nabla_i L\|` (per task).
        backend: ``"autograd"``, ``"func"`` (``torch.func`` only: usable inside
            ``torch.func.vmap``/``grad`` and ``torch.compile(fullgraph=True)``; the losses must
            then be pure functions of their arguments), or ``"auto"`` (``"func"`` exactly when a
            functorch transform is active or dynamo is tracing). Under ``vmap`` the solver must
            run a fixed number of iterations (``tol=0``), else :class:`hypergrad.TransformError`.
        on_failure: what to do when the solve fails — a solve with a tolerance (or a
            ``report_tol``) that misses it, or any solve that breaks down, is singular, drifts
            off its true residual, diverges or goes non-finite: ``"warn"``
            (:class:`hypergrad.SolveFailureWarning`, naming the result and the fix),
            ``"raise"`` (:class:`hypergrad.SolveFailureError`) or ``"ignore"``. A
            fixed-iteration solve that simply ran its k iterations is not a failure. Skipped
            under ``vmap``/``compile`` (``stats.result`` still tells).

    Returns:
        ``(grads, stats)``: ``grads`` shaped like ``outer``; :class:`ImplicitStats`. Both are
        pytrees: returned from ``vmap``, every tensor gains the task dimension.

    Example:
        >>> grads, stats = implicit_grad(lower, upper, {"w": w_star}, {"log_lam": log_lam},
        ...                              solver=CG(maxiter=50, tol=1e-10))
        >>> # one hypergradient per task (inner and data batched on dim 0, outer shared)
        >>> per_task = torch.func.vmap(
        ...     lambda w, X, y: implicit_grad(lambda i, o: lower(i, o, X, y), upper, {"w": w},
        ...                                   outer, solver=CG(maxiter=20, tol=0.0))[0])(W, Xs, ys)
    """
    solver = CG() if solver is None else solver
    check_failure_policy(on_failure)
    check_tree(inner, "inner")
    check_tree(outer, "outer")
    if x0 is not None:
        check_compatible(inner, x0, "inner", "x0")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if cross_method not in ("autograd", "finite_difference"):
        raise ValueError(f"cross_method must be 'autograd' or 'finite_difference', got {cross_method!r}")
    if use_func(backend):
        if distributed:
            raise ValueError("distributed=True needs backend='autograd' (collectives do not run under "
                             "torch.func transforms); pass backend='autograd' outside any transform")
        return _implicit_grad_func(lower_loss, upper_loss, inner, outer, solver, hvp_method=hvp_method,
                                   damping=damping, cross_method=cross_method, fd_eps=fd_eps, x0=x0,
                                   stationarity_tol=stationarity_tol, on_failure=on_failure)

    def reduce(tree: Tree) -> Tree:
        return all_reduce_mean(tree, group) if distributed else tree

    pi, po = primals(inner), primals(outer)
    upper_value, v, direct = _upper_grads(upper_loss, pi, po)
    v = reduce(v)

    graph = GradientGraph(lower_loss(pi, po), pi)
    stationarity = tree_norm(reduce({k: g.detach() for k, g in graph.grad.items()}))
    _warn_if_not_stationary(stationarity, stationarity_tol, "||grad_inner lower_loss||")

    inner_d = {k: x.detach() for k, x in inner.items()}
    outer_d = {k: x.detach() for k, x in outer.items()}
    operator = lower_hessian(lower_loss, graph, inner_d, outer_d, method=hvp_method, damping=damping,
                             fd_eps=fd_eps)
    if distributed:
        operator = DistributedOperator(operator, group)

    solution = solver.solve(operator, v, x0)
    check_solve(solution.stats, solver, on_failure, "implicit_grad")
    u = solution.value
    if cross_method == "autograd":
        cross = graph.vjp(u, to=po)
    else:
        cross = _fd_mixed(lower_loss, inner_d, outer_d, u, fd_eps)
    grads = reduce(tree_sub({k: g.detach() for k, g in direct.items()}, cross))
    return grads, ImplicitStats(solve=solution.stats, stationarity=stationarity, upper_loss=upper_value)


def _implicit_grad_func(lower_loss: Loss2, upper_loss: Loss2, inner: Mapping[str, Tensor],
                        outer: Mapping[str, Tensor], solver: Solver, *, hvp_method: HVPMethod, damping: float,
                        cross_method: str, fd_eps: float | None, x0: Tree | None,
                        stationarity_tol: float | None, on_failure: FailurePolicy) -> tuple[Tree, ImplicitStats]:
    r""":func:`implicit_grad` by ``torch.func`` alone (no ``requires_grad_``, no ``autograd.grad``).

    One ``vjp`` of :math:`(i, o) \mapsto \nabla_i L(i, o)` gives the stationarity residual, the
    reverse-mode Hessian products (its inner cotangent) and the mixed term (its outer cotangent).
    """
    inner_d = {k: x.detach() for k, x in inner.items()}
    outer_d = {k: x.detach() for k, x in outer.items()}

    def upper(i: Tree, o: Tree) -> Tensor:
        return _check_scalar(upper_loss(i, o), "upper_loss")

    (v, direct), upper_value = torch.func.grad_and_value(upper, argnums=(0, 1))(inner_d, outer_d)

    def grad_inner(i: Tree, o: Tree) -> Tree:
        g: Tree = torch.func.grad(lambda p: _check_scalar(lower_loss(p, o), "lower_loss"))(i)
        return g

    g, pullback = vjp(grad_inner, inner_d, outer_d)
    stationarity = tree_norm(g)
    if not (compiling() or vmap_active()):
        _warn_if_not_stationary(stationarity, stationarity_tol, "||grad_inner lower_loss||")

    def f(p: Tree) -> Tensor:
        return lower_loss(p, outer_d)

    hessian: LinearOperator = (
        HessianOperator.from_linearization(lambda x: pullback(dict(x))[0], f, inner_d) if hvp_method == "reverse"
        else HessianOperator(f, inner_d, method=hvp_method, fd_eps=fd_eps, backend="func")
    )
    operator = DampedOperator(hessian, damping, 1.0) if damping > 0 else hessian
    solution = solver.solve(operator, v, x0)
    check_solve(solution.stats, solver, on_failure, "implicit_grad")
    u = solution.value
    if cross_method == "autograd":
        cross: Tree = pullback(dict(u))[1]
    else:
        cross = _fd_mixed(lower_loss, inner_d, outer_d, u, fd_eps, backend="func")
    grads = tree_sub(direct, cross)
    return grads, ImplicitStats(solve=solution.stats, stationarity=stationarity, upper_loss=upper_value.detach())


def fixed_point_grad(
    fixed_point: Callable[[Tree, Tree], Tree],
    upper_loss: Loss2,
    inner: Mapping[str, Tensor],
    outer: Mapping[str, Tensor],
    solver: Solver | None = None,
    *,
    symmetric: bool = False,
    distributed: bool = False,
    group: object = None,
    stationarity_tol: float | None = 1e-3,
    on_failure: FailurePolicy = "warn",
) -> tuple[Tree, ImplicitStats]:
    r"""Hypergradient for an inner solution defined as a fixed point :math:`i^* = T(i^*, o)`.

    Solves :math:`(I - \partial_i T)^\top u = \partial_i F` with vector-Jacobian products of
    ``T`` (reverse mode, graph built once) and returns
    :math:`\partial_o F + (\partial_o T)^\top u`. Used by iMAML-style and deep-equilibrium
    models.

    Args:
        fixed_point: ``T(inner, outer) -> tree shaped like inner``.
        upper_loss: ``F(inner, outer)``, scalar.
        inner: the fixed point (approximately).
        outer: the outer variables.
        solver: default ``Neumann(maxiter=50, alpha=1)`` — the fixed-point iteration
            :math:`u \leftarrow \partial_i F + (\partial_i T)^\top u` itself, which converges
            when ``T`` is a contraction; :class:`hypergrad.GMRES` does not need that.
            CG/MINRES need ``symmetric=True``.
        symmetric: declare :math:`\partial_i T` symmetric (true when
            :math:`T = i - \eta \nabla_i L`).
        distributed: as in :func:`implicit_grad`.
        group: as in :func:`implicit_grad`.
        stationarity_tol: as in :func:`implicit_grad`, for :math:`\|T(i, o) - i\|`.
        on_failure: as in :func:`implicit_grad` (a diverging Neumann series is a failure).
    """
    _autograd_only("fixed_point_grad")
    check_failure_policy(on_failure)
    solver = Neumann(maxiter=50, alpha=1.0) if solver is None else solver
    check_tree(inner, "inner")
    check_tree(outer, "outer")

    def reduce(tree: Tree) -> Tree:
        return all_reduce_mean(tree, group) if distributed else tree

    pi, po = primals(inner), primals(outer)
    upper_value, v, direct = _upper_grads(upper_loss, pi, po)
    v = reduce(v)
    mapped = fixed_point(pi, po)
    check_compatible(inner, {k: t.detach() for k, t in mapped.items()}, "inner", "fixed_point(inner, outer)")
    graph = VJPGraph(dict(mapped), pi)
    stationarity = tree_norm(reduce({k: mapped[k].detach() - pi[k].detach() for k in pi}))
    _warn_if_not_stationary(stationarity, stationarity_tol, "||T(inner, outer) - inner||")

    def one_minus_jt(x: Tree) -> Tree:
        return tree_sub(x, graph.vjp(x))

    def one_minus_jt_batched(X: Tree) -> Tree:
        return tree_sub(X, graph.vjp_batched(X))

    operator: LinearOperator = FunctionOperator(one_minus_jt, symmetric=symmetric, batched_fn=one_minus_jt_batched)
    if distributed:
        operator = DistributedOperator(operator, group)
    solution = solver.solve(operator, v)
    check_solve(solution.stats, solver, on_failure, "fixed_point_grad")
    cross = graph.vjp(solution.value, to=po)
    grads = reduce({k: direct[k].detach() + cross[k] for k in direct})
    return grads, ImplicitStats(solve=solution.stats, stationarity=stationarity, upper_loss=upper_value)


def darts_grad(
    lower_loss: Loss2,
    upper_loss: Loss2,
    inner: Mapping[str, Tensor],
    outer: Mapping[str, Tensor],
    *,
    xi: float,
    eps: float = 0.01,
) -> tuple[Tree, ImplicitStats]:
    r"""DARTS' second-order approximation (Liu et al., 2019), with finite differences.

    With one unrolled step :math:`i' = i - \xi \nabla_i L(i, o)` and :math:`v = \nabla_{i'} F(i', o)`:

    .. math::
        \frac{dF}{do} \approx \partial_o F(i', o) - \xi\,
        \frac{\nabla_o L(i + h v, o) - \nabla_o L(i - h v, o)}{2h},\qquad h = \frac{eps}{\|v\|}.

    No Hessian product is formed (``stats.solve.num_hvp == 0``); it costs four gradients.
    With ``xi = 0`` it is the first-order approximation :math:`\partial_o F(i, o)`.
    """
    _autograd_only("darts_grad")
    if xi < 0 or eps <= 0:
        raise ValueError(f"xi must be >= 0 and eps > 0, got xi={xi}, eps={eps}")
    check_tree(inner, "inner")
    check_tree(outer, "outer")
    inner_d = {k: x.detach() for k, x in inner.items()}
    outer_d = {k: x.detach() for k, x in outer.items()}
    g_inner = gradient(lambda i: lower_loss(i, outer_d), inner_d)
    stepped = {k: inner_d[k] - xi * g_inner[k] for k in inner_d}
    pi, po = primals(stepped), primals(outer_d)
    upper_value, v, direct = _upper_grads(upper_loss, pi, po)
    if xi == 0:
        cross = {k: torch.zeros_like(x) for k, x in outer_d.items()}
    else:
        cross = _fd_mixed(lower_loss, inner_d, outer_d, v, eps)
    grads = {k: direct[k].detach() - xi * cross[k] for k in outer_d}
    stats = Identity(scale=xi).solve(FunctionOperator(lambda x: x, symmetric=True), v).stats
    return grads, ImplicitStats(solve=stats, stationarity=tree_norm(g_inner), upper_loss=upper_value)
