"""Fixed-iteration solves and implicit_grad under ``torch.compile(fullgraph=True)``.

``fullgraph=True`` turns any graph break into an error, so a passing test is the proof that
dynamo captured the whole solve. The truth is the eager computation on the autograd backend
(compiled code takes the ``torch.func`` backend, so the two share no differentiation code).
``torch._dynamo.explain`` counts graph breaks for the documented cases that do break.
"""

from __future__ import annotations

import functools

import pytest
import torch
from core_helpers import F64, generator
from torch import Tensor, nn

import hypergrad as hg

MAXITER = 5


@functools.cache
def _problem():
    g = generator(21)
    torch.manual_seed(21)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(F64)
    X, y = torch.randn(32, 4, generator=g, dtype=F64), torch.randn(32, 1, generator=g, dtype=F64)
    Xv, yv = torch.randn(16, 4, generator=g, dtype=F64), torch.randn(16, 1, generator=g, dtype=F64)
    run = hg.functional(net)
    outer = {"log_lam": torch.tensor(-1.0, dtype=F64)}

    def lower(p: hg.Tree, o: hg.Tree) -> Tensor:  # a weight-decayed fit: positive definite Hessian here
        return ((run(p, X) - y) ** 2).mean() + 0.5 * o["log_lam"].exp() * sum((t ** 2).sum() for t in p.values())

    def upper(p: hg.Tree, o: hg.Tree) -> Tensor:
        return ((run(p, Xv) - yv) ** 2).mean()

    # The inner point: the lower problem minimised (L-BFGS), so the implicit function theorem applies.
    opt = torch.optim.LBFGS(net.parameters(), lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = lower(dict(net.named_parameters()), outer)
        loss.backward()
        return loss

    opt.step(closure)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    b = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    return lower, upper, params, b, outer


def _solve_fn(solver: hg.Solver, method: str = "reverse"):
    lower, _, _, _, outer = _problem()

    def solve(params: hg.Tree, b: hg.Tree):
        sol = solver.solve(hg.HessianOperator(lambda p: lower(p, outer), params, method=method), b)
        return sol.value, sol.stats

    return solve


def _assert_trees_close(a: hg.Tree, b: hg.Tree, rtol: float = 1e-10) -> None:
    for k in b:
        err = float((a[k] - b[k]).norm() / b[k].norm())
        assert err <= rtol, f"{k}: relative error {err:.3g}"


def _assert_stats_close(a: hg.SolveStats, b: hg.SolveStats) -> None:
    assert (a.iterations, a.num_hvp) == (b.iterations, b.num_hvp) == (MAXITER, MAXITER)
    torch.testing.assert_close(a.residual_history, b.residual_history, rtol=1e-10, atol=0)
    assert bool(a.breakdown) == bool(b.breakdown) is False


SOLVERS = {"CG": hg.CG(maxiter=MAXITER, tol=0.0), "MINRES": hg.MINRES(maxiter=MAXITER, tol=0.0)}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_fixed_iteration_solve_on_a_network_hessian_compiles_fullgraph(name):
    torch._dynamo.reset()
    solve = _solve_fn(SOLVERS[name])
    _, _, params, b, _ = _problem()
    x_eager, s_eager = solve(params, b)
    x_comp, s_comp = torch.compile(solve, fullgraph=True, backend="eager")(params, b)
    _assert_trees_close(x_comp, x_eager)
    _assert_stats_close(s_comp, s_eager)
    assert float(s_eager.relative_residual) < 0.5  # a real solve, not a no-op (5 iterations, 49 unknowns)


def test_implicit_grad_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    lower, upper, params, _, outer = _problem()

    def hypergrad(inner: hg.Tree, outer: hg.Tree):
        return hg.implicit_grad(lower, upper, inner, outer, solver=hg.CG(maxiter=MAXITER, tol=0.0))

    g_eager, s_eager = hypergrad(params, outer)  # autograd backend
    g_comp, s_comp = torch.compile(hypergrad, fullgraph=True, backend="eager")(params, outer)
    _assert_trees_close(g_comp, g_eager)
    _assert_stats_close(s_comp.solve, s_eager.solve)
    assert float(s_eager.stationarity) < 1e-6 and float(s_comp.stationarity) < 1e-6
    assert float(s_eager.solve.relative_residual) < 0.5


@pytest.mark.slow
def test_inductor_compiled_implicit_grad_matches_eager():
    """The default backend (inductor, C++ codegen on CPU): about a minute on 2 shared cores."""
    torch._dynamo.reset()
    lower, upper, params, _, outer = _problem()

    def hypergrad(inner: hg.Tree, outer: hg.Tree):
        return hg.implicit_grad(lower, upper, inner, outer, solver=hg.CG(maxiter=MAXITER, tol=0.0))

    g_eager, s_eager = hypergrad(params, outer)
    g_comp, s_comp = torch.compile(hypergrad, fullgraph=True)(params, outer)
    _assert_trees_close(g_comp, g_eager)
    _assert_stats_close(s_comp.solve, s_eager.solve)


def test_what_breaks_the_graph():
    """Documented: tolerance checks and raise policies read values, and the autograd backend calls
    ``torch.autograd.grad``; each is an error under ``fullgraph=True`` (a graph break without it)."""
    lower, upper, params, b, outer = _problem()
    for solver in (hg.CG(maxiter=2, tol=1e-8), hg.CG(maxiter=2, tol=0.0, on_breakdown="raise")):
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.TorchDynamoException, match=r"(?i)data.dependent"):
            torch.compile(_solve_fn(solver), fullgraph=True, backend="eager")(params, b)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match=r"autograd\.grad"):
        torch.compile(lambda i, o: hg.implicit_grad(lower, upper, i, o, solver=hg.CG(maxiter=2, tol=0.0),
                                                    backend="autograd"), fullgraph=True, backend="eager")(params, outer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_fixed_iteration_cg_captured_in_a_cuda_graph():
    """mode='reduce-overhead' records the compiled solve in a CUDA graph and replays it."""
    torch._dynamo.reset()
    _, _, params, b, _ = _problem()
    dev = torch.device("cuda")
    params = {k: v.to(dev) for k, v in params.items()}
    b = {k: v.to(dev) for k, v in b.items()}
    g = generator(3)
    X, y = torch.randn(32, 4, generator=g, dtype=F64).to(dev), torch.randn(32, 1, generator=g, dtype=F64).to(dev)

    def f(p: hg.Tree) -> Tensor:  # the network of _problem written out, on the device
        h = torch.tanh(X @ p["0.weight"].T + p["0.bias"])
        return ((h @ p["2.weight"].T + p["2.bias"] - y) ** 2).mean() + 0.5 * sum((t ** 2).sum() for t in p.values())

    def solve(params: hg.Tree, b: hg.Tree):
        sol = hg.CG(maxiter=MAXITER, tol=0.0).solve(hg.HessianOperator(f, params), b)
        return sol.value, sol.stats.residual_history

    x_eager, r_eager = solve(params, b)
    compiled = torch.compile(solve, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        x_comp, r_comp = compiled(params, b)
    _assert_trees_close(x_comp, x_eager)
    torch.testing.assert_close(r_comp, r_eager, rtol=1e-10, atol=0)
