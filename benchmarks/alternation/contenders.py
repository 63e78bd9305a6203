"""The contenders: each runs one alternation's solves, one right-hand side after the other.

A contender sees the right-hand sides in order and may keep state across them (warm start,
recycled Krylov vectors, a preconditioner sketched once), but never batches products across
them: in BiSSL, ``v_k`` depends on the upper step that used ``x_{k-1}``. A :class:`Recorder`
timestamps every iteration and keeps the iterates, so one run with ``K`` iterations gives the
whole error-vs-time curve for ``k <= K`` (for contenders whose iterations do not depend on the
budget); budget-dependent contenders (warm start, recycling) run once per budget.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import hypergrad as hg

from .._common import ravel, unravel
from .reference import CountingProduct, layerwise_cg
from .workload import Alternation, Params, pretext_loss

# ---------------------------------------------------------------------------------------------
# Timing and recording


class Clock:
    """Wall time on CPU; CUDA events on a GPU (read after one synchronisation at the end)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return float(start.elapsed_time(end)) / 1000.0
        return float(end - start)


@dataclass
class Recorder:
    """Marks of one alternation: setup, then per right-hand side its start and every iteration."""

    clock: Clock
    count: Callable[[], int]  # operator products so far
    setup: tuple[Any, Any] | None = None
    setup_products: int = 0
    starts: list[tuple[Any, int]] = field(default_factory=list)
    marks: list[list[tuple[Any, int, int]]] = field(default_factory=list)
    iterates: list[list[Params]] = field(default_factory=list)

    def setup_begin(self) -> None:
        self._setup_start = self.clock.mark()
        self._setup_count = self.count()

    def setup_end(self) -> None:
        self.setup = (self._setup_start, self.clock.mark())
        self.setup_products = self.count() - self._setup_count

    def rhs_begin(self) -> None:
        self.starts.append((self.clock.mark(), self.count()))
        self.marks.append([])
        self.iterates.append([])

    def iterate(self, k: int, x: Mapping[str, Tensor], shift: Mapping[str, Tensor] | None = None) -> None:
        """Record iteration ``k`` (the iterate is ``x``, plus ``shift`` for correction solves)."""
        self.marks[-1].append((self.clock.mark(), self.count(), k))
        value = {n: t.detach().clone() for n, t in x.items()}
        if shift is not None:
            value = {n: t + shift[n] for n, t in value.items()}
        self.iterates[-1].append(value)

    def curve(self) -> list[dict[str, float]]:
        """Per budget k = 1..K: the alternation's time and products (setup included)."""
        setup_s = self.clock.seconds(*self.setup) if self.setup else 0.0
        depth = min(len(m) for m in self.marks) if self.marks else 0
        points = []
        for k in range(depth):
            seconds = setup_s + sum(self.clock.seconds(s[0], m[k][0]) for s, m in zip(self.starts, self.marks, strict=True))
            products = self.setup_products + sum(m[k][1] - s[1] for s, m in zip(self.starts, self.marks, strict=True))
            points.append({"iterations": self.marks[0][k][2], "seconds": seconds, "products": products, "setup_seconds": setup_s})
        return points


class CountingOperator(hg.LinearOperator):
    """Wraps an operator and counts its products (a batched product of k tangents counts k)."""

    def __init__(self, base: hg.LinearOperator) -> None:
        self.base, self.n = base, 0
        self.symmetric, self.positive_definite = base.symmetric, base.positive_definite

    def mv(self, x: hg.Tree) -> hg.Tree:
        self.n += 1
        return self.base.mv(x)

    def matmat(self, X: hg.Tree) -> hg.Tree:
        self.n += next(iter(X.values())).shape[0]
        return self.base.matmat(X)


class CastOperator(hg.LinearOperator):
    """Products computed in ``compute_dtype`` (e.g. bfloat16), returned in the tangent's dtype."""

    def __init__(self, base: hg.LinearOperator, compute_dtype: torch.dtype) -> None:
        self.base, self.compute_dtype = base, compute_dtype
        self.symmetric, self.positive_definite = base.symmetric, base.positive_definite

    def mv(self, x: hg.Tree) -> hg.Tree:
        out = self.base.mv({k: v.to(self.compute_dtype) for k, v in x.items()})
        return {k: out[k].to(v.dtype) for k, v in x.items()}

    def matmat(self, X: hg.Tree) -> hg.Tree:
        out = self.base.matmat({k: v.to(self.compute_dtype) for k, v in X.items()})
        return {k: out[k].to(v.dtype) for k, v in X.items()}


class RecordingOperator(hg.LinearOperator):
    """Keeps the last ``capacity`` pairs ``(u, A u)`` of the products it computes (flattened)."""

    def __init__(self, base: hg.LinearOperator, capacity: int) -> None:
        self.base, self.capacity = base, capacity
        self.symmetric, self.positive_definite = base.symmetric, base.positive_definite
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []

    def mv(self, x: hg.Tree) -> hg.Tree:
        return {k: v[0] for k, v in self.matmat({k: v.unsqueeze(0) for k, v in x.items()}).items()}

    def matmat(self, X: hg.Tree) -> hg.Tree:
        AX = self.base.matmat(X)
        keys = list(X)
        self.inputs += list(torch.cat([X[k].flatten(1) for k in keys], dim=1))
        self.outputs += list(torch.cat([AX[k].flatten(1) for k in keys], dim=1))
        self.inputs, self.outputs = self.inputs[-self.capacity :], self.outputs[-self.capacity :]
        return AX


def gram(X: Tensor, Y: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``X @ Y.T`` accumulated in float64 over column chunks (no float64 copy of X or Y)."""
    out = torch.zeros(X.shape[0], Y.shape[0], dtype=torch.float64, device=X.device)
    for i in range(0, X.shape[1], chunk):
        out += X[:, i : i + chunk].double() @ Y[:, i : i + chunk].double().T
    return out


class RecycledSpace:
    r"""An orthonormal basis ``W`` of recycled directions with ``AW`` and ``E = W^T A W``.

    Built from stored pairs ``(u_i, A u_i)``: the Gram matrix of the ``u_i`` is
    eigendecomposed and directions with eigenvalue below ``rcond`` times the largest are
    dropped (directions of different solves can be nearly dependent), so ``W = U^T V
    \Lambda^{-1/2}`` and ``AW`` follows from the stored products without a new one.
    """

    def __init__(self, U: Tensor, AU: Tensor, rcond: float = 1e-6) -> None:
        G = gram(U, U)
        lam, vec = torch.linalg.eigh((G + G.T) / 2)
        keep = lam > rcond * lam.max()
        T = (vec[:, keep] / lam[keep].sqrt()).to(U.dtype)  # (m, r)
        self.W, self.AW = T.T @ U, T.T @ AU  # (r, n)
        E = gram(self.W, self.AW)
        e_val, e_vec = torch.linalg.eigh((E + E.T) / 2)
        good = e_val > rcond * e_val.abs().max()  # drop directions of non-positive curvature
        self.e_vec, self.e_val = e_vec[:, good].to(U.dtype), e_val[good].to(U.dtype)
        self.size = int(good.sum())

    def _e_inv(self, coeff: Tensor) -> Tensor:
        return ((coeff @ self.e_vec) / self.e_val) @ self.e_vec.T

    def galerkin(self, b: Tensor) -> tuple[Tensor, Tensor]:
        r"""``x0 = W E^{-1} W^T b`` (the A-norm-best guess in span W) and ``A x0``, no product."""
        y = self._e_inv(self.W @ b)
        return y @ self.W, y @ self.AW

    def preconditioner(self, like: Mapping[str, Tensor]) -> Callable[[hg.Tree], hg.Tree]:
        r"""The two-level map :math:`M^{-1} = (I - W W^\top) + W E^{-1} W^\top` (SPD).

        On an invariant subspace ``span W`` it sends those eigenvalues of ``M^{-1}A`` to 1
        (deflation) and leaves the rest of the spectrum alone.
        """

        def apply(R: hg.Tree) -> hg.Tree:
            flat = torch.cat([R[k].flatten(1) for k in like], dim=1)  # (k, n)
            coeff = flat @ self.W.T  # (k, r)
            out = flat + (self._e_inv(coeff) - coeff) @ self.W
            parts = torch.split(out, [t.numel() for t in like.values()], dim=1)
            return {k: p.reshape(-1, *t.shape) for (k, t), p in zip(like.items(), parts, strict=True)}

        return apply


# ---------------------------------------------------------------------------------------------
# The contenders


def _hessian(w: Alternation, f: Callable[[Mapping[str, Tensor]], Tensor] | None = None) -> CountingOperator:
    return CountingOperator(hg.HessianOperator(f or w.f, w.params, reuse_graph=True))


def _damped(H: hg.LinearOperator, c: float) -> hg.DampedOperator:
    """``I + H/c`` (BiSSL: ``c = lambda + delta``)."""
    return hg.DampedOperator(H, 1.0, 1.0 / c)


def _stats(stats: list[hg.SolveStats]) -> dict[str, Any]:
    curv = [float(s.min_curvature) for s in stats if s.min_curvature is not None]
    return {"min_curvature": min(curv) if curv else None,
            "breakdowns": sum(bool(s.breakdown) for s in stats)}


def reference(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """Hand-written (no hypergrad): graph rebuilt per product, layerwise CG from zero."""
    product = CountingProduct(w.f, w.params, w.c)
    rec = Recorder(clock, lambda: product.calls)
    per_solve = []
    for v in w.rhs:
        rec.rhs_begin()
        before = product.calls
        layerwise_cg(product, v, iterations, rec.iterate)
        per_solve.append(product.calls - before)
    if any(n != iterations for n in per_solve):
        raise AssertionError(f"the reference spent {per_solve} products, expected {iterations} per solve")
    return rec, {"products_per_solve": per_solve}


def _plain(w: Alternation, clock: Clock, iterations: int, solver_cls: type[hg.Solver],
           H: CountingOperator | None = None, **solver_kw: Any) -> tuple[Recorder, dict[str, Any]]:
    H = H or _hessian(w)
    A = _damped(H, w.c)
    rec = Recorder(clock, lambda: H.n)
    solver = solver_cls(maxiter=iterations, tol=0.0, **solver_kw)
    stats = []
    for v in w.rhs:
        rec.rhs_begin()
        stats.append(solver.solve(A, v, callback=rec.iterate).stats)
    return rec, _stats(stats)


def layerwise_reuse(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """hypergrad LayerwiseCG (the reference's method, no extra true-residual product), graph reused."""
    return _plain(w, clock, iterations, hg.LayerwiseCG, true_residual=False)


def cg_reuse(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """hypergrad CG, graph built once per alternation and reused by every product."""
    return _plain(w, clock, iterations, hg.CG, on_breakdown="continue")


def cg_subsampled(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """CG on the Hessian of half the Hessian batch (error still measured against the full one)."""
    return _plain(w, clock, iterations, hg.CG, H=_hessian(w, w.f_sub), on_breakdown="continue")


def _bf16_hessian(w: Alternation) -> CountingOperator:
    """H with products in bfloat16 (model, batch and tangents), results cast back."""
    backbone = copy.deepcopy(w.backbone).to(torch.bfloat16)
    projector = copy.deepcopy(w.projector).to(torch.bfloat16)
    f16 = pretext_loss(backbone, projector, *(x.to(torch.bfloat16) for x in w.views))
    params16 = {k: t.to(torch.bfloat16) for k, t in w.params.items()}
    return CountingOperator(CastOperator(hg.HessianOperator(f16, params16, reuse_graph=True), torch.bfloat16))


def cg_bf16(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """CG with Hessian products in bfloat16; vectors and Krylov scalars in float32."""
    return _plain(w, clock, iterations, hg.CG, H=_bf16_hessian(w), on_breakdown="continue")


def nystrom_pcg(w: Alternation, clock: Clock, iterations: int, rank: int) -> tuple[Recorder, dict[str, Any]]:
    """PCG with a rank-r Nystrom preconditioner, sketched once per alternation.

    The sketch is of H with the shift mu = c (``NystromPreconditioner.from_damped``: A is
    ``(H + c I)/c``, and CG is scale-invariant); should H's sketch be indefinite, of A itself.
    """
    H = _hessian(w)
    A = _damped(H, w.c)
    rec = Recorder(clock, lambda: H.n)
    rec.setup_begin()
    gen = torch.Generator().manual_seed(0)
    sketched = "H + cI"
    try:
        pre = hg.NystromPreconditioner.from_damped(A, w.params, rank, generator=gen)
    except hg.IndefiniteSketchError:
        sketched = "A (H's sketch was indefinite)"
        pre = hg.NystromPreconditioner.build(A, w.params, rank, generator=gen)
    rec.setup_end()
    solver = hg.CG(maxiter=iterations, tol=0.0, preconditioner=pre, on_breakdown="continue")
    stats = []
    for v in w.rhs:
        rec.rhs_begin()
        stats.append(solver.solve(A, v, callback=rec.iterate).stats)
    return rec, {**_stats(stats), "rank": rank, "sketch_products": pre.num_hvp, "sketched": sketched}


def cg_warm(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """CG from the previous right-hand side's solution (one extra product for the residual)."""
    H = _hessian(w)
    A = _damped(H, w.c)
    rec = Recorder(clock, lambda: H.n)
    solver = hg.CG(maxiter=iterations, tol=0.0, on_breakdown="continue")
    previous, stats = None, []
    for v in w.rhs:
        rec.rhs_begin()
        sol = solver.solve(A, v, x0=previous, callback=rec.iterate)
        previous = sol.value
        stats.append(sol.stats)
    return rec, _stats(stats)


def _recycling(w: Alternation, clock: Clock, iterations: int, deflate: bool, capacity: int,
               H: CountingOperator | None = None) -> tuple[Recorder, dict[str, Any]]:
    H = H or _hessian(w)
    A = RecordingOperator(_damped(H, w.c), capacity)
    rec = Recorder(clock, lambda: H.n)
    stats, sizes = [], []
    for v in w.rhs:
        rec.rhs_begin()
        b = ravel(v)
        solver = hg.CG(maxiter=iterations, tol=0.0, on_breakdown="continue")
        if A.inputs:
            space = RecycledSpace(torch.stack(A.inputs), torch.stack(A.outputs))
            x0, ax0 = space.galerkin(b)
            if deflate:
                solver = hg.CG(maxiter=iterations, tol=0.0, on_breakdown="continue",
                               preconditioner=space.preconditioner(v))
            sizes.append(space.size)
        else:
            x0, ax0 = torch.zeros_like(b), torch.zeros_like(b)
            sizes.append(0)
        shift = unravel(x0, v)
        sol = solver.solve(A, unravel(b - ax0, v),
                           callback=lambda k, e, shift=shift: rec.iterate(k, e, shift))
        stats.append(sol.stats)
    return rec, {**_stats(stats), "recycled_directions": sizes}


def cg_recycled(w: Alternation, clock: Clock, iterations: int, capacity: int = 32) -> tuple[Recorder, dict[str, Any]]:
    """CG from the Galerkin guess in the span of earlier solves' directions (no extra product).

    The Hessian is fixed within the alternation, so the products ``(u, A u)`` of earlier solves
    are kept (the last ``capacity``); for ``v`` the guess ``x0`` minimises the A-norm error over
    their span, ``A x0`` comes from the stored products, and CG solves ``A e = v - A x0`` from
    zero: ``x = x0 + e``.
    """
    return _recycling(w, clock, iterations, False, capacity)


def cg_deflated(w: Alternation, clock: Clock, iterations: int, capacity: int = 32) -> tuple[Recorder, dict[str, Any]]:
    """Recycling as above, plus the recycled space as a two-level (deflation) preconditioner."""
    return _recycling(w, clock, iterations, True, capacity)


def cg_deflated_bf16(w: Alternation, clock: Clock, iterations: int, capacity: int = 32) -> tuple[Recorder, dict[str, Any]]:
    """Recycling and deflation with bfloat16 products (the stored pairs are bfloat16 products too)."""
    return _recycling(w, clock, iterations, True, capacity, H=_bf16_hessian(w))


def identity(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """x = v: no solve (the damped operator is I + H/10.001, close to I)."""
    rec = Recorder(clock, lambda: 0)
    for v in w.rhs:
        rec.rhs_begin()
        rec.iterate(0, v)
    return rec, {}


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    run: Callable[..., tuple[Recorder, dict[str, Any]]]
    per_budget: bool  # iterations depend on the budget: run once per budget
    hypergrad: bool = True


CONTENDERS = [
    Contender("reference", "reference: hand-written, rebuild per product, layerwise CG", reference, False, False),
    Contender("layerwise-reuse", "hypergrad LayerwiseCG, graph reused", layerwise_reuse, False),
    Contender("cg", "hypergrad CG, graph reused", cg_reuse, False),
    Contender("cg-warm", "hypergrad CG, warm start", cg_warm, True),
    Contender("nystrom-pcg", "hypergrad Nystrom PCG (sketch once per alternation)", nystrom_pcg, False),
    Contender("cg-subsampled", "hypergrad CG, half the Hessian batch", cg_subsampled, False),
    Contender("cg-recycled", "hypergrad CG from a recycled Galerkin guess", cg_recycled, True),
    Contender("cg-deflated", "hypergrad CG, recycled guess + deflation preconditioner", cg_deflated, True),
    Contender("cg-bf16", "hypergrad CG, products in bfloat16", cg_bf16, False),
    Contender("cg-deflated-bf16", "hypergrad CG, recycled + deflated, bfloat16 products", cg_deflated_bf16, True),
    Contender("identity", "x = v (no solve)", identity, False),
]
