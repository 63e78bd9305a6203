r"""Low-precision views of operators: products in bfloat16/float16, vectors in the caller's dtype.

Products dominate an iterative solve, and a bfloat16 Hessian-vector product costs about 0.6 of
a float32 one on a CPU with bf16 instructions (more on a GPU), but bfloat16 products alone stall
the solve at their rounding level (~1e-2 relative error). :class:`hypergrad.Refinement` uses such
a view for its inner corrections and full-precision products for its residuals, which removes
that floor.

* :class:`CastOperator` casts the tangents to ``dtype``, applies a base operator that computes in
  ``dtype`` (a bfloat16 matrix, a Hessian of a bfloat16 copy of a model) and casts the result
  back.
* :func:`low_precision` builds such a view of the library's own operators; for a
  :class:`HessianOperator` it runs the objective under ``torch.autocast`` (matrix products and
  convolutions in ``dtype``, reductions and normalisations in float32), with its own reused graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._hvp import Objective
from ._operator import (
    DampedOperator,
    FunctionOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
)
from ._tree import Tree
from .distributed import DistributedOperator

__all__ = ["CastOperator", "autocast_objective", "low_precision"]

LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def _check_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in LOW_PRECISION_DTYPES:
        raise ValueError(f"{name}: dtype must be torch.bfloat16 or torch.float16, got {dtype!r}")


@dataclass(frozen=True, eq=False)
class CastOperator(LinearOperator):
    r"""``base`` applied in ``dtype``: :math:`x \mapsto \mathrm{cast}_{x}(B\,\mathrm{cast}_{dtype}(x))`.

    ``base`` must accept and return trees in ``dtype`` (e.g.
    ``MatrixOperator(A.to(torch.bfloat16))`` or the :class:`HessianOperator` of a bfloat16 copy
    of a model and its batch). Results come back in the tangent's dtype, so a solver's vectors and
    Krylov scalars stay in float32. Tags are the base's.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> op = CastOperator(MatrixOperator(A.to(torch.bfloat16)), torch.bfloat16)
        >>> op.mv({"x": torch.ones(2)})["x"].dtype
        torch.float32
    """

    base: LinearOperator
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        _check_dtype(self.dtype, "CastOperator")

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return self.base.symmetric

    @property
    def positive_definite(self) -> bool:  # type: ignore[override]
        return self.base.positive_definite

    def _cast(self, X: Tree) -> Tree:
        return {k: v.to(self.dtype) for k, v in X.items()}

    def mv(self, x: Tree) -> Tree:
        out = self.base.mv(self._cast(x))
        return {k: out[k].to(v.dtype) for k, v in x.items()}

    def matmat(self, X: Tree) -> Tree:
        out = self.base.matmat(self._cast(X))
        return {k: out[k].to(v.dtype) for k, v in X.items()}


def autocast_objective(f: Objective, dtype: torch.dtype, device_type: str) -> Objective:
    """``f`` evaluated under ``torch.autocast(device_type, dtype)``, its value cast back to float32.

    Its gradient graph records the low-precision kernels, so a reused-graph
    :class:`HessianOperator` of it computes every product in ``dtype`` where autocast does
    (matrix products, convolutions) and in float32 elsewhere; tangents and results stay float32.
    """
    _check_dtype(dtype, "autocast_objective")

    def lowered(params: Tree) -> Tensor:
        with torch.autocast(device_type, dtype=dtype):
            value = f(params)
        return value.float() if value.dtype in LOW_PRECISION_DTYPES else value

    return lowered


def low_precision(operator: LinearOperator, dtype: torch.dtype = torch.bfloat16) -> LinearOperator:
    r"""A view of ``operator`` whose products are computed in ``dtype`` (inputs and outputs keep theirs).

    * :class:`HessianOperator`: the same objective under ``torch.autocast`` (see
      :func:`autocast_objective`) at the same point, with its own cache: build the view once and
      reuse it, since its first product builds (and keeps) its own gradient graph.
    * :class:`DampedOperator` :math:`aI + bB`: :math:`aI + b\,\mathrm{low}(B)` (the identity part is
      exact).
    * :class:`MatrixOperator`: a :class:`CastOperator` around the matrix rounded to ``dtype``.
    * :class:`FunctionOperator`: its functions under ``torch.autocast``.
    * :class:`DistributedOperator`: the lowered base, averaged across ranks.
    * :class:`CastOperator` of the same ``dtype``: returned as is.

    Other operators raise ``TypeError``: wrap a base that computes in ``dtype`` with
    :class:`CastOperator`.

    Example:
        >>> H = HessianOperator(lambda p: (p["w"] ** 4).sum(), {"w": torch.ones(3)})
        >>> low_precision(DampedOperator(H, 1.0, 0.1)).mv({"w": torch.ones(3)})["w"]
        tensor([2.2000, 2.2000, 2.2000])
    """
    _check_dtype(dtype, "low_precision")
    if isinstance(operator, CastOperator) and operator.dtype == dtype:
        return operator
    if isinstance(operator, DampedOperator):
        return DampedOperator(low_precision(operator.base, dtype), operator.identity_coeff, operator.operator_coeff)
    if isinstance(operator, DistributedOperator):
        return DistributedOperator(low_precision(operator.base, dtype), operator.group)
    if isinstance(operator, MatrixOperator):
        return CastOperator(MatrixOperator(operator.matrix.to(dtype), operator.key, operator.symmetric,
                                           operator.positive_definite), dtype)
    if isinstance(operator, HessianOperator):
        device_type = next(iter(operator.params.values())).device.type
        return HessianOperator(autocast_objective(operator.f, dtype, device_type), operator.params,
                               method=operator.method, reuse_graph=operator.reuse_graph, fd_eps=operator.fd_eps,
                               symmetric=operator.symmetric, positive_definite=operator.positive_definite,
                               backend=operator.backend)
    if isinstance(operator, FunctionOperator):
        return FunctionOperator(_autocast_map(operator.fn, dtype), operator.symmetric, operator.positive_definite,
                                None if operator.batched_fn is None else _autocast_map(operator.batched_fn, dtype))
    raise TypeError(
        f"low_precision does not know how to lower a {type(operator).__name__}; build a base operator that "
        f"computes in {dtype} and wrap it as hypergrad.CastOperator(base, {dtype})"
    )


def _autocast_map(fn: Callable[[Tree], Tree], dtype: torch.dtype) -> Callable[[Tree], Tree]:
    def lowered(x: Tree) -> Tree:
        device_type = next(iter(x.values())).device.type
        with torch.autocast(device_type, dtype=dtype):
            out = fn(x)
        return {k: out[k].to(v.dtype) for k, v in x.items()}

    return lowered
