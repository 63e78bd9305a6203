r"""Make an inner solver's output differentiable w.r.t. the outer variables (autograd integration)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._hvp import GradientGraph, HVPMethod, primals
from ._implicit import lower_hessian
from ._solution import SolveStats
from ._solver import CG, Solver
from ._tree import Tree

__all__ = ["custom_root"]


class _ImplicitRoot(torch.autograd.Function):
    """Forward: pass the inner solution through. Backward: the IFT vector-Jacobian product."""

    @staticmethod
    def forward(ctx: Any, spec: dict[str, Any], *leaves: Tensor) -> tuple[Tensor, ...]:
        n_out = len(spec["outer_keys"])
        ctx.spec = spec
        ctx.save_for_backward(*leaves)
        return tuple(x.detach().clone() for x in leaves[n_out:])

    @staticmethod
    def backward(ctx: Any, *grad_inner: Tensor | None) -> tuple[Any, ...]:
        spec = ctx.spec
        outer_keys, inner_keys = spec["outer_keys"], spec["inner_keys"]
        leaves = ctx.saved_tensors
        n_out = len(outer_keys)
        outer = dict(zip(outer_keys, leaves[:n_out], strict=True))
        inner = dict(zip(inner_keys, leaves[n_out:], strict=True))
        v = {k: torch.zeros_like(inner[k]) if g is None else g for k, g in zip(inner_keys, grad_inner, strict=True)}
        with torch.enable_grad():
            pi, po = primals(inner), primals(outer)
            graph = GradientGraph(spec["lower_loss"](pi, po), pi)
            operator = lower_hessian(
                spec["lower_loss"], graph, {k: x.detach() for k, x in inner.items()},
                {k: x.detach() for k, x in outer.items()}, method=spec["hvp_method"], damping=spec["damping"],
            )
            solution = spec["solver"].solve(operator, v)
            cross = graph.vjp(solution.value, to=po)
        if spec["on_solve"] is not None:
            spec["on_solve"](solution.stats)
        return (None, *(-cross[k] for k in outer_keys), *(None for _ in inner_keys))


def custom_root(
    lower_loss: Callable[[Tree, Tree], Tensor],
    solver: Solver | None = None,
    *,
    hvp_method: HVPMethod = "reverse",
    damping: float = 0.0,
    on_solve: Callable[[SolveStats], None] | None = None,
) -> Callable[[Callable[..., Tree]], Callable[..., Tree]]:
    r"""Decorator: ``solve_inner(outer, *args) -> inner`` becomes differentiable through the IFT.

    The decorated function runs the inner solver without tracking gradients; its output
    carries a backward rule :math:`\bar o = -(\nabla^2_{o i} L)\,H^{-1} \bar i`, so
    ``upper_loss(inner, outer).backward()`` fills ``outer``'s ``.grad`` with the total
    derivative (the direct term flows through ``outer`` as usual).

    Args:
        lower_loss: ``L(inner, outer)`` whose stationary point the decorated function returns.
        solver: linear solver for :math:`H u = \bar i` (default ``CG(maxiter=100, tol=1e-6)``).
        hvp_method: Hessian-vector product method.
        damping: :math:`\delta` in :math:`(H + \delta I)^{-1}`.
        on_solve: optional callback receiving the solve's :class:`SolveStats` at each backward.

    Example:
        >>> @custom_root(lambda w, o: ridge_loss(w, o), solver=CG(maxiter=50, tol=1e-10))
        ... def fit(outer):
        ...     return {"w": closed_form(outer)}
        >>> upper(fit(outer), outer).backward()
    """
    spec_base = {
        "lower_loss": lower_loss,
        "solver": CG() if solver is None else solver,
        "hvp_method": hvp_method,
        "damping": damping,
        "on_solve": on_solve,
    }

    def decorate(solve_inner: Callable[..., Tree]) -> Callable[..., Tree]:
        @functools.wraps(solve_inner)
        def wrapper(outer: Tree, *args: Any, **kwargs: Any) -> Tree:
            with torch.no_grad():
                inner = solve_inner({k: v.detach() for k, v in outer.items()}, *args, **kwargs)
            outer_keys, inner_keys = list(outer), list(inner)
            spec = {**spec_base, "outer_keys": outer_keys, "inner_keys": inner_keys}
            out = _ImplicitRoot.apply(spec, *(outer[k] for k in outer_keys), *(inner[k] for k in inner_keys))
            return dict(zip(inner_keys, out, strict=True))

        return wrapper

    return decorate
