"""``stats.num_hvp`` equals the products the operator actually received (a counting wrapper:
1 per ``mv``, k per ``matmat`` of k trees)."""

from __future__ import annotations

import pytest
import torch
from core_helpers import (
    F64,
    TREE_SHAPES,
    TREE_SIZE,
    CountingOperator,
    generator,
    spd,
    tree_operator,
    unflatten,
)

import hypergrad as hg

SOLVERS = {
    "CG": lambda tol: hg.CG(maxiter=40, tol=tol),
    "LayerwiseCG": lambda tol: hg.LayerwiseCG(maxiter=40, tol=tol),
    "Neumann": lambda tol: hg.Neumann(alpha=0.05, maxiter=40, tol=tol),
    "MINRES": lambda tol: hg.MINRES(maxiter=40, tol=tol),
}


def _rhs(k: int | None, seed: int):
    g = generator(seed)
    shape = (TREE_SIZE,) if k is None else (k, TREE_SIZE)
    return unflatten(torch.randn(shape, generator=g, dtype=F64), TREE_SHAPES)


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_num_hvp_counts_operator_products(name, batched, with_x0, tol):
    A = spd(TREE_SIZE, 20.0, generator(0))
    op = CountingOperator(tree_operator(A))
    k = 3 if batched else None
    b = _rhs(k, 1)
    x0 = _rhs(k, 2) if with_x0 else None
    sol = SOLVERS[name](tol).solve(op, b, x0, batched=batched)
    assert sol.stats.num_hvp == op.calls
    if name != "LayerwiseCG":  # (may spend one more product to measure its true final residual)
        per_product = 3 if batched else 1
        expected_iterations = sol.stats.iterations + (1 if with_x0 else 0)
        # A solve with a tolerance confirms its outcome by the true residual (one more product);
        # Neumann's residual recurrence is exact, so it spends none.
        confirm = 1 if tol > 0 and name != "Neumann" else 0
        assert op.calls == per_product * (expected_iterations + confirm)
        assert sol.stats.residual_source == ("true" if confirm else "recurrence")
    if tol == 0.0:
        assert sol.stats.iterations == 40
    elif name in ("CG", "MINRES"):  # Krylov solvers converge well before 40 on a 22-dim system
        assert sol.stats.iterations < 40


def test_num_hvp_with_hessian_operator_and_reused_graph():
    g = generator(3)
    X = torch.randn(15, 4, generator=g, dtype=F64)
    y = torch.randn(15, generator=g, dtype=F64)
    params = {"w": torch.randn(4, generator=g, dtype=F64), "b": torch.zeros((), dtype=F64)}
    calls = {"f": 0}

    def f(p):
        calls["f"] += 1
        return (torch.nn.functional.softplus(X @ p["w"] + p["b"]) - y * (X @ p["w"] + p["b"])).mean() \
            + 0.1 * (p["w"] ** 2).sum() + 0.1 * p["b"] ** 2

    for reuse, f_runs in ((True, lambda n: 1), (False, lambda n: n)):
        calls["f"] = 0
        op = CountingOperator(hg.HessianOperator(f, params, reuse_graph=reuse))
        sol = hg.CG(maxiter=3, tol=0.0).solve(op, {k: torch.ones_like(v) for k, v in params.items()})
        assert sol.stats.num_hvp == op.calls == 3
        assert calls["f"] == f_runs(3)


def test_preconditioned_cg_counts_only_operator_products():
    A = spd(TREE_SIZE, 1e3, generator(4))
    like = unflatten(torch.zeros(TREE_SIZE, dtype=F64), TREE_SHAPES)
    build_op = CountingOperator(tree_operator(A))
    P = hg.NystromPreconditioner.build(build_op, like, 6, generator=generator(5))
    assert P.num_hvp == build_op.calls == 6
    op = CountingOperator(tree_operator(A))
    sol = hg.CG(maxiter=50, tol=1e-8, preconditioner=P).solve(op, _rhs(None, 6))
    assert sol.stats.num_hvp == op.calls == sol.stats.iterations + 1  # + the confirming true residual


@pytest.mark.parametrize("rank", [1, 4, 10])
def test_nystrom_build_spends_rank_products(rank):
    A = spd(TREE_SIZE, 10.0, generator(7))
    op = CountingOperator(tree_operator(A))
    P = hg.NystromPreconditioner.build(op, unflatten(torch.zeros(TREE_SIZE, dtype=F64), TREE_SHAPES), rank,
                                       generator=generator(8))
    assert P.num_hvp == rank == op.calls


def test_identity_counts():
    A = spd(TREE_SIZE, 10.0, generator(9))
    op = CountingOperator(tree_operator(A))
    assert hg.Identity().solve(op, _rhs(None, 1)).stats.num_hvp == op.calls == 0
    assert hg.Identity(compute_residual=True).solve(op, _rhs(2, 1), batched=True).stats.num_hvp == op.calls == 2
