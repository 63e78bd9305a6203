r"""Conjugate gradient that recycles the directions of earlier solves with the same operator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from .._errors import TransformError
from .._func import vmap_active
from .._operator import LinearOperator
from .._recycler import KrylovRecycler
from .._solution import SolveStats
from .._tree import Tree, tree_add, tree_sub
from ._base import Callback, Monitor, initial_residual
from .cg import CG

__all__ = ["RecycledCG"]


class _Recording(LinearOperator):
    """Passes products through to ``base`` and keeps every ``(X, A X)`` pair of one solve."""

    def __init__(self, base: LinearOperator) -> None:
        self.base = base
        self.symmetric, self.positive_definite = base.symmetric, base.positive_definite
        self.inputs: list[Tree] = []
        self.outputs: list[Tree] = []

    def mv(self, x: Tree) -> Tree:
        return {k: v[0] for k, v in self.matmat({k: v.unsqueeze(0) for k, v in x.items()}).items()}

    def matmat(self, X: Tree) -> Tree:
        AX = self.base.matmat(X)
        self.inputs.append(X)
        self.outputs.append(AX)
        return AX


def _concat(trees: list[Tree]) -> Tree:
    return {k: torch.cat([t[k] for t in trees]) for k in trees[0]}


@dataclass(frozen=True)
class RecycledCG(CG):
    r"""CG from the Galerkin guess of a :class:`hypergrad.KrylovRecycler`, adding its directions after.

    For solves that share an operator (BiSSL's upper steps within one alternation), each solve

    1. starts from :math:`x_0 = U^\top E^{+} U b` (the :math:`A`-norm-best guess in the recycled
       basis; :math:`A x_0` comes from the stored products, so **no extra product**), then
    2. runs ``maxiter`` CG iterations (optionally preconditioned by the recycler's deflation map,
       ``deflate=True``, 2 passes over the basis per iteration), and
    3. adds its search directions and their products to the recycler (``update=True``).

    Costs the same products as :class:`CG`; the extra work is vector arithmetic on the basis (see
    :mod:`hypergrad._recycler`). ``stats.residual_history[0]`` is the residual of the guess. With
    a given ``x0`` the guess corrects it (one product for its residual, as in CG). The recycler
    mutates, so a solve cannot run under ``torch.func.vmap``.

    Args:
        recycler: the :class:`hypergrad.KrylovRecycler` (one per operator).
        deflate: precondition with the recycler's deflation map (excludes ``preconditioner``).
        update: add this solve's directions to the recycler.

    The other arguments are those of :class:`hypergrad.CG`.

    Example:
        >>> recycler = KrylovRecycler(params, capacity=32)
        >>> solver = RecycledCG(recycler=recycler, maxiter=3, tol=0.0)
        >>> xs = [solver.solve(A, v).value for v in rhs]
    """

    recycler: KrylovRecycler | None = None
    deflate: bool = False
    update: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.recycler, KrylovRecycler):
            raise ValueError(f"RecycledCG: recycler must be a hypergrad.KrylovRecycler, got {self.recycler!r}; "
                             f"build one per operator: KrylovRecycler(params, capacity=32)")
        if self.deflate and self.preconditioner is not None:
            raise ValueError("RecycledCG: deflate=True preconditions with the recycled basis; pass no "
                             "preconditioner, or deflate=False to use your own")

    def _solve(self, operator: LinearOperator, B: Tree, X0: Tree | None,
               callback: Callback | None = None) -> tuple[Tree, SolveStats]:
        if vmap_active():
            raise TransformError("RecycledCG mutates its KrylovRecycler, which torch.func.vmap cannot batch; "
                                 "use CG under vmap")
        recycler = cast(KrylovRecycler, self.recycler)  # validated in __post_init__
        recycler.bind(operator)
        X, R, used = initial_residual(operator, B, X0)
        guess, A_guess = recycler.galerkin(R)
        X, R = tree_add(X, guess), tree_sub(R, A_guess)
        monitor = Monitor(self, B, R, num_hvp=used, callback=callback)
        recording = _Recording(operator)
        precondition = recycler.preconditioner() if self.deflate else self.preconditioner
        X = self._iterate(recording, X, R, monitor, precondition)
        monitor.finish(operator, B, X)
        if self.update and recording.inputs:
            recycler.add(_concat(recording.inputs), _concat(recording.outputs))
        return X, monitor.stats()
