"""Solves tell the truth on singular, inconsistent, drifting and diverging systems.

Truths: ``torch.linalg.pinv`` (minimum-norm least squares), residuals recomputed here in float64,
closed forms on diagonal systems. Each case of issue 17's table has a test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from core_helpers import F64, CountingOperator, generator

import hypergrad as hg


def _mat(*diag: float) -> hg.MatrixOperator:
    return hg.MatrixOperator(torch.diag(torch.tensor(diag, dtype=F64)))


def _true_residual(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return float((b - A @ x).norm())


def _singular_symmetric(n: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric indefinite matrix of the given rank (distinct eigenvalues) and its eigenvectors."""
    g = generator(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.zeros(n, dtype=F64)
    nonzero = torch.linspace(1.0, 4.0, rank, dtype=F64) * torch.where(torch.arange(rank) % 3 == 0, -1.0, 1.0)
    lam[:rank] = nonzero
    return Q @ torch.diag(lam) @ Q.T, Q


# --- the table's rows -----------------------------------------------------------------------

def test_minres_on_singular_inconsistent_diagonal_returns_the_minimum_norm_least_squares_solution():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    b = torch.ones(2, dtype=F64)
    sol = hg.MINRES(maxiter=10, tol=1e-10).solve(hg.MatrixOperator(A), {"x": b})
    x = sol.value["x"]
    assert sol.result is hg.Result.SINGULAR
    torch.testing.assert_close(x, torch.linalg.pinv(A) @ b, atol=1e-12, rtol=0)
    assert sol.stats.residual_source == "true"
    assert float(sol.stats.residual_norm) == pytest.approx(_true_residual(A, b, x), rel=1e-12)


def test_gmres_on_singular_inconsistent_diagonal_reports_singular_with_the_true_residual():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    b = torch.ones(2, dtype=F64)
    for tol in (1e-10, 0.0):
        sol = hg.GMRES(maxiter=10, tol=tol).solve(hg.MatrixOperator(A, symmetric=False), {"x": b})
        x = sol.value["x"]
        assert sol.result is hg.Result.SINGULAR
        assert bool(torch.isfinite(x).all()) and float(x.abs().max()) < 10
        # x is a least-squares solution: the residual is b's null-space part, (0, 1).
        assert float(sol.stats.residual_norm) == pytest.approx(_true_residual(A, b, x), rel=1e-12)
        assert _true_residual(A, b, x) == pytest.approx(1.0, rel=1e-12)


def test_gmres_on_the_zero_matrix_is_singular_not_converged():
    A = torch.zeros(2, 2, dtype=F64)
    b = torch.ones(2, dtype=F64)
    sol = hg.GMRES(maxiter=5, tol=1e-10).solve(hg.MatrixOperator(A, symmetric=False), {"x": b})
    assert sol.result is hg.Result.SINGULAR
    assert torch.equal(sol.value["x"], torch.zeros(2, dtype=F64))
    assert float(sol.stats.residual_norm) == pytest.approx(2**0.5, rel=1e-12)


def test_cg_on_singular_inconsistent_diagonal_is_singular_and_finite():
    A = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=F64))
    b = torch.ones(3, dtype=F64)
    sol = hg.CG(tol=1e-10).solve(hg.MatrixOperator(A), {"x": b})
    x = sol.value["x"]
    assert sol.result is hg.Result.SINGULAR
    assert bool(sol.stats.singular)
    assert bool(torch.isfinite(x).all()) and float(x.abs().max()) < 1e3
    assert float(sol.stats.residual_norm) == pytest.approx(_true_residual(A, b, x), rel=1e-12)
    assert "MINRES" in hg.Result.SINGULAR.message and "damping" in hg.Result.SINGULAR.message


def test_implicit_grad_with_an_inner_tensor_the_lower_loss_ignores_warns_singular():
    # Lower: 0.5 (a - o)^2, with c ignored; upper: (a + c)^2 / 2 + c. H = diag(1, 0) and v = (a + c, a + c + 1)
    # has a null-space part, so no implicit hypergradient exists. GMRES used to say CONVERGED.
    def lower(i, o):
        return 0.5 * (i["a"] - o["o"]) ** 2

    def upper(i, o):
        return 0.5 * (i["a"] + i["c"]) ** 2 + i["c"]

    inner = {"a": torch.tensor(0.3, dtype=F64), "c": torch.tensor(0.2, dtype=F64)}
    outer = {"o": torch.tensor(0.3, dtype=F64)}
    solver = hg.GMRES(maxiter=10, tol=1e-10)
    with pytest.warns(hg.SolveFailureWarning, match="SINGULAR"):
        _, stats = hg.implicit_grad(lower, upper, inner, outer, solver=solver)
    assert stats.result is hg.Result.SINGULAR
    with pytest.raises(hg.SolveFailureError) as info:
        hg.implicit_grad(lower, upper, inner, outer, solver=solver, on_failure="raise")
    assert info.value.result is hg.Result.SINGULAR
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hg.implicit_grad(lower, upper, inner, outer, solver=solver, on_failure="ignore")
    # MINRES gives the minimum-norm answer: u = pinv(H) v = (v_a, 0), dF/do = -(-1) * u_a = v_a.
    with pytest.warns(hg.SolveFailureWarning):
        grads, _ = hg.implicit_grad(lower, upper, inner, outer, solver=hg.MINRES(maxiter=10, tol=1e-10))
    assert float(grads["o"]) == pytest.approx(0.5, rel=1e-10)


# --- MINRES against pinv at several ranks ---------------------------------------------------

@pytest.mark.parametrize("rank", [1, 4, 12, 24])
@pytest.mark.parametrize("consistent", [True, False])
def test_minres_matches_pinv_on_singular_systems(rank, consistent):
    n = 30
    A, Q = _singular_symmetric(n, rank, seed=rank)
    g = generator(100 + rank)
    b = A @ torch.randn(n, generator=g, dtype=F64)
    if not consistent:
        b = b + Q[:, rank:] @ torch.randn(n - rank, generator=g, dtype=F64)
    sol = hg.MINRES(maxiter=100, tol=1e-11).solve(hg.MatrixOperator(A), {"x": b})
    x, x_pinv = sol.value["x"], torch.linalg.pinv(A) @ b
    assert float((x - x_pinv).norm() / x_pinv.norm()) < 1e-8
    assert sol.result is (hg.Result.CONVERGED if consistent else hg.Result.SINGULAR)
    assert float(sol.stats.residual_norm) == pytest.approx(_true_residual(A, b, x), rel=1e-8, abs=1e-12)


def test_minres_fixed_iterations_on_an_inconsistent_system_is_singular_least_squares_and_spends_nothing_extra():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    b = torch.ones(2, dtype=F64)
    op = CountingOperator(hg.MatrixOperator(A))
    sol = hg.MINRES(maxiter=6, tol=0.0).solve(op, {"x": b})
    assert sol.result is hg.Result.SINGULAR and op.calls == 6
    assert sol.stats.residual_source == "recurrence"
    # A least-squares solution (residual = b's null part), not necessarily the minimum-norm one.
    assert _true_residual(A, b, sol.value["x"]) == pytest.approx(1.0, rel=1e-12)


# --- confirmation by the true residual ------------------------------------------------------

def test_fixed_iteration_solves_spend_no_extra_product_and_tolerance_solves_one():
    A = torch.diag(torch.linspace(1.0, 3.0, 8, dtype=F64))
    b = torch.ones(8, dtype=F64)
    for solver_cls in (hg.CG, hg.MINRES, hg.GMRES):
        op = CountingOperator(hg.MatrixOperator(A))
        fixed = solver_cls(maxiter=4, tol=0.0).solve(op, {"x": b})
        assert op.calls == 4 == fixed.stats.num_hvp
        op = CountingOperator(hg.MatrixOperator(A))
        checked = solver_cls(maxiter=50, tol=1e-10).solve(op, {"x": b})
        assert op.calls == checked.stats.iterations + 1 == checked.stats.num_hvp
        assert checked.result is hg.Result.CONVERGED


def test_a_recurrence_that_drifts_off_the_truth_is_reported_inaccurate():
    # float32 CG on kappa = 1e4: the recurrence goes below 1e-5 while the true residual stays ~4e-4.
    g = generator(7)
    n = 200
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = (Q @ torch.diag(torch.logspace(0, 4, n, dtype=F64)) @ Q.T).float()
    b = torch.randn(n, generator=g).float()
    sol = hg.CG(maxiter=2000, tol=1e-5).solve(hg.MatrixOperator(A), {"x": b})
    true = float((b.double() - A.double() @ sol.value["x"].double()).norm())
    recurrence = float(sol.stats.residual_history[-1])
    assert sol.result is hg.Result.INACCURATE
    assert recurrence <= float(sol.stats.threshold) < true
    assert sol.stats.iterations < 2000
    assert float(sol.stats.residual_norm) == pytest.approx(true, rel=2e-2)  # b - Ax computed in float32


def test_report_tol_judges_a_fixed_iteration_solve_afterwards():
    A = torch.diag(torch.linspace(1.0, 10.0, 20, dtype=F64))
    b = torch.ones(20, dtype=F64)
    x = torch.linalg.solve(A, b)
    for k in (2, 15):
        op = CountingOperator(hg.MatrixOperator(A))
        sol = hg.CG(maxiter=k, tol=0.0, report_tol=1e-3).solve(op, {"x": b})
        assert op.calls == k  # no confirming product, no check inside the loop
        met = float((b - A @ sol.value["x"]).norm()) <= 1e-3 * float(b.norm())
        assert sol.result is (hg.Result.CONVERGED if met else hg.Result.MAX_ITERATIONS)
        assert met == (k == 15)
        assert float((sol.value["x"] - x).norm()) > 0 or met


# --- Neumann divergence ---------------------------------------------------------------------

def test_neumann_divergence_is_its_own_result_and_warns_in_fixed_point_grad():
    # T(i, o) = i - 2.5 * (i - o): I - dT/di = 2.5, Neumann with alpha = 1 has ratio |1 - 2.5| > 1.
    def fixed_point(i, o):
        return {"i": i["i"] - 2.5 * (i["i"] - o["o"])}

    def upper(i, o):
        return 0.5 * i["i"] ** 2

    inner, outer = {"i": torch.tensor(1.0, dtype=F64)}, {"o": torch.tensor(1.0, dtype=F64)}
    with pytest.warns(hg.SolveFailureWarning, match="DIVERGED"):
        _, stats = hg.fixed_point_grad(fixed_point, upper, inner, outer,
                                       solver=hg.Neumann(maxiter=10, alpha=1.0, tol=0.0))
    assert stats.result is hg.Result.DIVERGED
    assert "raising maxiter will not help" in hg.Result.DIVERGED.message


# --- implicit_grad: loud unconverged solves, quiet fixed-iteration ones ----------------------

def _ill_conditioned_ridge():
    g = generator(11)
    X = torch.randn(40, 12, generator=g, dtype=F64) * torch.logspace(0, 3, 12, dtype=F64)
    y = torch.randn(40, generator=g, dtype=F64)

    def lower(i, o):
        return 0.5 * ((X @ i["w"] - y) ** 2).mean() + 0.5 * o["lam"] * (i["w"] ** 2).sum()

    def upper(i, o):
        return 0.5 * (i["w"] ** 2).sum()

    lam = torch.tensor(1e-3, dtype=F64)
    w = torch.linalg.solve(X.T @ X / 40 + lam * torch.eye(12, dtype=F64), X.T @ y / 40)
    return lower, upper, {"w": w}, {"lam": lam}


def test_implicit_grad_warns_when_a_tolerance_solve_misses_it_and_stays_quiet_for_fixed_iterations():
    lower, upper, inner, outer = _ill_conditioned_ridge()
    with pytest.warns(hg.SolveFailureWarning, match="MAX_ITERATIONS"):
        _, stats = hg.implicit_grad(lower, upper, inner, outer, solver=hg.CG(maxiter=1, tol=1e-10))
    assert stats.result is hg.Result.MAX_ITERATIONS
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.SolveFailureWarning)
        hg.implicit_grad(lower, upper, inner, outer, solver=hg.CG(maxiter=1, tol=0.0))
    with pytest.warns(hg.SolveFailureWarning, match="MAX_ITERATIONS"):
        hg.implicit_grad(lower, upper, inner, outer, solver=hg.CG(maxiter=1, tol=0.0, report_tol=1e-10))


def test_on_failure_is_validated():
    lower, upper, inner, outer = _ill_conditioned_ridge()
    with pytest.raises(ValueError, match="on_failure"):
        hg.implicit_grad(lower, upper, inner, outer, on_failure="loud")


# --- the Nystrom sketch at any size -----------------------------------------------------------

class _LowRank(hg.LinearOperator):
    """``U diag(s) U^T`` in float32 with orthonormal ``U`` (n x r): cheap at any n."""

    symmetric = True
    positive_definite = False

    def __init__(self, U: torch.Tensor, s: torch.Tensor) -> None:
        self.U, self.s = U, s

    def mv(self, x):
        return {"p": self.matmat({"p": x["p"][None]})["p"][0]}

    def matmat(self, X):
        return {"p": ((X["p"] @ self.U) * self.s) @ self.U.T}


def _outlier_system(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, 8, generator=g))
    s = torch.logspace(1, 3, 8)  # 8 outliers, 10 ... 1000, on top of the identity
    return hg.DampedOperator(_LowRank(U, s), 1.0, 1.0), {"p": torch.randn(n, generator=g)}, g


def _nystrom_cuts_iterations(n: int) -> None:
    op, b, g = _outlier_system(n, seed=0)
    cg = hg.CG(maxiter=100, tol=1e-4)
    plain = cg.solve(op, b)
    P = hg.NystromPreconditioner.from_damped(op, {"p": torch.zeros(n)}, 16, generator=g)
    pcg = hg.CG(maxiter=100, tol=1e-4, preconditioner=P).solve(op, b)
    assert plain.result is hg.Result.CONVERGED and pcg.result is hg.Result.CONVERGED
    # The sketch measured the 8 outliers (and dropped the 8 rounding-level directions) ...
    assert P.rank == 8
    torch.testing.assert_close(P.eigenvalues, torch.logspace(1, 3, 8).flip(0), rtol=1e-3, atol=0)
    # ... so preconditioned CG sees (almost) only the identity: CG needs one iteration per
    # outlier plus the bulk, PCG a handful.
    assert plain.stats.iterations >= 9
    assert pcg.stats.iterations <= 3


def test_nystrom_keeps_measured_outliers_and_cuts_cg_iterations():
    _nystrom_cuts_iterations(20_000)


@pytest.mark.slow
def test_nystrom_keeps_its_rank_at_resnet18_size():
    # 12M float32 parameters: the old rule eig > eig[0] * n * eps kept nothing here.
    _nystrom_cuts_iterations(12_000_000)


def test_nystrom_of_the_zero_operator_keeps_nothing_and_warns():
    op = _LowRank(torch.zeros(50, 1), torch.zeros(1))
    with pytest.warns(hg.NystromRankWarning, match="identity"):
        P = hg.NystromPreconditioner.build(op, {"p": torch.zeros(50)}, 4, mu=1.0)
    assert P.rank == 0
    r = {"p": torch.randn(2, 50)}
    torch.testing.assert_close(P(r)["p"], r["p"])


def test_custom_root_warns_when_its_tolerance_solve_misses_it():
    lower, upper, inner, outer = _ill_conditioned_ridge()

    def fit(solver, on_failure="warn"):
        @hg.custom_root(lower, solver=solver, on_failure=on_failure)
        def solve(o):
            return {"w": inner["w"]}

        lam = outer["lam"].clone().requires_grad_(True)
        loss = upper(solve({"lam": lam}), {"lam": lam})
        return torch.autograd.grad(loss, lam)[0]

    with pytest.warns(hg.SolveFailureWarning, match="custom_root.*MAX_ITERATIONS"):
        fit(hg.CG(maxiter=1, tol=1e-10))
    with pytest.raises(hg.SolveFailureError):
        fit(hg.CG(maxiter=1, tol=1e-10), on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.SolveFailureWarning)
        fit(hg.CG(maxiter=1, tol=0.0))  # a fixed-iteration solve asked for exactly one iteration
