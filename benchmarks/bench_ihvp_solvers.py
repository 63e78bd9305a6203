"""IHVP solvers side by side: accuracy, operator products and time per solve.

Problems:

* ``dense-logspace``: a dense SPD matrix with eigenvalues log-spaced in [1, 1e3] (kappa = 1e3).
* ``dense-spiked``: a flat bulk in [1, 2] plus 10 outliers log-spaced up to 1e4 (kappa = 1e4),
  the shape of a typical network Hessian, where a low-rank preconditioner pays off.
* ``bissl``: BiSSL's damped system ``(I + H/(lam + delta)) x = v`` (lam = 0.001, delta = 10),
  H the float64 Hessian of an NT-Xent loss w.r.t. a small CNN backbone (BatchNorm in train mode)
  after a short SimCLR pre-training; v a downstream cross-entropy gradient; the reference x from
  a dense ``torch.func`` Hessian and ``torch.linalg.solve``.

The dense problems are trees of 4 leaves so that the layerwise CG of the BiSSL code differs
from CG there too. Every solve runs a fixed number of iterations (``tol = 0``), as BiSSL does.

Run: ``python -m pytest benchmarks/bench_ihvp_solvers.py --benchmark-enable -s``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _common import (
    BISSL_DELTA,
    BISSL_LAM,
    SmallCNN,
    bissl_operator,
    dense_hessian,
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


@dataclass
class Problem:
    """A linear system with its exact solution and a factory of fresh operators."""

    name: str
    make_operator: Callable[[], hg.LinearOperator]  # a fresh operator (its graph unbuilt)
    b: dict[str, Tensor]
    x: Tensor  # the exact solution, flattened
    iterations: tuple[int, ...]  # iteration budgets to compare
    neumann_alpha: float
    description: str


def _dense(name: str, eigenvalues: Tensor, iterations: tuple[int, ...], seed: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = (Q * eigenvalues) @ Q.T
    A = (A + A.T) / 2
    like = {f"leaf{i}": torch.zeros(n // 4, dtype=torch.float64) for i in range(4)}
    b = unravel(torch.randn(n, generator=gen, dtype=torch.float64), like)

    def mv(x: hg.Tree) -> hg.Tree:
        return unravel(A @ ravel(x), like)

    def matmat(X: hg.Tree) -> hg.Tree:
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in X.values()], dim=1)  # (k, n)
        out = flat @ A  # A symmetric
        parts = torch.split(out, [t.numel() for t in like.values()], dim=1)
        return {k: p for k, p in zip(like, parts, strict=True)}

    def make() -> hg.LinearOperator:
        return hg.FunctionOperator(mv, symmetric=True, positive_definite=True, batched_fn=matmat)

    lam_max = float(eigenvalues.max())  # Neumann's oracle step 1/lambda_max
    cond = lam_max / float(eigenvalues.min())
    return Problem(name, make, b, torch.linalg.solve(A, ravel(b)), iterations, 1.0 / lam_max,
                   f"n = {n} (4 leaves), condition number {cond:.3g}")


@functools.cache
def problems() -> dict[str, Problem]:
    """The three problems (built once per process; the BiSSL one takes seconds)."""
    quick = quick_mode()
    n = 200 if quick else 400
    logspace = torch.logspace(0, 3, n, dtype=torch.float64)
    spiked = torch.cat([torch.logspace(2, 4, 10, dtype=torch.float64),
                        torch.linspace(1, 2, n - 10, dtype=torch.float64)])
    out = {
        "dense-logspace": _dense("dense-logspace", logspace, (10, 30), seed=1),
        "dense-spiked": _dense("dense-spiked", spiked, (10, 30), seed=2),
    }

    width = 8 if quick else 12
    pb = simclr_problem(lambda: SmallCNN(width), width, batch=32, image=12, dtype=torch.float64,
                        pretrain_steps=30 if quick else 150)
    H = dense_hessian(pb.f, pb.params)
    eig_h = torch.linalg.eigvalsh(H)
    A = torch.eye(H.shape[0], dtype=H.dtype) + H / (BISSL_LAM + BISSL_DELTA)
    eig_a = torch.linalg.eigvalsh(A)
    x = torch.linalg.solve(A, ravel(pb.v))
    desc = (f"n = {pb.num_params} backbone parameters ({len(pb.params)} tensors), float64; "
            f"H eigenvalues in [{float(eig_h[0]):.3g}, {float(eig_h[-1]):.3g}], "
            f"{100 * float((eig_h < 0).double().mean()):.0f}% negative; "
            f"I + H/(lam+delta) eigenvalues in [{float(eig_a[0]):.3g}, {float(eig_a[-1]):.3g}]"
            + (f", condition number {float(eig_a[-1] / eig_a[0]):.3g}" if eig_a[0] > 0 else ", indefinite")
            + f"; ||x - v|| / ||x|| = {rel_err(pb.v, x):.2e}")
    # Neumann gets the oracle step 1/lambda_max(A) (alpha = 1, the plain series, diverges here).
    out["bissl"] = Problem("bissl", lambda: bissl_operator(pb), pb.v, x, (5, 10), 1.0 / float(eig_a[-1]), desc)
    return out


@dataclass
class Case:
    """One solver configuration; ``setup`` (optional) builds amortised state such as a sketch."""

    name: str
    iterations: int
    make_solver: Callable[[Problem], tuple[hg.Solver, int]]  # -> (solver, setup products)


def _nystrom_cg(iterations: int, rank: int) -> Callable[[Problem], tuple[hg.Solver, int]]:
    def make(problem: Problem) -> tuple[hg.Solver, int]:
        # The damped BiSSL operator (and the dense ones) are PD: sketch them directly, mu = 0.
        pre = hg.NystromPreconditioner.build(problem.make_operator(), problem.b, rank,
                                             generator=torch.Generator().manual_seed(0))
        return hg.CG(maxiter=iterations, tol=0.0, preconditioner=pre), pre.num_hvp

    return make


def cases(problem: Problem) -> list[Case]:
    """Solver configurations at the problem's iteration budgets."""
    out = [Case("Identity (x = b)", 0, lambda p: (hg.Identity(), 0))]
    small, large = problem.iterations
    rank = 10
    for k in (small, large):
        out += [
            Case(f"Neumann(alpha={problem.neumann_alpha:.3g})", k,
                 lambda p, k=k: (hg.Neumann(maxiter=k, tol=0.0, alpha=p.neumann_alpha), 0)),
            Case("LayerwiseCG", k, lambda p, k=k: (hg.LayerwiseCG(maxiter=k, tol=0.0), 0)),
            Case("MINRES", k, lambda p, k=k: (hg.MINRES(maxiter=k, tol=0.0), 0)),
            Case("GMRES", k, lambda p, k=k: (hg.GMRES(maxiter=k, tol=0.0), 0)),
            Case("CG", k, lambda p, k=k: (hg.CG(maxiter=k, tol=0.0), 0)),
            Case(f"CG + Nystrom(rank {rank})", k, _nystrom_cg(k, rank)),
        ]
    return out


def _solve_once(problem: Problem, solver: hg.Solver) -> hg.Solution:
    # A fresh operator per solve: the time includes building the gradient graph once.
    return solver.solve(problem.make_operator(), problem.b)


def measure(rounds: int = 5, budget_s: float = 15.0) -> dict[str, tuple[str, list[dict[str, object]]]]:
    """Rows of the results table per problem: accuracy, products and side-by-side times."""
    results = {}
    for name, problem in problems().items():
        configured = [(case, *case.make_solver(problem)) for case in cases(problem)]
        fns = {f"{c.name} x{c.iterations}": functools.partial(_solve_once, problem, s)
               for c, s, _ in configured}
        times = median_times(fns, rounds=rounds, budget_s=budget_s)
        baseline = times[f"CG x{problem.iterations[0]}"]
        rows = []
        for case, solver, setup in configured:
            sol = _solve_once(problem, solver)
            key = f"{case.name} x{case.iterations}"
            rows.append({
                "solver": case.name,
                "iterations": case.iterations,
                "HVPs / solve": sol.stats.num_hvp,
                "setup HVPs (amortised)": setup,
                "rel. error": rel_err(sol.value, problem.x),
                "result": sol.result.name,
                "time / solve (ms)": 1e3 * times[key],
                f"time / CG x{problem.iterations[0]}": times[key] / baseline,
            })
        results[name] = (problem.description, rows)
    return results


COLUMNS = ["solver", "iterations", "HVPs / solve", "setup HVPs (amortised)", "rel. error", "result",
           "time / solve (ms)"]


def tables(results: dict[str, tuple[str, list[dict[str, object]]]]) -> str:
    parts = []
    for name, (description, rows) in results.items():
        ratio_col = next(c for c in rows[0] if c.startswith("time / CG"))
        parts.append(f"#### `{name}`: {description}\n\n{markdown_table(rows, [*COLUMNS, ratio_col])}\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entry points

PROBLEM_NAMES = ["dense-logspace", "dense-spiked", "bissl"]


def _case_ids() -> list[tuple[str, int]]:
    # Case lists have the same shape for every problem: index them.
    return [(p, i) for p in PROBLEM_NAMES for i in range(11)]


@pytest.mark.parametrize(("problem_name", "index"), _case_ids(),
                         ids=[f"{p}-{i}" for p, i in _case_ids()])
def test_solver(benchmark: pytest.FixtureRequest, problem_name: str, index: int) -> None:
    problem = problems()[problem_name]
    case = cases(problem)[index]
    solver, setup = case.make_solver(problem)
    sol = benchmark.pedantic(_solve_once, args=(problem, solver), rounds=3, warmup_rounds=1)
    err = rel_err(sol.value, problem.x)
    benchmark.extra_info.update({
        "problem": problem_name, "solver": case.name, "iterations": case.iterations,
        "num_hvp": sol.stats.num_hvp, "setup_hvp": setup, "rel_error": err,
        "result": sol.result.name,
    })
    # LayerwiseCG spends one extra product on the true final residual.
    extra = 1 if case.name == "LayerwiseCG" and case.iterations > 0 else 0
    assert sol.stats.num_hvp == case.iterations + extra


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    """All solvers timed side by side in one process; prints the markdown tables."""
    text = tables(measure(rounds=3, budget_s=5.0))
    with capsys.disabled():
        print("\n" + text)
    assert "CG" in text
