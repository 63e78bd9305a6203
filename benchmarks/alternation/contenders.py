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


def _bf16_hessian(w: Alternation, pairs: int | None = None) -> CountingOperator:
    """H with products in bfloat16 (a bfloat16 copy of model and batch), through ``hg.CastOperator``.

    ``pairs``: only the first ``pairs`` pairs of the Hessian batch (the sub-batch levers).
    """
    backbone = copy.deepcopy(w.backbone).to(torch.bfloat16)
    projector = copy.deepcopy(w.projector).to(torch.bfloat16)
    f16 = pretext_loss(backbone, projector, *(x[:pairs].to(torch.bfloat16) for x in w.views))
    params16 = {k: t.to(torch.bfloat16) for k, t in w.params.items()}
    return CountingOperator(hg.CastOperator(hg.HessianOperator(f16, params16, reuse_graph=True), torch.bfloat16))


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


class TimedRecycler(hg.KrylovRecycler):
    """The library's recycler with its vector work timed (the deflation map's applications too)."""

    def __init__(self, clock: Clock, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock, self.seconds, self.calls = clock, 0.0, 0

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = self.clock.mark()
        out = fn(*args)
        self.seconds += self.clock.seconds(start, self.clock.mark())
        self.calls += 1
        return out

    def add(self, W: hg.Tree, AW: hg.Tree) -> None:
        self._timed(super().add, W, AW)

    def galerkin(self, B: hg.Tree) -> tuple[hg.Tree, hg.Tree]:
        out: tuple[hg.Tree, hg.Tree] = self._timed(super().galerkin, B)
        return out

    def preconditioner(self) -> Callable[[hg.Tree], hg.Tree]:
        apply = super().preconditioner()
        return lambda R: self._timed(apply, R)


def _recycling(w: Alternation, clock: Clock, iterations: int, deflate: bool, capacity: int,
               H: CountingOperator | None = None) -> tuple[Recorder, dict[str, Any]]:
    """``hg.RecycledCG`` with one ``hg.KrylovRecycler`` per alternation (the operator is fixed)."""
    H = H or _hessian(w)
    A = _damped(H, w.c)
    rec = Recorder(clock, lambda: H.n)
    recycler = TimedRecycler(clock, w.params, capacity)
    solver = hg.RecycledCG(recycler=recycler, maxiter=iterations, tol=0.0, on_breakdown="continue", deflate=deflate)
    stats, sizes = [], []
    for v in w.rhs:
        rec.rhs_begin()
        sizes.append(recycler.filled)
        stats.append(solver.solve(A, v, callback=rec.iterate).stats)
    solves = len(w.rhs)
    return rec, {**_stats(stats), "recycled_directions": sizes, "capacity": capacity,
                 "vector_seconds_per_solve": recycler.seconds / solves,
                 "vector_calls_per_solve": recycler.calls / solves}


def cg_recycled(w: Alternation, clock: Clock, iterations: int, capacity: int = 32) -> tuple[Recorder, dict[str, Any]]:
    """hg.RecycledCG: CG from the Galerkin guess in the span of earlier solves' directions.

    The Hessian is fixed within the alternation, so a ``KrylovRecycler`` keeps an incrementally
    orthonormalised basis of the earlier solves' search directions with their products (the last
    ``capacity``); the guess minimises the A-norm error over their span at no product. The JSON's
    ``vector_seconds_per_solve`` is the recycler's vector work (to compare with one product).
    """
    return _recycling(w, clock, iterations, False, capacity)


def cg_deflated(w: Alternation, clock: Clock, iterations: int, capacity: int = 32) -> tuple[Recorder, dict[str, Any]]:
    """hg.RecycledCG(deflate=True): the recycled guess plus the deflation preconditioner."""
    return _recycling(w, clock, iterations, True, capacity)


def cg_deflated_bf16(w: Alternation, clock: Clock, iterations: int, capacity: int = 32) -> tuple[Recorder, dict[str, Any]]:
    """Recycling and deflation with bfloat16 products (the recycled pairs are bfloat16 products too)."""
    return _recycling(w, clock, iterations, True, capacity, H=_bf16_hessian(w))


# Refinement (issue 20, levers 1 and 2): per budget J corrections; no residual after the last one.


def _refinement(w: Alternation, clock: Clock, corrections: int, inner: hg.Solver | tuple[hg.Solver, ...],
                H_inner: CountingOperator | None, low_precision: bool = False) -> tuple[Recorder, dict[str, Any]]:
    """``hg.Refinement``: float32 residuals with the full Hessian, corrections with ``H_inner``.

    ``H_inner=None`` with ``low_precision`` uses ``hg.low_precision`` (autocast) of the damped
    operator, as the BiSSL stage does. Products of both kinds are counted (the curve's
    ``products`` is their sum; the split is in ``extra``).
    """
    H = _hessian(w)
    A = _damped(H, w.c)
    if H_inner is None:
        H_inner = CountingOperator(hg.low_precision(H.base)) if low_precision else _hessian(w)
    M = _damped(H_inner, w.c)
    rec = Recorder(clock, lambda: H.n + H_inner.n)
    solver = hg.Refinement(inner=inner, inner_operator=M, maxiter=corrections, tol=0.0, true_residual=False,
                           on_breakdown="continue")
    stats = []
    for v in w.rhs:
        rec.rhs_begin()
        stats.append(solver.solve(A, v, callback=rec.iterate).stats)
    solves = len(w.rhs)
    return rec, {**_stats(stats), "corrections": corrections,
                 "full_products_per_solve": sum(s.num_hvp for s in stats) / solves,
                 "inner_products_per_solve": sum(s.inner_hvp for s in stats) / solves}


def _cg(k: int) -> hg.CG:
    return hg.CG(maxiter=k, tol=0.0, on_breakdown="continue")


def refine_bf16_cg2(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """Mixed precision: each correction 2 CG iterations with bfloat16 products (model copy)."""
    return _refinement(w, clock, iterations, _cg(2), _bf16_hessian(w))


def refine_bf16_cg3(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """Mixed precision: each correction 3 CG iterations with bfloat16 products (model copy)."""
    return _refinement(w, clock, iterations, _cg(3), _bf16_hessian(w))


def refine_bf16_cg2_identity(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """2 bfloat16 CG iterations, then corrections d = r (no product): the issue's 3.4x estimate."""
    return _refinement(w, clock, iterations, (_cg(2), hg.Identity()), _bf16_hessian(w))


def refine_autocast_cg2(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """As refine-bf16-cg2 with ``hg.low_precision`` (torch.autocast) products: the BiSSL stage's lever."""
    return _refinement(w, clock, iterations, _cg(2), None, low_precision=True)


def refine_sub_cg2(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """A cheap operator: corrections with 2 CG iterations on half the Hessian batch (float32)."""
    return _refinement(w, clock, iterations, _cg(2), _hessian(w, w.f_sub))


def refine_sub_bf16_cg2(w: Alternation, clock: Clock, iterations: int) -> tuple[Recorder, dict[str, Any]]:
    """A cheap operator: corrections with 2 CG iterations on half the Hessian batch in bfloat16."""
    return _refinement(w, clock, iterations, _cg(2), _bf16_hessian(w, pairs=max(1, w.views[0].shape[0] // 2)))


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
    Contender("cg-recycled", "hypergrad RecycledCG (Galerkin guess from a KrylovRecycler)", cg_recycled, True),
    Contender("cg-deflated", "hypergrad RecycledCG, recycled guess + deflation preconditioner", cg_deflated, True),
    Contender("cg-bf16", "hypergrad CG, products in bfloat16", cg_bf16, False),
    Contender("cg-deflated-bf16", "hypergrad CG, recycled + deflated, bfloat16 products", cg_deflated_bf16, True),
    Contender("refine-bf16-cg2", "hypergrad Refinement, corrections: 2 CG iterations in bfloat16", refine_bf16_cg2, True),
    Contender("refine-bf16-cg3", "hypergrad Refinement, corrections: 3 CG iterations in bfloat16", refine_bf16_cg3, True),
    Contender("refine-bf16-cg2-id", "hypergrad Refinement, 2 bfloat16 CG iterations then d = r",
              refine_bf16_cg2_identity, True),
    Contender("refine-autocast-cg2", "hypergrad Refinement, 2 CG iterations with low_precision (autocast)",
              refine_autocast_cg2, True),
    Contender("refine-sub-cg2", "hypergrad Refinement, 2 CG iterations on half the Hessian batch", refine_sub_cg2, True),
    Contender("refine-sub-bf16-cg2", "hypergrad Refinement, 2 CG iterations on half the batch in bfloat16",
              refine_sub_bf16_cg2, True),
    Contender("identity", "x = v (no solve)", identity, False),
]
