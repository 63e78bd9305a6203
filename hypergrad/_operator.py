r"""Linear operators on trees of tensors.

An operator is a small immutable object with ``mv`` (one tree), ``matmat`` (k trees stacked on
a leading dimension) and tags that solvers check: ``symmetric`` and ``positive_definite``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._func import BACKENDS, Backend, batched_products, linearize_gradient, use_func
from ._hvp import GradientGraph, HVPMethod, Objective, hvp_batched, primals
from ._tree import Tree, check_compatible, tree_add, tree_scale

__all__ = [
    "DampedOperator",
    "FunctionOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
]


class LinearOperator(abc.ABC):
    """A linear map on trees. Subclasses implement :meth:`mv` and may override :meth:`matmat`."""

    symmetric: bool
    positive_definite: bool

    @abc.abstractmethod
    def mv(self, x: Tree) -> Tree:
        """``A x`` for one tree ``x``."""

    def matmat(self, X: Tree) -> Tree:
        """``A x_j`` for k trees stacked on the leading dimension of every leaf of ``X``."""
        k = next(iter(X.values())).shape[0]
        if k == 1:
            return {key: y.unsqueeze(0) for key, y in self.mv({key: x[0] for key, x in X.items()}).items()}
        cols = [self.mv({key: x[i] for key, x in X.items()}) for i in range(k)]
        return {key: torch.stack([c[key] for c in cols]) for key in cols[0]}


@dataclass(frozen=True, eq=False)
class HessianOperator(LinearOperator):
    r"""The Hessian :math:`H = \nabla^2 f(p)` of a scalar objective at a fixed point.

    Args:
        f: scalar objective of a tree (for modules, build it with :func:`hypergrad.functional`).
        params: the point ``p`` (detached internally; the caller's tensors are never modified).
        method: ``"reverse"``, ``"forward"`` or ``"finite_difference"``.
        reuse_graph: for ``"reverse"``, build the first-order graph once and reuse it for every
            product (cheaper; ``f`` — and a train-mode BatchNorm's buffer update, if ``f`` asks
            for one — runs once). ``False`` re-evaluates ``f`` on every product, as the BiSSL
            reference code does.
        fd_eps: fixed finite-difference step (default: scaled, see :mod:`hypergrad._hvp`).
        backend: ``"auto"`` (``torch.func`` inside a functorch transform or ``torch.compile``,
            autograd otherwise), ``"autograd"`` or ``"func"``. With ``"func"`` the reused
            first-order graph is a ``torch.func.vjp`` linearisation of ``grad(f)``. The cache is
            built on first use: use the operator inside the transform (or compiled function)
            that first used it.

    Example:
        >>> H = HessianOperator(lambda p: (p["w"] ** 4).sum(), {"w": torch.ones(3)})
        >>> H.mv({"w": torch.ones(3)})["w"]
        tensor([12., 12., 12.])
    """

    f: Objective
    params: Mapping[str, Tensor]
    method: HVPMethod = "reverse"
    reuse_graph: bool = True
    fd_eps: float | None = None
    symmetric: bool = True
    positive_definite: bool = False
    backend: Backend = "auto"
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in ("reverse", "forward", "finite_difference"):
            raise ValueError(
                f"method={self.method!r} is not an HVP method; use 'reverse', 'forward' or 'finite_difference'"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto', 'autograd' or 'func', got {self.backend!r}")

    @classmethod
    def from_graph(cls, graph: GradientGraph, f: Objective, params: Mapping[str, Tensor]) -> HessianOperator:
        """A reverse-mode operator that reuses an already built :class:`GradientGraph` of ``f`` at ``params``."""
        return cls(f, params, method="reverse", reuse_graph=True, backend="autograd", _cache={"graph": graph})

    @classmethod
    def from_linearization(cls, hvp: Callable[[Tree], Tree], f: Objective,
                           params: Mapping[str, Tensor]) -> HessianOperator:
        """A ``torch.func`` reverse-mode operator reusing ``hvp = v -> Hv`` (a built linearisation)."""
        return cls(f, params, method="reverse", reuse_graph=True, backend="func", _cache={"linearization": hvp})

    def gradient_graph(self) -> GradientGraph:
        """The cached first-order graph (built on first use)."""
        if "graph" not in self._cache:
            p = primals(self.params)
            self._cache["graph"] = GradientGraph(self.f(p), p)
        graph: GradientGraph = self._cache["graph"]
        return graph

    def mv(self, x: Tree) -> Tree:
        check_compatible(self.params, x, "params", "tangent")
        return {k: v[0] for k, v in self._products({k: v.unsqueeze(0) for k, v in x.items()}).items()}

    def matmat(self, X: Tree) -> Tree:
        check_compatible(self.params, X, "params", "tangents", batched_b=True)
        return self._products(X)

    def _products(self, X: Tree) -> Tree:
        if self.method == "reverse" and self.reuse_graph:
            if "linearization" in self._cache or use_func(self.backend):
                if "linearization" not in self._cache:
                    self._cache["linearization"] = linearize_gradient(self.f, self.params)[1]
                return batched_products(self._cache["linearization"], X)
            return self.gradient_graph().vjp_batched(X)
        return hvp_batched(self.f, self.params, X, method=self.method, fd_eps=self.fd_eps, backend=self.backend)


@dataclass(frozen=True, eq=False)
class DampedOperator(LinearOperator):
    r""":math:`A = a I + b B` for a base operator :math:`B`.

    The BiSSL system :math:`(I + H/(\lambda+\delta))\,x = v` is
    ``DampedOperator(H, identity_coeff=1, operator_coeff=1/(lam + delta))``
    (see :meth:`bissl_system`); Tikhonov damping :math:`H + \delta I` is ``(H, delta, 1)``.
    """

    base: LinearOperator
    identity_coeff: float = 1.0
    operator_coeff: float = 1.0

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return self.base.symmetric

    @property
    def positive_definite(self) -> bool:  # type: ignore[override]
        a, b = self.identity_coeff, self.operator_coeff
        return (self.base.positive_definite and a >= 0 and b > 0) or (a > 0 and b == 0)

    @classmethod
    def bissl_system(cls, hessian: LinearOperator, lam: float, delta: float) -> DampedOperator:
        r""":math:`I + H/(\lambda + \delta)`: the operator the BiSSL reference code inverts."""
        if lam + delta <= 0:
            raise ValueError(f"lam + delta must be positive, got lam={lam}, delta={delta}")
        return cls(hessian, 1.0, 1.0 / (lam + delta))

    def _combine(self, x: Tree, bx: Tree) -> Tree:
        return tree_add(tree_scale(x, self.identity_coeff), tree_scale(bx, self.operator_coeff))

    def mv(self, x: Tree) -> Tree:
        return self._combine(x, self.base.mv(x))

    def matmat(self, X: Tree) -> Tree:
        return self._combine(X, self.base.matmat(X))


@dataclass(frozen=True, eq=False)
class FunctionOperator(LinearOperator):
    """A user-supplied linear map ``fn(x) -> Ax`` with declared tags.

    ``batched_fn``, if given, maps k stacked trees at once (otherwise ``fn`` is looped).
    """

    fn: Callable[[Tree], Tree]
    symmetric: bool = False
    positive_definite: bool = False
    batched_fn: Callable[[Tree], Tree] | None = None

    def mv(self, x: Tree) -> Tree:
        return self.fn(x)

    def matmat(self, X: Tree) -> Tree:
        if self.batched_fn is not None:
            return self.batched_fn(X)
        return super().matmat(X)


@dataclass(frozen=True, eq=False)
class MatrixOperator(LinearOperator):
    """A dense matrix acting on the one-leaf tree ``{key: vector}`` (tests, small problems).

    ``symmetric=None`` checks symmetry once at construction.
    """

    matrix: Tensor
    key: str = "x"
    symmetric: bool = None  # type: ignore[assignment]
    positive_definite: bool = False

    def __post_init__(self) -> None:
        if self.matrix.dim() != 2 or self.matrix.shape[0] != self.matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(self.matrix.shape)}")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", bool(torch.allclose(self.matrix, self.matrix.mT)))

    def mv(self, x: Tree) -> Tree:
        return {self.key: self.matrix @ x[self.key]}

    def matmat(self, X: Tree) -> Tree:
        return {self.key: X[self.key] @ self.matrix.mT}
