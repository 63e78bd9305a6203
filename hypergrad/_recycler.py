r"""Krylov recycling across solves that share an operator (BiSSL: the upper steps of one alternation).

A :class:`KrylovRecycler` keeps an orthonormal basis :math:`U` (rows of a ``(capacity, n)``
matrix, in the leaves' precision and at least float32) of directions met by earlier solves, with
:math:`AU` (from those solves' own products: no new product) and the small Galerkin matrix
:math:`E = U A U^\top`. It gives a new solve

* the **Galerkin initial guess** :math:`x_0 = U^\top E^{+} U b` — the best guess in
  :math:`\mathrm{span}\,U` in the :math:`A`-norm — with :math:`A x_0 = (AU)^\top E^{+} U b`,
  so the initial residual costs no product; and
* optionally the **deflation preconditioner**
  :math:`P^{-1} = I + U^\top V(\Lambda^{-1} - I)V^\top U` (:math:`E = V\Lambda V^\top`), which
  maps the eigenvalues of :math:`A` on an invariant :math:`\mathrm{span}\,U` to 1.

New directions are orthonormalised **incrementally** against the stored basis (two rounds of block
classical Gram-Schmidt, each followed by an eigenvalue-based orthonormalisation of the new block);
the stored basis is never restacked or re-orthonormalised. When the basis is full, the oldest
directions are overwritten (dropping rows of an orthonormal basis keeps it orthonormal). No step
reads a value on the host: directions that are (numerically) dependent on the basis become zero
rows, which every formula ignores. (On a GPU, ``torch.linalg.eigh`` of the small matrices checks
its own errors on the host: 3 synchronisations per :meth:`add`, after the solve's iterations.)

Vector work, in passes over the stored ``m x n`` basis (``m`` the directions held so far): 7 per
:meth:`add` (3 per Gram-Schmidt round, 1 for :math:`E`) and 3 per :meth:`galerkin`; the deflation
preconditioner costs 2 per CG iteration. Compare with the cost of one product: on a GPU the
passes are cheap; on a CPU with ``m = 32`` and ``n = 11``M they cost a sizeable part of a product.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ._operator import LinearOperator
from ._preconditioner import _flatten_batched, _unflatten_batched
from ._tree import Tree, accum_dtype

__all__ = ["KrylovRecycler"]


class KrylovRecycler:
    r"""A recycled orthonormal basis :math:`U`, :math:`AU` and :math:`E = U A U^\top` for one operator.

    Stateful by design (pass it to :class:`hypergrad.RecycledCG`, which reads it before each solve
    and adds the solve's directions after): build one per operator and drop it, or
    :meth:`reset` it, when the operator changes. The first :meth:`add` binds it to that operator;
    using it with another raises ``ValueError``.

    Args:
        like: a tree with the operator's shapes, dtypes and device (e.g. the parameters).
        capacity: directions kept (rows of :math:`U`); memory ``2 * capacity * n`` numbers.
        drop_tol: a new direction whose part outside the basis is at most ``drop_tol`` times the
            largest new direction's norm is dependent and dropped.
        rcond: eigenvalues of :math:`E` at most ``rcond`` times the largest (or non-positive:
            directions of non-positive curvature of an indefinite operator) are left out of
            :math:`E^{+}`.

    Example:
        >>> recycler = KrylovRecycler(params, capacity=32)
        >>> solver = RecycledCG(recycler=recycler, maxiter=3, tol=0.0)
        >>> xs = [solver.solve(A, v).value for v in rhs]  # later solves start from a better guess
    """

    def __init__(self, like: Mapping[str, Tensor], capacity: int = 32, *, drop_tol: float = 1e-3,
                 rcond: float = 1e-6) -> None:
        if not like:
            raise ValueError("KrylovRecycler: like must be a non-empty tree of tensors (e.g. the parameters)")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"KrylovRecycler: capacity must be an int >= 1, got {capacity!r}")
        for name, value in (("drop_tol", drop_tol), ("rcond", rcond)):
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"KrylovRecycler: {name} must be a number in (0, 1), got {value!r}")
        self.like = {k: v.detach() for k, v in like.items()}
        self.keys = list(self.like)
        ref = self.like[self.keys[0]]
        self.dtype = accum_dtype(ref.dtype)
        n = sum(v.numel() for v in self.like.values())
        self.capacity, self.drop_tol, self.rcond = capacity, float(drop_tol), float(rcond)
        self.U = torch.zeros(capacity, n, dtype=self.dtype, device=ref.device)
        self.AU = torch.zeros_like(self.U)
        self.E = torch.zeros(capacity, capacity, dtype=torch.float64, device=ref.device)
        self.active = torch.zeros(capacity, dtype=torch.bool, device=ref.device)
        self._E_inv = torch.zeros_like(self.E)  # E^+ over the kept eigenvalues
        self._P = torch.zeros_like(self.E)  # V (Lambda^-1 - I) V^T over the kept eigenvalues
        self.filled = 0  # rows ever written (a Python int: slots fill in order, then wrap)
        self._next = 0
        self.operator: LinearOperator | None = None

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget every direction and the bound operator (for a new operator)."""
        self.U.zero_()
        self.AU.zero_()
        self.E.zero_()
        self.active.zero_()
        self._E_inv.zero_()
        self._P.zero_()
        self.filled, self._next, self.operator = 0, 0, None

    def bind(self, operator: LinearOperator) -> None:
        """Check that ``operator`` is the one the stored directions came from (binds an empty recycler)."""
        if self.operator is None:
            self.operator = operator
        elif self.operator is not operator:
            raise ValueError(
                f"KrylovRecycler holds directions of another operator ({type(self.operator).__name__} at "
                f"{id(self.operator):#x}); a recycled basis is only valid for the operator it came from. "
                f"Call recycler.reset() (or build a new KrylovRecycler) when the operator changes"
            )

    @property
    def size(self) -> Tensor:
        """Directions currently held (a 0-d tensor: reading it synchronises)."""
        return self.active.sum()

    # ------------------------------------------------------------------ adding directions

    def add(self, W: Tree, AW: Tree) -> None:
        """Add the directions ``W`` (a batched tree, leading dimension k) with their products ``AW``.

        Each is orthogonalised against the basis, the new block orthonormalised; dependent
        directions become zero rows. The oldest rows are overwritten once the basis is full.
        """
        w = _flatten_batched(W, self.keys).to(self.dtype)
        aw = _flatten_batched(AW, self.keys).to(self.dtype)
        if w.shape[0] > self.capacity:  # keep the most recent
            w, aw = w[-self.capacity:], aw[-self.capacity:]
        k = w.shape[0]
        slots = (torch.arange(k, device=w.device) + self._next) % self.capacity  # no host-to-device copy
        self.filled = min(self.capacity, self.filled + k)
        self._next = (self._next + k) % self.capacity
        # Free the slots first: the new block is orthogonalised against what stays.
        self.U[slots] = 0
        self.AU[slots] = 0
        self.active[slots] = False
        self.E[slots, :] = 0
        self.E[:, slots] = 0
        U, AU = self.U[: self.filled], self.AU[: self.filled]
        scale = w.norm(dim=1).max()
        for threshold in (self.drop_tol * scale, torch.tensor(0.5, dtype=scale.dtype, device=scale.device)):
            C = w @ U.mT  # (k, m): one pass over U
            w = w - C @ U  # one pass over U
            aw = aw - C @ AU  # one pass over AU
            w, aw = _orthonormalise(w, aw, threshold)
        self.U[slots], self.AU[slots] = w, aw
        self.active[slots] = w.norm(dim=1) > 0.5
        # New columns of E = U A U^T (one pass over U), symmetrised on the new block.
        cols = (U @ aw.mT).double()  # (m, k)
        self.E[: self.filled, slots] = cols
        self.E[slots, : self.filled] = cols.mT
        block = self.E[slots][:, slots]
        self.E[slots.unsqueeze(1), slots.unsqueeze(0)] = (block + block.mT) / 2
        self._factor()

    def _factor(self) -> None:
        """:math:`E^+` and the deflation map over the eigenvalues of :math:`E` above ``rcond``."""
        diag = self.E.diagonal().abs()
        fill = torch.where(self.active, diag, torch.zeros_like(diag)).max().clamp_min(torch.finfo(torch.float64).tiny)
        # Inactive rows/columns are zero: a unit diagonal there (scaled like E) keeps eigh well posed;
        # U's rows there are zero, so those eigenvectors never act.
        E = self.E + torch.diag(torch.where(self.active, torch.zeros_like(diag), fill))
        lam, V = torch.linalg.eigh((E + E.mT) / 2)
        keep = lam > self.rcond * lam.abs().max()
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        self._E_inv = (V * inv) @ V.mT
        self._P = (V * torch.where(keep, inv - 1.0, torch.zeros_like(lam))) @ V.mT

    # ------------------------------------------------------------------ using the basis

    def galerkin(self, B: Tree) -> tuple[Tree, Tree]:
        r"""``(X0, A X0)`` with :math:`x_0 = U^\top E^{+} U b` for each of the k stacked ``b`` (no product)."""
        if self.filled == 0:
            zeros = {k: torch.zeros_like(v) for k, v in B.items()}
            return zeros, {k: torch.zeros_like(v) for k, v in B.items()}
        U, AU = self.U[: self.filled], self.AU[: self.filled]
        b = _flatten_batched(B, self.keys).to(self.dtype)
        y = ((b @ U.mT).double() @ self._E_inv[: self.filled, : self.filled]).to(self.dtype)  # (k, m)
        like = {k: v[0] for k, v in B.items()}
        return _unflatten_batched(y @ U, like, self.keys), _unflatten_batched(y @ AU, like, self.keys)

    def preconditioner(self) -> Callable[[Tree], Tree]:
        r"""The deflation map :math:`r \mapsto r + U^\top V(\Lambda^{-1} - I)V^\top U r` (symmetric positive
        definite) for ``CG(preconditioner=...)``; it reads the basis as it is when called."""
        filled = self.filled
        U, P = self.U[:filled], self._P[:filled, :filled]

        def apply(R: Tree) -> Tree:
            if filled == 0:
                return dict(R)
            r = _flatten_batched(R, self.keys).to(self.dtype)
            out = r + ((r @ U.mT).double() @ P).to(self.dtype) @ U
            return _unflatten_batched(out, {k: v[0] for k, v in R.items()}, self.keys)

        return apply


def _orthonormalise(w: Tensor, aw: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal rows spanning ``w``'s rows of norm above ``threshold`` (others zero), ``aw`` alike.

    From the eigendecomposition of the k x k Gram matrix in float64 (no host read).
    """
    gram = (w @ w.mT).double()
    lam, V = torch.linalg.eigh((gram + gram.mT) / 2)
    keep = lam > threshold.double() ** 2
    scale = torch.where(keep, torch.where(keep, lam, torch.ones_like(lam)).rsqrt(), torch.zeros_like(lam))
    T = (V * scale).mT.to(w.dtype)  # (k, k): zero rows where dropped
    return T @ w, T @ aw
