r"""Make an inner solver's output differentiable w.r.t. the outer variables (autograd integration).

Two autograd functions, both written with torch operations only (so ``torch.func`` transforms
can run them: ``generate_vmap_rule``):

* ``_ImplicitRoot``: forward passes the inner solution :math:`i^*` through; backward is the IFT
  product :math:`\bar o = -\partial_o \langle \nabla_i L(i^*, o), u\rangle` with
  :math:`u = A^{-1} \bar i`, :math:`A = \nabla^2_{ii} L + \delta I`.
* ``_LinearSolve``: :math:`u = A(i, o)^{-1} v`, differentiable in :math:`v`, :math:`i`, :math:`o`
  without unrolling the solver (the idea of ``jax.lax.custom_linear_solve``):
  :math:`\bar v = A^{-\top} \bar u` (another solve; :math:`A` is symmetric) and
  :math:`\bar\theta = -\partial_\theta \langle \bar v, A(\theta)\, u\rangle` for
  :math:`\theta = (i, o)`. Its backward calls ``_LinearSolve`` again, so derivatives of any order
  are implicit.

Because ``_ImplicitRoot.backward`` is itself made of differentiable operations (the saved
:math:`i^*` keeps its dependence on :math:`o`), ``create_graph=True`` gives exact second
derivatives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._hvp import HVPMethod, hvp_batched
from ._operator import DampedOperator, FunctionOperator, HessianOperator, LinearOperator
from ._solution import SolveStats
from ._solver import CG, Solver
from ._tree import Tree, tree_dot

__all__ = ["custom_root"]


def _under_functorch() -> bool:
    """True inside a ``torch.func`` transform (vmap, grad, jvp...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _split(spec: dict[str, Any], leaves: tuple[Any, ...]) -> tuple[Tree, Tree, tuple[Any, ...]]:
    """``(inner, outer, args)`` from the flat leaves ``(*inner, *outer, *tensor_args)``."""
    ni, no = len(spec["inner_keys"]), len(spec["outer_keys"])
    inner = dict(zip(spec["inner_keys"], leaves[:ni], strict=True))
    outer = dict(zip(spec["outer_keys"], leaves[ni:ni + no], strict=True))
    args = list(spec["args"])
    for pos, t in zip(spec["tensor_pos"], leaves[ni + no:], strict=True):
        args[pos] = t
    return inner, outer, tuple(args)


def _operator(spec: dict[str, Any], inner: Tree, outer: Tree, args: tuple[Any, ...]) -> LinearOperator:
    r""":math:`\nabla^2_{ii} L + \delta I` at a detached point. Under a ``torch.func`` transform the
    products are forward-over-reverse (``jvp`` of ``grad``), whatever ``hvp_method`` says."""
    lower, damping = spec["lower_loss"], spec["damping"]

    def f(p: Tree) -> Tensor:
        return lower(p, outer, *args)

    operator: LinearOperator
    if _under_functorch():
        operator = FunctionOperator(lambda x: {k: t[0] for k, t in hvp_batched(
            f, inner, {k: t.unsqueeze(0) for k, t in x.items()}, method="forward").items()},
            symmetric=True, batched_fn=lambda X: hvp_batched(f, inner, X, method="forward"))
    else:
        operator = HessianOperator(f, inner, method=spec["hvp_method"])
    return DampedOperator(operator, damping, 1.0) if damping > 0 else operator


def _grad_inner(spec: dict[str, Any]) -> Callable[..., Tree]:
    r"""``(inner, outer, *args) -> \nabla_i L`` as a ``torch.func`` function (differentiable)."""
    return torch.func.grad(spec["lower_loss"], argnums=0)


def _cross(spec: dict[str, Any], inner: Tree, outer: Tree, args: tuple[Any, ...], u: Tree,
           arg_grads: bool) -> tuple[Tree, tuple[Any, ...]]:
    r""":math:`\partial_{(o, a)} \langle \nabla_i L(i, o, a), u\rangle` (partials, ``i`` held fixed)."""
    grad_i = _grad_inner(spec)
    if not arg_grads:
        return torch.func.grad(lambda o: tree_dot(grad_i(inner, o, *args), u))(outer), ()
    tpos = spec["tensor_pos"]

    def pairing(o: Tree, targs: tuple[Tensor, ...]) -> Tensor:
        full = list(args)
        for pos, t in zip(tpos, targs, strict=True):
            full[pos] = t
        return tree_dot(grad_i(inner, o, *full), u)

    go, ga = torch.func.grad(pairing, argnums=(0, 1))(outer, tuple(args[p] for p in tpos))
    return go, ga


class _LinearSolve(torch.autograd.Function):
    r""":math:`u = A(i, o, a)^{-1} v`: leaves ``(spec, *v, *inner, *outer, *tensor_args)`` -> ``u``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(spec: dict[str, Any], *leaves: Tensor) -> tuple[Tensor, ...]:
        nv = len(spec["inner_keys"])
        v = dict(zip(spec["inner_keys"], leaves[:nv], strict=True))
        inner, outer, args = _split(spec, leaves[nv:])
        detached = ({k: x.detach() for k, x in inner.items()}, {k: x.detach() for k, x in outer.items()},
                    tuple(a.detach() if isinstance(a, Tensor) else a for a in args))
        with torch.enable_grad():
            solution = spec["solver"].solve(_operator(spec, *detached), {k: x.detach() for k, x in v.items()})
        if spec["on_solve"] is not None:
            spec["on_solve"](solution.stats)
        return tuple(solution.value[k].detach() for k in spec["inner_keys"])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.spec = inputs[0]
        ctx.save_for_backward(*inputs[1 + len(inputs[0]["inner_keys"]):], *output)

    @staticmethod
    def backward(ctx: Any, *grad_u: Tensor | None) -> tuple[Any, ...]:
        spec = ctx.spec
        keys = spec["inner_keys"]
        saved = ctx.saved_tensors
        point, u_leaves = saved[: len(saved) - len(keys)], saved[len(saved) - len(keys):]
        inner, outer, args = _split(spec, point)
        u = dict(zip(keys, u_leaves, strict=True))
        gu = [torch.zeros_like(x) if g is None else g for x, g in zip(u_leaves, grad_u, strict=True)]
        w_leaves = _LinearSolve.apply(spec, *gu, *point)  # the transposed (= same, symmetric) system
        w = dict(zip(keys, w_leaves, strict=True))
        tpos = spec["tensor_pos"]
        grad_i = _grad_inner(spec)

        def pairing(i: Tree, o: Tree, targs: tuple[Tensor, ...]) -> Tensor:
            full = list(args)
            for pos, t in zip(tpos, targs, strict=True):
                full[pos] = t
            hu = torch.func.jvp(lambda p: grad_i(p, o, *full), (i,), (u,))[1]
            return tree_dot(w, hu)

        gi, go, ga = torch.func.grad(pairing, argnums=(0, 1, 2))(inner, outer, tuple(args[p] for p in tpos))
        return (None, *w_leaves, *(-gi[k] for k in keys), *(-go[k] for k in spec["outer_keys"]),
                *(-g for g in ga))


class _ImplicitRoot(torch.autograd.Function):
    r"""Leaves ``(spec, *inner, *outer, *tensor_args)`` -> a copy of ``inner``; backward by the IFT."""

    generate_vmap_rule = True

    @staticmethod
    def forward(spec: dict[str, Any], *leaves: Tensor) -> tuple[Tensor, ...]:
        return tuple(x.detach().clone() for x in leaves[: len(spec["inner_keys"])])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        spec = inputs[0]
        ctx.spec = spec
        # The outputs, not the inputs: in a double backward they carry i*'s dependence on o.
        ctx.save_for_backward(*output, *inputs[1 + len(spec["inner_keys"]):])

    @staticmethod
    def backward(ctx: Any, *grad_inner: Tensor | None) -> tuple[Any, ...]:
        spec = ctx.spec
        point = ctx.saved_tensors
        inner, outer, args = _split(spec, point)
        v = [torch.zeros_like(x) if g is None else g for x, g in zip(inner.values(), grad_inner, strict=True)]
        u = dict(zip(spec["inner_keys"], _LinearSolve.apply(spec, *v, *point), strict=True))
        n_in, n_out = len(spec["inner_keys"]), len(spec["outer_keys"])
        arg_grads = any(ctx.needs_input_grad[1 + n_in + n_out:])
        go, ga = _cross(spec, inner, outer, args, u, arg_grads)
        ga_out = tuple(-g for g in ga) if arg_grads else tuple(None for _ in spec["tensor_pos"])
        return (None, *(None for _ in spec["inner_keys"]), *(-go[k] for k in spec["outer_keys"]), *ga_out)


def custom_root(
    lower_loss: Callable[..., Tensor],
    solver: Solver | None = None,
    *,
    hvp_method: HVPMethod = "reverse",
    damping: float = 0.0,
    on_solve: Callable[[SolveStats], None] | None = None,
) -> Callable[[Callable[..., Tree]], Callable[..., Tree]]:
    r"""Decorator: ``solve_inner(outer, *args) -> inner`` becomes differentiable through the IFT.

    The decorated function runs the inner solver without tracking gradients; its output
    carries the backward rule :math:`\bar o = -(\nabla^2_{o i} L)\,(H + \delta I)^{-1} \bar i`,
    so ``upper_loss(inner, outer).backward()`` fills ``outer``'s ``.grad`` with the total
    derivative (the direct term flows through ``outer`` as usual).

    The backward is itself differentiable: the linear solve is differentiated implicitly
    (another solve with the same operator, plus a third-derivative product of ``L``; the
    solver's iterations are never unrolled), so ``torch.autograd.grad(..., create_graph=True)``
    followed by a second ``grad`` gives exact second derivatives (Hessians, Hessian-vector
    products of the upper loss). Both autograd functions have ``setup_context`` and a generated
    vmap rule: the decorated function works under ``torch.func.vmap`` / ``grad`` with a
    fixed-iteration solver (``tol=0``; a tolerance check reads a value). Inside a ``torch.func``
    transform the Hessian products are forward-over-reverse whatever ``hvp_method`` says.

    Args:
        lower_loss: ``L(inner, outer, *args)``: the scalar whose stationary point the decorated
            function returns; it receives the positional ``args`` of the decorated call (data,
            for example), which may be tensors (they get gradients too if they require them).
        solver: linear solver for :math:`(H + \delta I) u = \bar i` (default ``CG(maxiter=100, tol=1e-6)``).
        hvp_method: Hessian-vector product method.
        damping: :math:`\delta \ge 0`.
        on_solve: optional callback receiving the :class:`SolveStats` of every solve (one per
            backward, three per double backward). Under ``vmap`` the stats hold batched tensors,
            valid only inside the transform.

    Example:
        >>> @custom_root(lambda i, o, X, y: ridge_loss(i, o, X, y), solver=CG(maxiter=50, tol=1e-10))
        ... def fit(outer, X, y):
        ...     return {"w": closed_form(outer, X, y)}
        >>> upper(fit(outer, X, y), outer).backward()
    """
    if not (isinstance(damping, (int, float)) and damping >= 0):
        raise ValueError(f"custom_root: damping must be a number >= 0, got {damping!r}")
    if hvp_method not in ("reverse", "forward", "finite_difference"):
        raise ValueError(f"custom_root: hvp_method={hvp_method!r} is not an HVP method; "
                         f"use 'reverse', 'forward' or 'finite_difference'")
    spec_base: dict[str, Any] = {
        "lower_loss": lower_loss,
        "solver": CG() if solver is None else solver,
        "hvp_method": hvp_method,
        "damping": float(damping),
        "on_solve": on_solve,
    }

    def decorate(solve_inner: Callable[..., Tree]) -> Callable[..., Tree]:
        @functools.wraps(solve_inner)
        def wrapper(outer: Tree, *args: Any, **kwargs: Any) -> Tree:
            with torch.no_grad():
                inner = solve_inner({k: v.detach() for k, v in outer.items()}, *args, **kwargs)
            if not isinstance(inner, dict) or not inner or not all(isinstance(x, Tensor) for x in inner.values()):
                raise TypeError(f"custom_root: {getattr(solve_inner, '__name__', 'solve_inner')} must return a "
                                f"non-empty dict name -> Tensor, got {type(inner).__name__}")
            tensor_pos = tuple(n for n, a in enumerate(args) if isinstance(a, Tensor))
            spec: dict[str, Any] = {**spec_base, "outer_keys": list(outer), "inner_keys": list(inner),
                    "args": tuple(None if isinstance(a, Tensor) else a for a in args), "tensor_pos": tensor_pos}
            out = _ImplicitRoot.apply(spec, *inner.values(), *outer.values(), *(args[p] for p in tensor_pos))
            return dict(zip(spec["inner_keys"], out, strict=True))

        return wrapper

    return decorate

