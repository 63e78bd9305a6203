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

The data handed to ``lower_loss`` (the decorated call's positional arguments, and the keyword
arguments its signature accepts) travel as a template plus the tuple of its tensors, which are
leaves of both autograd functions (so they get gradients too).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._errors import NotStationaryWarning, ThirdDerivativeError
from ._failure import check_solve
from ._hvp import HVPMethod, hvp_batched
from ._operator import DampedOperator, FunctionOperator, HessianOperator, LinearOperator
from ._solution import SolveStats
from ._solver import CG, Solver
from ._tree import Tree, tree_dot, tree_norm

__all__ = ["ThirdDerivativeError", "custom_root", "relative_stationarity"]

OnFailure = Literal["warn", "raise", "ignore"]


def _under_functorch() -> bool:
    """True inside a ``torch.func`` transform (vmap, grad, jvp...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


# --- the data of lower_loss: positional and keyword arguments, tensors as leaves -------------

def _keywords_accepted(lower_loss: Callable[..., Tensor]) -> frozenset[str] | None:
    """Names ``lower_loss`` accepts by keyword after ``(inner, outer)``; ``None`` means all
    (it takes ``**kwargs``, or its signature cannot be read)."""
    try:
        params = list(inspect.signature(lower_loss).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    skip = {p.name for p in positional[:2]}  # inner, outer
    return frozenset(p.name for p in params if p.name not in skip and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def _fill(spec: dict[str, Any], tensors: tuple[Tensor, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of ``lower_loss``: the call's template with its tensors put back."""
    args, kwargs = list(spec["args"]), dict(spec["kwargs"])
    for slot, t in zip(spec["slots"], tensors, strict=True):
        if isinstance(slot, int):
            args[slot] = t
        else:
            kwargs[slot] = t
    return tuple(args), kwargs


def _loss(spec: dict[str, Any], inner: Tree, outer: Tree, data: tuple[Tensor, ...]) -> Tensor:
    args, kwargs = _fill(spec, data)
    return spec["lower_loss"](inner, outer, *args, **kwargs)


def _split(spec: dict[str, Any], leaves: tuple[Any, ...]) -> tuple[Tree, Tree, tuple[Tensor, ...]]:
    """``(inner, outer, data)`` from the flat leaves ``(*inner, *outer, *data)``."""
    ni, no = len(spec["inner_keys"]), len(spec["outer_keys"])
    inner = dict(zip(spec["inner_keys"], leaves[:ni], strict=True))
    outer = dict(zip(spec["outer_keys"], leaves[ni:ni + no], strict=True))
    return inner, outer, tuple(leaves[ni + no:])


def _hessian(spec: dict[str, Any], inner: Tree, outer: Tree, data: tuple[Tensor, ...], *,
             damped: bool = True) -> LinearOperator:
    r""":math:`\nabla^2_{ii} L (+ \delta I)` at a detached point. Under a ``torch.func`` transform the
    products are forward-over-reverse (``jvp`` of ``grad``), whatever ``hvp_method`` says."""
    damping = spec["damping"]

    def f(p: Tree) -> Tensor:
        return _loss(spec, p, outer, data)

    operator: LinearOperator
    if _under_functorch():
        operator = FunctionOperator(lambda x: {k: t[0] for k, t in hvp_batched(
            f, inner, {k: t.unsqueeze(0) for k, t in x.items()}, method="forward").items()},
            symmetric=True, batched_fn=lambda X: hvp_batched(f, inner, X, method="forward"))
    else:
        operator = HessianOperator(f, inner, method=spec["hvp_method"])
    return DampedOperator(operator, damping, 1.0) if damped and damping > 0 else operator


def _grad_inner(spec: dict[str, Any]) -> Callable[[Tree, Tree, tuple[Tensor, ...]], Tree]:
    r"""``(inner, outer, data) -> \nabla_i L`` as a ``torch.func`` function (differentiable)."""
    return torch.func.grad(functools.partial(_loss, spec), argnums=0)


def _cross(spec: dict[str, Any], inner: Tree, outer: Tree, data: tuple[Tensor, ...], u: Tree,
           data_grads: bool) -> tuple[Tree, tuple[Tensor, ...]]:
    r""":math:`\partial_{(o, a)} \langle \nabla_i L(i, o, a), u\rangle` (partials, ``i`` held fixed)."""
    grad_i = _grad_inner(spec)
    if not data_grads:
        return torch.func.grad(lambda o: tree_dot(grad_i(inner, o, data), u))(outer), ()
    go, ga = torch.func.grad(lambda o, a: tree_dot(grad_i(inner, o, a), u), argnums=(0, 1))(outer, data)
    return go, ga


# --- checks --------------------------------------------------------------------------------

def relative_stationarity(grad: Tree, hess_grad: Tree, point: Tree) -> Tensor:
    r"""Estimated distance from ``point`` to the stationary point, relative to ``point``'s norm.

    With :math:`g = \nabla_i L(i)` and the curvature along it, :math:`\mu = g^\top H g / g^\top g`,
    the Newton step :math:`H^{-1} g` (the distance to the stationary point of the quadratic model)
    is estimated by its length along :math:`g`, :math:`\|g\| / |\mu|`:

    .. math::
        \rho = \frac{\|g\|^3}{|g^\top H g|\;\|i\|}.

    For positive definite :math:`H`, :math:`\|g\|/\lambda_{\max} \le \|g\|/\mu \le \|g\|/\lambda_{\min}`,
    the same bounds as :math:`\|H^{-1} g\|`. Scaling the loss by :math:`c > 0` scales :math:`g`
    and :math:`H` by :math:`c` and leaves :math:`\rho` unchanged. Conventions: :math:`g = 0`
    gives 0; :math:`g^\top H g = 0` or :math:`i = 0` with :math:`g \ne 0` gives infinity.

    Args:
        grad: :math:`g`, a tree.
        hess_grad: :math:`H g`, shaped like ``grad``.
        point: :math:`i`, shaped like ``grad``.

    Returns:
        :math:`\rho`, a 0-d tensor (float64 arithmetic).
    """
    g2 = tree_norm(grad).double() ** 2
    curvature = tree_dot(grad, hess_grad).double().abs()
    denominator = curvature * tree_norm(point).double()
    rho = torch.where(denominator > 0, g2.pow(1.5) / denominator.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(g2, float("inf")))
    return torch.where(g2 > 0, rho, torch.zeros_like(g2))


def _check_stationary(spec: dict[str, Any], inner: Tree, outer: Tree, data: tuple[Tensor, ...]) -> None:
    """Warn (:class:`NotStationaryWarning`) when :func:`relative_stationarity` exceeds the tolerance:
    one gradient and one Hessian-vector product of ``lower_loss``, one host read."""
    tol = spec["stationarity_tol"]
    if tol is None or _under_functorch() or torch.compiler.is_compiling():
        return
    inner_d = {k: x.detach() for k, x in inner.items()}
    outer_d = {k: x.detach() for k, x in outer.items()}
    data = tuple(a.detach() for a in data)
    with torch.enable_grad():
        g = {k: x.detach() for k, x in _grad_inner(spec)(inner_d, outer_d, data).items()}
        hg = _hessian(spec, inner_d, outer_d, data, damped=False).mv(g)
    rho = float(relative_stationarity(g, {k: x.detach() for k, x in hg.items()}, inner_d))
    if rho > tol:
        warnings.warn(
            f"custom_root: the inner point is not stationary: estimated relative distance to the "
            f"stationary point ||g||^3 / (|g.Hg| ||inner||) = {rho:.3g} > stationarity_tol = {tol:g} "
            f"(||grad_inner lower_loss|| = {float(tree_norm(g)):.3g}), so the implicit hypergradient is "
            f"approximate; run the inner solver longer or check that lower_loss is the loss it minimises "
            f"(stationarity_tol=None skips this check)",
            NotStationaryWarning, stacklevel=2)


# Normalisations whose third derivatives torch 2.14.1 gets wrong: torch.func (any composition of
# grad/jvp) silently, autograd by refusing (batch/instance norm) or silently (layer norm).
# Argument 5 is `training` / `use_input_stats` in every batch/instance-norm signature below.
_BATCH_STATS = {F.batch_norm, torch.batch_norm, torch.native_batch_norm, F.instance_norm, torch.instance_norm}
_ALWAYS = {F.layer_norm, torch.layer_norm, torch.native_layer_norm}


class _WrongThirdDerivatives(TorchFunctionMode):
    """Raises :class:`ThirdDerivativeError` at the first normalisation in the list above."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        batch_stats = func in _BATCH_STATS and bool(
            args[5] if len(args) > 5 else kwargs.get("training", kwargs.get("use_input_stats", func in (
                F.instance_norm, torch.instance_norm))))
        if batch_stats or func in _ALWAYS:
            name = f"{getattr(func, '__module__', None) or 'torch'}.{func.__name__}"
            what = "with batch statistics (training mode)" if batch_stats else ""
            raise ThirdDerivativeError(
                f"custom_root: a second derivative through custom_root needs third derivatives of "
                f"lower_loss, and lower_loss calls {name} {what}; torch 2.14.1 computes third "
                f"derivatives through it wrongly (torch.func: silently, off by 2-20% against finite "
                f"differences). Fix: write the normalisation with elementary operations (mean, var, "
                f"rsqrt), use the layer in eval mode inside lower_loss, or take first derivatives only "
                f"(no create_graph=True, no nested torch.func.grad)")
        return func(*args, **kwargs)


def _refuse_wrong_third_derivatives(spec: dict[str, Any], inner: Tree, outer: Tree,
                                    data: tuple[Tensor, ...]) -> None:
    """Evaluate ``lower_loss`` once (no graph) and raise if it meets a normalisation above."""
    with torch.no_grad(), _WrongThirdDerivatives():
        _loss(spec, inner, outer, data)


# --- the two autograd functions ------------------------------------------------------------

class _LinearSolve(torch.autograd.Function):
    r""":math:`u = A(i, o, a)^{-1} v`: leaves ``(spec, *v, *inner, *outer, *data)`` -> ``u``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(spec: dict[str, Any], *leaves: Tensor) -> tuple[Tensor, ...]:
        nv = len(spec["inner_keys"])
        v = dict(zip(spec["inner_keys"], leaves[:nv], strict=True))
        inner, outer, data = _split(spec, leaves[nv:])
        detached = ({k: x.detach() for k, x in inner.items()}, {k: x.detach() for k, x in outer.items()},
                    tuple(a.detach() for a in data))
        with torch.enable_grad():
            solution = spec["solver"].solve(_hessian(spec, *detached), {k: x.detach() for k, x in v.items()})
        check_solve(solution.stats, spec["solver"], spec["on_failure"], "custom_root")
        if spec["on_solve"] is not None:
            spec["on_solve"](solution.stats)
        return tuple(solution.value[k].detach() for k in spec["inner_keys"])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.spec = inputs[0]
        ctx.save_for_backward(*inputs[1 + len(inputs[0]["inner_keys"]):], *output)

    @staticmethod
    def backward(ctx: Any, *grad_u: Tensor | None) -> tuple[Any, ...]:
        # Reached only by a second (or higher) derivative through custom_root: third derivatives.
        spec = ctx.spec
        keys = spec["inner_keys"]
        saved = ctx.saved_tensors
        point, u_leaves = saved[: len(saved) - len(keys)], saved[len(saved) - len(keys):]
        inner, outer, data = _split(spec, point)
        _refuse_wrong_third_derivatives(spec, inner, outer, data)
        u = dict(zip(keys, u_leaves, strict=True))
        gu = [torch.zeros_like(x) if g is None else g for x, g in zip(u_leaves, grad_u, strict=True)]
        w_leaves = _LinearSolve.apply(spec, *gu, *point)  # the transposed (= same, symmetric) system
        w = dict(zip(keys, w_leaves, strict=True))
        grad_i = _grad_inner(spec)

        def pairing(i: Tree, o: Tree, a: tuple[Tensor, ...]) -> Tensor:
            hu = torch.func.jvp(lambda p: grad_i(p, o, a), (i,), (u,))[1]
            return tree_dot(w, hu)

        gi, go, ga = torch.func.grad(pairing, argnums=(0, 1, 2))(inner, outer, data)
        return (None, *w_leaves, *(-gi[k] for k in keys), *(-go[k] for k in spec["outer_keys"]),
                *(-g for g in ga))


class _ImplicitRoot(torch.autograd.Function):
    r"""Leaves ``(spec, *inner, *outer, *data)`` -> a copy of ``inner``; backward by the IFT."""

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
        inner, outer, data = _split(spec, point)
        _check_stationary(spec, inner, outer, data)
        v = [torch.zeros_like(x) if g is None else g for x, g in zip(inner.values(), grad_inner, strict=True)]
        u = dict(zip(spec["inner_keys"], _LinearSolve.apply(spec, *v, *point), strict=True))
        n_in, n_out = len(spec["inner_keys"]), len(spec["outer_keys"])
        data_grads = any(ctx.needs_input_grad[1 + n_in + n_out:])
        go, ga = _cross(spec, inner, outer, data, u, data_grads)
        ga_out = tuple(-g for g in ga) if data_grads else tuple(None for _ in spec["slots"])
        return (None, *(None for _ in spec["inner_keys"]), *(-go[k] for k in spec["outer_keys"]), *ga_out)


# --- the decorator -------------------------------------------------------------------------

def _check_solver(solver: object) -> Solver:
    if solver is None:
        return CG()
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, type) and issubclass(solver, Solver):
        raise TypeError(f"custom_root: solver must be a Solver instance, got the class {solver.__name__}; "
                        f"call it: solver={solver.__name__}() (or with options, e.g. "
                        f"{solver.__name__}(maxiter=100, tol=1e-6))")
    what = (f"the function {getattr(solver, '__qualname__', solver)!r}" if callable(solver)
            else f"{solver!r} of type {type(solver).__name__}")
    raise TypeError(f"custom_root: solver must be a hypergrad Solver instance such as CG(), MINRES() or "
                    f"GMRES(), got {what}; pass one of those (custom solvers subclass hypergrad.Solver)")


def _detach_tensors(items: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in items}


def custom_root(
    lower_loss: Callable[..., Tensor],
    solver: Solver | None = None,
    *,
    hvp_method: HVPMethod = "reverse",
    damping: float = 0.0,
    stationarity_tol: float | None = 1e-3,
    on_failure: OnFailure = "warn",
    on_solve: Callable[[SolveStats], None] | None = None,
) -> Callable[[Callable[..., Tree]], Callable[..., Tree]]:
    r"""Decorator: ``solve_inner(outer, *args, **kwargs) -> inner`` becomes differentiable through the IFT.

    The decorated function runs the inner solver with gradients enabled (so it may call
    ``torch.autograd.grad``, e.g. a hand-written gradient-descent loop) on detached copies of
    ``outer`` and of the tensor arguments, and its output is detached from whatever graph the
    loop built: the unrolled iterations are never differentiated. The output carries the
    backward rule :math:`\bar o = -(\nabla^2_{o i} L)\,(H + \delta I)^{-1} \bar i`, so
    ``upper_loss(inner, outer).backward()`` fills ``outer``'s ``.grad`` with the total
    derivative (the direct term flows through ``outer`` as usual).

    Before the IFT is applied (in the backward) the inner point is checked: with
    :math:`g = \nabla_i L` and :math:`H = \nabla^2_{ii} L` at it, the estimated relative distance
    to the stationary point

    .. math::
        \rho = \frac{\|g\|^3}{|g^\top H g|\;\|i\|}

    (the Newton step's length along :math:`g`, over :math:`\|i\|`; see
    :func:`hypergrad._custom_root.relative_stationarity`) must not exceed ``stationarity_tol``,
    else a :class:`NotStationaryWarning`. :math:`\rho` does not change when the loss is scaled.

    The backward is itself differentiable: the linear solve is differentiated implicitly
    (another solve with the same operator, plus a third-derivative product of ``L``; the
    solver's iterations are never unrolled), so ``torch.autograd.grad(..., create_graph=True)``
    followed by a second ``grad`` gives exact second derivatives (Hessians, Hessian-vector
    products of the upper loss). torch 2.14.1 computes third derivatives through batch norm with
    batch statistics, instance norm and layer norm wrongly, so a second derivative whose
    ``lower_loss`` calls one of them raises :class:`ThirdDerivativeError` (first derivatives are
    right). Both autograd functions have ``setup_context`` and a generated vmap rule: the
    decorated function works under ``torch.func.vmap`` / ``grad`` with a fixed-iteration solver
    (``tol=0``; a tolerance check reads a value). Inside a ``torch.func`` transform the Hessian
    products are forward-over-reverse whatever ``hvp_method`` says, and the stationarity check
    is skipped (it reads a value).

    Args:
        lower_loss: ``L(inner, outer, *args, **kwargs)``: the scalar whose stationary point the
            decorated function returns. It receives the positional ``args`` of the decorated call
            (data, for example) and those keyword arguments its signature names (all of them if
            it takes ``**kwargs``; the others are options of ``solve_inner`` only). Tensors among
            them get gradients too if they require them.
        solver: a :class:`Solver` instance for :math:`(H + \delta I) u = \bar i` (default
            ``CG(maxiter=100, tol=1e-6)``); checked here, a class or a function is a ``TypeError``.
        hvp_method: Hessian-vector product method.
        damping: :math:`\delta \ge 0`.
        stationarity_tol: warn when :math:`\rho` exceeds it (one extra gradient and
            Hessian-vector product and one host read per backward); ``None`` skips the check.
        on_failure: what a solve with a tolerance that misses it, breaks down or goes
            non-finite does: ``"warn"``, ``"raise"`` or ``"ignore"``.
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
    if stationarity_tol is not None and not (isinstance(stationarity_tol, (int, float)) and stationarity_tol >= 0):
        raise ValueError(f"custom_root: stationarity_tol must be a number >= 0 or None, got {stationarity_tol!r}")
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"custom_root: on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
    accepted = _keywords_accepted(lower_loss)
    spec_base: dict[str, Any] = {
        "lower_loss": lower_loss,
        "solver": _check_solver(solver),
        "hvp_method": hvp_method,
        "damping": float(damping),
        "stationarity_tol": None if stationarity_tol is None else float(stationarity_tol),
        "on_failure": on_failure,
        "on_solve": on_solve,
    }

    def decorate(solve_inner: Callable[..., Tree]) -> Callable[..., Tree]:
        @functools.wraps(solve_inner)
        def wrapper(outer: Tree, *args: Any, **kwargs: Any) -> Tree:
            with torch.enable_grad():
                found = solve_inner({k: v.detach() for k, v in outer.items()},
                                    *_detach_tensors(enumerate(args)).values(), **_detach_tensors(kwargs.items()))
            if not isinstance(found, dict) or not found or not all(isinstance(x, Tensor) for x in found.values()):
                raise TypeError(f"custom_root: {getattr(solve_inner, '__name__', 'solve_inner')} must return a "
                                f"non-empty dict name -> Tensor, got {type(found).__name__}")
            inner = {k: x.detach() for k, x in found.items()}  # cut the unrolled loop's graph
            passed = {k: v for k, v in kwargs.items() if accepted is None or k in accepted}
            slots: tuple[int | str, ...] = (*(n for n, a in enumerate(args) if isinstance(a, Tensor)),
                                            *(k for k, a in passed.items() if isinstance(a, Tensor)))
            spec: dict[str, Any] = {
                **spec_base, "outer_keys": list(outer), "inner_keys": list(inner), "slots": slots,
                "args": tuple(None if isinstance(a, Tensor) else a for a in args),
                "kwargs": {k: None if isinstance(a, Tensor) else a for k, a in passed.items()}}
            data = tuple(args[s] if isinstance(s, int) else passed[s] for s in slots)
            out = _ImplicitRoot.apply(spec, *inner.values(), *outer.values(), *data)
            return dict(zip(spec["inner_keys"], out, strict=True))

        return wrapper

    return decorate
