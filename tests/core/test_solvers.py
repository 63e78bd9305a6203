"""Solvers against ``torch.linalg.solve`` on random systems with controlled spectra (float64)."""

from __future__ import annotations

import pytest
import torch
from core_helpers import (
    F64,
    TREE_SHAPES,
    TREE_SIZE,
    flatten,
    generator,
    spd,
    sym_with_spectrum,
    tree_operator,
    unflatten,
)

import hypergrad as hg

N = 20
COND = 100.0


def _solvers(lam_max: float):
    return {
        "CG": hg.CG(maxiter=200, tol=1e-12),
        "MINRES": hg.MINRES(maxiter=200, tol=1e-12),
        "LayerwiseCG": hg.LayerwiseCG(maxiter=200, tol=1e-12),
        "Neumann": hg.Neumann(maxiter=5000, alpha=1.0 / lam_max, tol=1e-11),
    }


SOLVER_NAMES = ["CG", "MINRES", "LayerwiseCG", "Neumann"]


@pytest.fixture(scope="module")
def spd_system():
    g = generator(0)
    A = spd(N, COND, g)
    B = torch.randn(3, N, generator=g, dtype=F64)
    return A, B


def _check_report(stats, A, b, x, *, batched=False):
    true_res = (b - x @ A.T).norm(dim=-1) if batched else (b - A @ x).norm()
    # The reported residual is the recurrence's: equal to the true one up to rounding.
    assert torch.allclose(stats.residual_norm, true_res, rtol=1e-3, atol=1e-12 * float(b.norm()))
    assert stats.residual_history.shape[0] == stats.iterations + 1
    assert torch.allclose(stats.residual_history[0], b.norm(dim=-1) if batched else b.norm())
    assert torch.allclose(stats.residual_history[-1], stats.residual_norm)
    assert torch.allclose(stats.rhs_norm, b.norm(dim=-1) if batched else b.norm())
    assert bool(stats.converged.all())
    assert stats.result is hg.Result.CONVERGED
    assert not bool(stats.breakdown.any()) and not bool(stats.nonfinite.any())


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_matches_linalg_solve_matrix_operator(spd_system, name):
    A, B = spd_system
    b = B[0]
    solver = _solvers(COND)[name]
    sol = solver.solve(hg.MatrixOperator(A), {"x": b})
    x_true = torch.linalg.solve(A, b)
    x = sol.value["x"]
    assert float((x - x_true).norm() / x_true.norm()) < 1e-9
    _check_report(sol.stats, A, b, x)
    assert sol.stats.solver == name
    if name != "LayerwiseCG":  # + one confirming true residual for a Krylov solve with a tolerance
        assert sol.stats.num_hvp == sol.stats.iterations + _confirm(name)
    value, result, stats = sol
    assert result is hg.Result.CONVERGED and value is sol.value and stats is sol.stats


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_batched_right_hand_sides(spd_system, name):
    A, B = spd_system
    solver = _solvers(COND)[name]
    sol = solver.solve(hg.MatrixOperator(A), {"x": B}, batched=True)
    X_true = torch.linalg.solve(A, B.T).T
    X = sol.value["x"]
    assert X.shape == B.shape
    assert float((X - X_true).norm(dim=1).max() / X_true.norm(dim=1).min()) < 1e-9
    assert sol.stats.residual_norm.shape == (3,)
    assert sol.stats.residual_history.shape == (sol.stats.iterations + 1, 3)
    if name != "LayerwiseCG":
        assert sol.stats.num_hvp == 3 * (sol.stats.iterations + _confirm(name))
    _check_report(sol.stats, A, B, X, batched=True)


@pytest.mark.parametrize("name", ["CG", "MINRES", "Neumann"])
def test_solver_on_multi_leaf_tree(name):
    """A dense SPD matrix acting on a tree of four tensors (a coupled operator)."""
    g = generator(1)
    A = spd(TREE_SIZE, 50.0, g)
    b_flat = torch.randn(TREE_SIZE, generator=g, dtype=F64)
    b = unflatten(b_flat, TREE_SHAPES)
    sol = _solvers(50.0)[name].solve(tree_operator(A), b)
    assert set(sol.value) == set(TREE_SHAPES)
    assert all(sol.value[k].shape == b[k].shape for k in b)
    x_true = torch.linalg.solve(A, b_flat)
    x = flatten(sol.value)
    assert float((x - x_true).norm() / x_true.norm()) < 1e-9
    _check_report(sol.stats, A, b_flat, x)


@pytest.mark.parametrize("name", ["CG", "MINRES", "Neumann"])
def test_solver_on_multi_leaf_tree_batched_with_x0(name):
    g = generator(2)
    A = spd(TREE_SIZE, 30.0, g)
    B_flat = torch.randn(2, TREE_SIZE, generator=g, dtype=F64)
    X_true = torch.linalg.solve(A, B_flat.T).T
    x0 = unflatten(X_true + 0.1 * torch.randn(2, TREE_SIZE, generator=g, dtype=F64), TREE_SHAPES)
    sol = _solvers(30.0)[name].solve(tree_operator(A), unflatten(B_flat, TREE_SHAPES), x0, batched=True)
    X = flatten(sol.value)
    assert float((X - X_true).norm() / X_true.norm()) < 1e-9
    # The history starts at the residual of x0, not at ||b||.
    assert torch.allclose(sol.stats.residual_history[0], (B_flat - flatten(x0) @ A.T).norm(dim=1))
    assert sol.stats.num_hvp == 2 * (sol.stats.iterations + 1 + _confirm(name))


def test_max_iterations_is_reported():
    A = spd(N, 1e4, generator(3))
    b = torch.randn(N, generator=generator(4), dtype=F64)
    sol = hg.CG(maxiter=3, tol=1e-12).solve(hg.MatrixOperator(A), {"x": b})
    assert sol.stats.iterations == 3
    assert sol.result is hg.Result.MAX_ITERATIONS
    assert not bool(sol.stats.converged)
    true_res = (b - A @ sol.value["x"]).norm()
    assert torch.allclose(sol.stats.residual_norm, true_res, rtol=1e-8)
    assert float(sol.stats.relative_residual) == pytest.approx(float(true_res / b.norm()), rel=1e-8)


def test_fixed_iteration_solve_runs_exactly_maxiter():
    A = spd(N, 10.0, generator(5))
    b = torch.randn(N, generator=generator(6), dtype=F64)
    for solver in (hg.CG(maxiter=7, tol=0.0), hg.CG(maxiter=7, tol=1e-3, check_every=None)):
        sol = solver.solve(hg.MatrixOperator(A), {"x": b})
        assert sol.stats.iterations == 7 and sol.stats.num_hvp == 7


def test_cg_error_decreases_like_theory_on_spd():
    """A-norm error of CG after k steps is at most 2 ((sqrt(k)-1)/(sqrt(k)+1))^k of the start."""
    g = generator(7)
    A = spd(40, 100.0, g)
    b = torch.randn(40, generator=g, dtype=F64)
    x_true = torch.linalg.solve(A, b)
    rho = (100.0**0.5 - 1) / (100.0**0.5 + 1)

    def a_norm(e):
        return float(torch.sqrt(e @ A @ e))

    for k in (2, 5, 10):
        x = hg.CG(maxiter=k, tol=0.0).solve(hg.MatrixOperator(A), {"x": b}).value["x"]
        assert a_norm(x - x_true) <= 2 * rho**k * a_norm(x_true) * (1 + 1e-10)


# --- indefinite systems -------------------------------------------------------------------

@pytest.fixture(scope="module")
def indefinite_system():
    g = generator(8)
    ev = torch.cat([torch.tensor([-2.0, -0.5], dtype=F64), torch.linspace(0.5, 4.0, N - 2, dtype=F64)])
    A, Q = sym_with_spectrum(ev, g)
    # The right-hand side has a large component along the most negative eigenvector.
    b = torch.randn(N, generator=g, dtype=F64) + 3.0 * Q[:, 0]
    return A, b


def test_cg_reports_breakdown_on_indefinite_system(indefinite_system):
    A, b = indefinite_system
    sol = hg.CG(maxiter=100, tol=1e-12).solve(hg.MatrixOperator(A), {"x": b})
    assert bool(sol.stats.breakdown)
    assert sol.result is hg.Result.BREAKDOWN
    assert float(sol.stats.min_curvature) < 0
    assert sol.stats.iterations < 100  # stopped at the breakdown
    assert torch.isfinite(sol.value["x"]).all()
    assert "MINRES" in sol.result.message


def test_cg_on_breakdown_raise(indefinite_system):
    A, b = indefinite_system
    with pytest.raises(hg.SolverBreakdownError, match="MINRES"):
        hg.CG(maxiter=100, tol=1e-12, on_breakdown="raise").solve(hg.MatrixOperator(A), {"x": b})


def test_cg_on_breakdown_continue_keeps_iterating(indefinite_system):
    A, b = indefinite_system
    sol = hg.CG(maxiter=100, tol=1e-12, on_breakdown="continue").solve(hg.MatrixOperator(A), {"x": b})
    assert bool(sol.stats.breakdown) and sol.result is hg.Result.BREAKDOWN
    # Plain CG (the Lanczos form) still solves a non-singular indefinite system here.
    x_true = torch.linalg.solve(A, b)
    assert float((sol.value["x"] - x_true).norm() / x_true.norm()) < 1e-8


def test_minres_solves_indefinite_system(indefinite_system):
    A, b = indefinite_system
    sol = hg.MINRES(maxiter=200, tol=1e-13).solve(hg.MatrixOperator(A), {"x": b})
    x_true = torch.linalg.solve(A, b)
    assert float((sol.value["x"] - x_true).norm() / x_true.norm()) < 1e-10
    assert sol.result is hg.Result.CONVERGED
    assert not bool(sol.stats.breakdown)
    assert float(sol.stats.min_curvature) < 0  # seen and reported, not a failure
    assert torch.allclose(sol.stats.residual_norm, (b - A @ sol.value["x"]).norm(), rtol=1e-3, atol=1e-12)


def test_minres_residual_is_monotone(indefinite_system):
    A, b = indefinite_system
    hist = hg.MINRES(maxiter=30, tol=0.0).solve(hg.MatrixOperator(A), {"x": b}).stats.residual_history
    assert bool((hist[1:] <= hist[:-1] * (1 + 1e-12)).all())


def test_batched_cg_breakdown_is_per_right_hand_side(indefinite_system):
    """Only the rhs that meets negative curvature is flagged; the SPD-subspace one converges."""
    A, b = indefinite_system
    _, Q = torch.linalg.eigh(A)
    b_pos = Q[:, 2:] @ torch.randn(N - 2, generator=generator(9), dtype=F64)  # no negative component
    # tol well above rounding: once the 18-dimensional Krylov space is exhausted, rounding noise
    # along the negative eigenvectors would be the next search direction.
    sol = hg.CG(maxiter=100, tol=1e-7).solve(hg.MatrixOperator(A), {"x": torch.stack([b, b_pos])},
                                             batched=True)
    assert sol.stats.breakdown.tolist() == [True, False]
    assert float(sol.stats.min_curvature[0]) < 0 < float(sol.stats.min_curvature[1])
    x_pos = torch.linalg.solve(A, b_pos)
    assert float((sol.value["x"][1] - x_pos).norm() / x_pos.norm()) < 1e-6


def _confirm(name: str) -> int:
    """Products a solve with a tolerance spends on its confirming true residual."""
    return 0 if name == "Neumann" else 1


# --- Neumann ------------------------------------------------------------------------------

def test_neumann_converges_below_two_over_lambda_max_and_diverges_above():
    g = generator(10)
    A = spd(N, 10.0, g)  # eigenvalues in [1, 10]
    b = torch.randn(N, generator=g, dtype=F64)
    x_true = torch.linalg.solve(A, b)
    good = hg.Neumann(alpha=1.9 / 10.0, maxiter=2000, tol=1e-12).solve(hg.MatrixOperator(A), {"x": b})
    assert good.result is hg.Result.CONVERGED
    assert float((good.value["x"] - x_true).norm() / x_true.norm()) < 1e-10
    bad = hg.Neumann(alpha=2.2 / 10.0, maxiter=200, tol=1e-12).solve(hg.MatrixOperator(A), {"x": b})
    hist = bad.stats.residual_history
    assert bad.result is hg.Result.DIVERGED and bool(bad.stats.diverged)
    assert not bool(good.stats.diverged)
    assert float(hist[-1]) > 1e3 * float(hist[0])
    assert float(hist[-1]) > float(hist[-50])


def test_neumann_partial_sum_is_the_series():
    """K iterations from x0 = 0 give alpha * sum_{j<K} (I - alpha A)^j b exactly."""
    g = generator(11)
    A = spd(8, 5.0, g)
    b = torch.randn(8, generator=g, dtype=F64)
    alpha, K = 0.3, 6
    M = torch.eye(8, dtype=F64) - alpha * A
    series = alpha * sum(torch.linalg.matrix_power(M, j) @ b for j in range(K))
    x = hg.Neumann(alpha=alpha, maxiter=K, tol=0.0).solve(hg.MatrixOperator(A), {"x": b}).value["x"]
    assert torch.allclose(x, series, rtol=1e-12, atol=1e-14)


def test_neumann_accepts_non_symmetric_operator():
    g = generator(12)
    A = torch.eye(N, dtype=F64) + 0.3 * torch.randn(N, N, generator=g, dtype=F64) / N**0.5
    b = torch.randn(N, generator=g, dtype=F64)
    sol = hg.Neumann(alpha=0.8, maxiter=500, tol=1e-12).solve(hg.MatrixOperator(A), {"x": b})
    assert torch.allclose(sol.value["x"], torch.linalg.solve(A, b), rtol=1e-9, atol=1e-11)


# --- identity -----------------------------------------------------------------------------

def test_identity_solver():
    A = spd(N, 3.0, generator(13))
    b = torch.randn(N, generator=generator(14), dtype=F64)
    sol = hg.Identity(scale=0.5).solve(hg.MatrixOperator(A), {"x": b})
    assert torch.equal(sol.value["x"], 0.5 * b)
    assert sol.stats.num_hvp == 0 and sol.result is hg.Result.UNCHECKED
    checked = hg.Identity(scale=0.5, compute_residual=True).solve(hg.MatrixOperator(A), {"x": b})
    assert checked.stats.num_hvp == 1
    assert torch.allclose(checked.stats.residual_norm, (b - 0.5 * A @ b).norm())


# --- low precision ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_low_precision_scalars_are_float32(dtype, name):
    g = generator(15)
    ev = torch.linspace(1.0, 4.0, 16, dtype=F64)
    A, _ = sym_with_spectrum(ev, g)
    b = torch.randn(16, generator=g, dtype=F64)
    A_lp, b_lp = A.to(dtype), b.to(dtype)
    # The confirming true residual b - Ax is itself computed in the low precision: bfloat16's
    # rounding (eps 7.8e-3) puts it near 1e-2, so the tolerance is 3e-2 there.
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    solver = {"CG": hg.CG(maxiter=30, tol=tol), "MINRES": hg.MINRES(maxiter=30, tol=tol),
              "LayerwiseCG": hg.LayerwiseCG(maxiter=30, tol=tol),
              "Neumann": hg.Neumann(alpha=0.4, maxiter=60, tol=tol)}[name]
    sol = solver.solve(hg.MatrixOperator(A_lp), {"x": b_lp})
    assert sol.value["x"].dtype == dtype
    for t in (sol.stats.residual_norm, sol.stats.rhs_norm, sol.stats.residual_history, sol.stats.threshold):
        assert t.dtype == torch.float32
    if sol.stats.min_curvature is not None:
        assert sol.stats.min_curvature.dtype == torch.float32
    # Truth: the float64 solve of the rounded system.
    x_true = torch.linalg.solve(A_lp.double(), b_lp.double())
    assert float((sol.value["x"].double() - x_true).norm() / x_true.norm()) < 5e-2
    assert sol.result is hg.Result.CONVERGED
