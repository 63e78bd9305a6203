"""hypergrad vs hand-written PyTorch and torchopt on BiSSL's implicit-gradient problem.

The problem (float32): a narrow ResNet backbone (BatchNorm, train mode) and a BiSSL-style
projector briefly pre-trained with NT-Xent; one pretext batch fixes the Hessian H, a downstream
cross-entropy gradient gives v. Everyone runs 5 CG iterations from zero.

* Solve tier: ``(I + H/(lam + delta)) x = v``.
  - hand-written textbook CG on flattened vectors, every product rebuilding the graph with
    ``torch.autograd.grad`` double backward (the BiSSL reference code's style), and the
    reference code's layerwise variant;
  - hypergrad ``CG`` with the graph rebuilt per product (the same work as the hand-written
    loop: isolates the library's overhead) and with its default reused graph;
  - ``torchopt.linalg.cg`` (rtol = 0, maxiter = 5) with the same hand-written matvec.
* End-to-end tier: the hypergradient ``dF/do`` of ``F(i*(o))`` for the lower problem
  ``L_P(i) + c/2 ||i - o||^2`` with ``c = lam + delta``, which is exactly
  ``(I + H/c)^{-1} grad F`` (BiSSL's implicit term): hand-written, ``hypergrad.implicit_grad``
  and ``torchopt.diff.implicit.custom_root`` with ``solve_cg``.

Accuracy is measured against hypergrad CG run to 40 iterations (float32: errors below ~1e-6
are rounding). Times are medians of interleaved rounds in one process; report the ratios.

Run: ``python -m pytest benchmarks/bench_vs_baselines.py --benchmark-enable -s``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import pytest
import torch
from _common import (
    BISSL_DELTA,
    BISSL_LAM,
    SimCLRProblem,
    TinyResNet,
    bissl_operator,
    layerwise_cg,
    markdown_table,
    median_times,
    quick_mode,
    ravel,
    rel_err,
    simclr_problem,
    unravel,
)
from torch import Tensor

import hypergrad as hg

ITERATIONS = 5
C = BISSL_LAM + BISSL_DELTA
HAVE_TORCHOPT = importlib.util.find_spec("torchopt") is not None


@functools.cache
def problem() -> SimCLRProblem:
    widths = (8, 16, 32) if quick_mode() else (16, 32, 64)
    return simclr_problem(lambda: TinyResNet(widths, out=None), widths[-1], batch=16, image=32,
                          dtype=torch.float32, pretrain_steps=20 if quick_mode() else 60)


@functools.cache
def reference() -> dict[str, Tensor]:
    return hg.CG(maxiter=40, tol=0.0).solve(bissl_operator(problem()), problem().v).value


# ---------------------------------------------------------------------------------------------
# The hand-written reference style: flat vectors, graph rebuilt on every product


class Counter:
    """Counts operator products of the hand-written and peer contenders."""

    def __init__(self) -> None:
        self.n = 0


def flat_damped_hvp(pb: SimCLRProblem, counter: Counter) -> Callable[[Tensor], Tensor]:
    """``u -> (I + H/c) u`` on flat vectors, by double backward with a fresh graph every call."""
    names = list(pb.params)

    def mv(u: Tensor) -> Tensor:
        counter.n += 1
        params = {k: t.detach().requires_grad_(True) for k, t in pb.params.items()}
        loss = pb.f(params)
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True)
        dot = sum((g * w).sum() for g, w in zip(grads, unravel(u, pb.params).values(), strict=True))
        hu = torch.autograd.grad(dot, [params[k] for k in names])
        return u + torch.cat([h.reshape(-1) for h in hu]) / C

    return mv


def textbook_cg(mv: Callable[[Tensor], Tensor], b: Tensor, iterations: int) -> Tensor:
    """Conjugate gradient from x = 0 on flat vectors, fixed iteration count."""
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rr = r @ r
    for _ in range(iterations):
        ad = mv(d)
        alpha = rr / (d @ ad)
        x = x + alpha * d
        r = r - alpha * ad
        rr_new = r @ r
        d = r + (rr_new / rr) * d
        rr = rr_new
    return x


def layerwise_cg_handwritten(pb: SimCLRProblem, counter: Counter, b: dict[str, Tensor],
                             iterations: int) -> dict[str, Tensor]:
    """The BiSSL reference code's default: alpha and beta per tensor, A d computed jointly."""
    mv = flat_damped_hvp(pb, counter)
    return layerwise_cg(lambda d: unravel(mv(ravel(d)), b), b, iterations)


# ---------------------------------------------------------------------------------------------
# Contenders: each returns (solution tree, operator products used)


def solve_handwritten() -> tuple[dict[str, Tensor], int]:
    pb, counter = problem(), Counter()
    x = textbook_cg(flat_damped_hvp(pb, counter), ravel(pb.v), ITERATIONS)
    return unravel(x, pb.v), counter.n


def solve_handwritten_layerwise() -> tuple[dict[str, Tensor], int]:
    pb, counter = problem(), Counter()
    return layerwise_cg_handwritten(pb, counter, pb.v, ITERATIONS), counter.n


def solve_hypergrad(solver: hg.Solver, reuse_graph: bool) -> tuple[dict[str, Tensor], int]:
    sol = solver.solve(bissl_operator(problem(), reuse_graph=reuse_graph), problem().v)
    return sol.value, sol.stats.num_hvp


def solve_torchopt() -> tuple[dict[str, Tensor], int]:
    import torchopt

    pb, counter = problem(), Counter()
    x = torchopt.linalg.cg(flat_damped_hvp(pb, counter), ravel(pb.v), maxiter=ITERATIONS, rtol=0.0)
    return unravel(x, pb.v), counter.n


SOLVE_CONTENDERS: dict[str, Callable[[], tuple[dict[str, Tensor], int]]] = {
    "hand-written CG, rebuild per product (reference style)": solve_handwritten,
    "hand-written layerwise CG, rebuild per product (BiSSL default)": solve_handwritten_layerwise,
    "hypergrad CG, reuse_graph=False": functools.partial(
        solve_hypergrad, hg.CG(maxiter=ITERATIONS, tol=0.0), False),
    "hypergrad CG (default: reuse graph)": functools.partial(
        solve_hypergrad, hg.CG(maxiter=ITERATIONS, tol=0.0), True),
    "hypergrad LayerwiseCG, reuse graph": functools.partial(
        solve_hypergrad, hg.LayerwiseCG(maxiter=ITERATIONS, tol=0.0), True),
}
if HAVE_TORCHOPT:
    SOLVE_CONTENDERS["torchopt.linalg.cg, hand-written rebuild matvec"] = solve_torchopt


# ---------------------------------------------------------------------------------------------
# End-to-end implicit gradient


def lower(i: hg.Tree, o: hg.Tree) -> Tensor:
    return problem().f(i) + 0.5 * C * sum(((i[k] - o[k]) ** 2).sum() for k in i)


def upper(i: hg.Tree, o: hg.Tree) -> Tensor:
    return problem().upper(i)


def e2e_handwritten() -> tuple[dict[str, Tensor], int]:
    pb, counter = problem(), Counter()
    v = hg.gradient(pb.upper, pb.params)  # the same downstream gradient as pb.v, recomputed
    return unravel(textbook_cg(flat_damped_hvp(pb, counter), ravel(v), ITERATIONS), v), counter.n


def e2e_hypergrad() -> tuple[dict[str, Tensor], int]:
    pb = problem()
    outer = {k: t.clone() for k, t in pb.params.items()}  # o = theta_D = theta_P at this point
    grads, stats = hg.implicit_grad(lower, upper, pb.params, outer, hg.CG(maxiter=ITERATIONS, tol=0.0),
                                    stationarity_tol=None)
    return grads, stats.num_hvp


def e2e_torchopt() -> tuple[dict[str, Tensor], int]:
    import torchopt

    pb, counter = problem(), Counter()
    names = list(pb.params)

    def optimality(inner: tuple[Tensor, ...], outer: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        # torchopt differentiates this with torch.func.vjp, so it must be torch.func-pure.
        counter.n += 1  # evaluations of the lower gradient (torchopt calls it per product)
        o = dict(zip(names, outer, strict=True))
        return torch.func.grad(lambda i: lower(dict(zip(names, i, strict=True)), o))(tuple(inner))

    @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(maxiter=ITERATIONS, rtol=0.0))
    def inner_solver(inner: tuple[Tensor, ...], outer: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return inner  # already the lower solution

    outer = tuple(pb.params[k].clone().requires_grad_(True) for k in names)
    inner = tuple(pb.params[k].clone().requires_grad_(True) for k in names)
    solution = inner_solver(inner, outer)
    loss = pb.upper(dict(zip(names, solution, strict=True)))
    grads = torch.autograd.grad(loss, outer)
    return dict(zip(names, grads, strict=True)), counter.n


E2E_CONTENDERS: dict[str, Callable[[], tuple[dict[str, Tensor], int]]] = {
    "hand-written (v, then CG with rebuilt products)": e2e_handwritten,
    "hypergrad.implicit_grad, CG": e2e_hypergrad,
}
if HAVE_TORCHOPT:
    E2E_CONTENDERS["torchopt custom_root + solve_cg"] = e2e_torchopt


# ---------------------------------------------------------------------------------------------


def _rows(contenders: dict[str, Callable[[], tuple[dict[str, Tensor], int]]], baseline: str,
          count_label: str, rounds: int, budget_s: float) -> list[dict[str, object]]:
    times = median_times(contenders, rounds=rounds, budget_s=budget_s)
    ref = reference()
    rows = []
    for name, fn in contenders.items():
        x, count = fn()
        rows.append({
            "contender": name,
            count_label: count,
            "rel. error vs 40-iteration CG": rel_err(x, ref),
            "time (ms)": 1e3 * times[name],
            "hand-written time / this time": times[baseline] / times[name],
        })
    return rows


def measure(rounds: int = 3, budget_s: float = 30.0) -> dict[str, object]:
    pb = problem()
    solve = _rows(SOLVE_CONTENDERS, "hand-written CG, rebuild per product (reference style)",
                  "operator products", rounds, budget_s)
    e2e = _rows(E2E_CONTENDERS, "hand-written (v, then CG with rebuilt products)",
                "lower-loss evaluations / products", rounds, budget_s)
    probe = hg.CG(maxiter=ITERATIONS, tol=0.0).solve(bissl_operator(pb), pb.v).stats
    description = (f"narrow ResNet backbone, {pb.num_params} parameters ({len(pb.params)} tensors), "
                   f"float32, 16 pairs of 32x32 images; min curvature seen by CG "
                   f"{float(probe.min_curvature):.3g} (operator positive definite along the Krylov space)")
    return {"description": description, "solve": solve, "e2e": e2e,
            "torchopt": "installed" if HAVE_TORCHOPT else "not installed: torchopt rows skipped"}


SOLVE_COLUMNS = ["contender", "operator products", "rel. error vs 40-iteration CG", "time (ms)",
                 "hand-written time / this time"]
E2E_COLUMNS = ["contender", "lower-loss evaluations / products", "rel. error vs 40-iteration CG",
               "time (ms)", "hand-written time / this time"]


def tables(results: dict[str, object]) -> str:
    return (f"Problem: {results['description']}. torchopt: {results['torchopt']}.\n\n"
            f"#### Solve tier: (I + H/(lam+delta)) x = v, {ITERATIONS} CG iterations\n\n"
            f"{markdown_table(results['solve'], SOLVE_COLUMNS)}\n\n"  # type: ignore[arg-type]
            f"#### End-to-end tier: implicit hypergradient, {ITERATIONS} CG iterations\n\n"
            f"{markdown_table(results['e2e'], E2E_COLUMNS)}\n")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entry points


@pytest.mark.parametrize("name", list(SOLVE_CONTENDERS) + list(E2E_CONTENDERS))
def test_contender(benchmark: pytest.FixtureRequest, name: str) -> None:
    fn = SOLVE_CONTENDERS.get(name) or E2E_CONTENDERS[name]
    x, count = benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    err = rel_err(x, reference())
    benchmark.extra_info.update({"contender": name, "products": count, "rel_error": err})
    assert torch.isfinite(ravel(x)).all()
    if not name.startswith("hypergrad") and "layerwise" not in name:
        # Textbook CG everywhere: the same iterates as hypergrad's CG that keeps going past
        # non-positive curvature (the quick-mode operator is indefinite).
        same = hg.CG(maxiter=ITERATIONS, tol=0.0, on_breakdown="continue").solve(
            bissl_operator(problem()), problem().v).value
        assert rel_err(x, same) < 1e-3


def test_torchopt_available() -> None:
    if not HAVE_TORCHOPT:
        pytest.skip("torchopt is not installed (pip install torchopt); its rows are skipped")


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    text = tables(measure(rounds=3, budget_s=0.0))
    with capsys.disabled():
        print("\n" + text)
    assert "hypergrad" in text
