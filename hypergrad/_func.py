r"""The ``torch.func`` path: gradients and Hessian products without ``torch.autograd.grad``.

Inside a functorch transform (``torch.func.vmap``, ``grad``, ``jvp``, ...) the autograd path
cannot run: it calls ``requires_grad_`` on fresh leaves, which functorch forbids. Under
``torch.compile`` it breaks the graph. The functions here build the same quantities from
``torch.func`` alone:

* gradient :math:`\nabla f(p)`: ``torch.func.grad``;
* reverse-mode Hessian products :math:`Hv`: the pullback of ``grad(f)`` (one linearisation
  reused for every product, the counterpart of reusing a ``create_graph`` gradient graph);
* forward-over-reverse :math:`Hv`: ``jvp(grad(f))`` (already pure ``torch.func``).

``backend`` arguments across hypergrad choose the path: ``"autograd"``, ``"func"``, or
``"auto"`` (the default), which takes ``"func"`` exactly when a functorch transform is active or
``torch.compile`` is tracing, and ``"autograd"`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ._errors import TransformError

if TYPE_CHECKING:  # _tree imports this module
    from ._tree import Tree

__all__ = [
    "BACKENDS",
    "Backend",
    "batched_products",
    "compiling",
    "detached",
    "func_gradient",
    "func_reverse_hvp_batched",
    "linearize_gradient",
    "transform_active",
    "use_func",
    "vjp",
    "vmap_active",
]

Backend = Literal["auto", "autograd", "func"]
BACKENDS = ("auto", "autograd", "func")


def compiling() -> bool:
    """Whether ``torch.compile`` (dynamo) is tracing the caller."""
    return bool(torch.compiler.is_compiling())


def transform_active() -> bool:
    """Whether the caller runs inside a functorch transform (``vmap``, ``grad``, ``jvp``, ...)."""
    return torch._C._functorch.maybe_current_level() is not None


def vmap_active() -> bool:
    """Whether a ``torch.func.vmap`` level is on the functorch interpreter stack."""
    if not transform_active():
        return False
    stack = torch._C._functorch.get_interpreter_stack() or []
    vmap = torch._C._functorch.TransformType.Vmap
    return any(level.key() == vmap for level in stack)


def use_func(backend: str, where: str = "backend") -> bool:
    """Resolve a ``backend`` argument: ``True`` for the ``torch.func`` path.

    Raises:
        ValueError: an unknown backend.
        TransformError: ``backend="autograd"`` inside a functorch transform.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{where} must be 'auto', 'autograd' or 'func', got {backend!r}")
    if backend == "func":
        return True
    if compiling():
        return backend == "auto"
    active = transform_active()
    if backend == "autograd" and active:
        raise TransformError(
            f"{where}='autograd' cannot run inside a torch.func transform (vmap/grad/jvp): it needs "
            f"requires_grad_ and torch.autograd.grad; pass {where}='func' or 'auto'"
        )
    return active


def vjp(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    """``torch.func.vjp`` without auxiliary outputs: ``(fn(*primals), pullback)``."""
    out = torch.func.vjp(fn, *primals)
    return out[0], out[1]


def _scalar(f: Callable[[Tree], Tensor], name: str) -> Callable[[Tree], Tensor]:
    def checked(p: Tree) -> Tensor:
        out = f(p)
        if not isinstance(out, Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"{name} must return a scalar tensor, got {shape}; reduce it with .mean() or .sum()")
        return out.reshape(())

    return checked


def detached(tree: Mapping[str, Tensor]) -> Tree:
    return {k: v.detach() for k, v in tree.items()}


def func_gradient(f: Callable[[Tree], Tensor], params: Mapping[str, Tensor]) -> Tree:
    r""":math:`\nabla f(p)` by ``torch.func.grad`` (``params`` detached first)."""
    grads: Tree = torch.func.grad(_scalar(f, "f"))(detached(params))
    return grads


def linearize_gradient(f: Callable[[Tree], Tensor],
                       params: Mapping[str, Tensor]) -> tuple[Tree, Callable[[Tree], Tree]]:
    r"""``(g, hvp)``: :math:`g = \nabla f(p)` and :math:`v \mapsto Hv`, the pullback of ``grad(f)``.

    The linearisation is built once; each ``hvp(v)`` costs one backward through it. Under
    ``vmap`` it is batched like any other function.
    """
    g, pullback = vjp(torch.func.grad(_scalar(f, "f")), detached(params))

    def hvp(v: Tree) -> Tree:
        out: Tree = pullback(dict(v))[0]
        return out

    return g, hvp


def batched_products(hvp: Callable[[Tree], Tree], V: Mapping[str, Tensor]) -> Tree:
    """``hvp`` applied to k trees stacked on a leading dimension (``vmap`` when k > 1)."""
    if next(iter(V.values())).shape[0] == 1:
        return {k: x.unsqueeze(0) for k, x in hvp({k: t[0] for k, t in V.items()}).items()}
    out: Tree = torch.func.vmap(hvp)(dict(V))
    return out


def func_reverse_hvp_batched(f: Callable[[Tree], Tensor], params: Mapping[str, Tensor],
                             V: Mapping[str, Tensor]) -> Tree:
    """Reverse-over-reverse products for k stacked tangents, ``torch.func`` only."""
    return batched_products(linearize_gradient(f, params)[1], V)
