"""The randomised Nystrom preconditioner: exactness on low-rank operators, fewer CG iterations
on fast-decaying spectra, and its behaviour on indefinite operators."""

from __future__ import annotations

import pytest
import torch
from core_helpers import (
    F64,
    TREE_SHAPES,
    TREE_SIZE,
    flatten,
    generator,
    sym_with_spectrum,
    tree_operator,
    unflatten,
)

import hypergrad as hg

N = 40


def dense_map(P, n: int = N) -> torch.Tensor:
    """The matrix of r -> P^{-1} r, column j = P^{-1} e_j."""
    return P({"x": torch.eye(n, dtype=F64)})["x"].T


def _build(A: torch.Tensor, rank: int, mu: float = 0.0, seed: int = 1):
    return hg.NystromPreconditioner.build(hg.MatrixOperator(A), {"x": torch.zeros(A.shape[0], dtype=F64)},
                                          rank, mu=mu, generator=generator(seed))


def test_exact_on_an_operator_of_the_sketch_rank():
    """For PSD A of rank r the sketch is exact, so P^{-1}(A + mu I) has eigenvalues lambda_r + mu
    (on the range of A) and mu (on its complement)."""
    lam = torch.tensor([50.0, 20.0, 8.0, 3.0, 2.0], dtype=F64)
    ev = torch.cat([lam, torch.zeros(N - 5, dtype=F64)])
    A, _ = sym_with_spectrum(ev, generator(0))
    mu = 0.5
    P = _build(A, 5, mu)
    assert torch.allclose(P.eigenvalues, lam, rtol=1e-8)
    M = dense_map(P)
    assert torch.allclose(M, M.T, atol=1e-12)
    L = torch.linalg.cholesky(torch.linalg.inv(M))  # P = L L^T
    sym = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, A + mu * torch.eye(N, dtype=F64),
                                                                            upper=False).T, upper=False)
    evals = torch.linalg.eigvalsh((sym + sym.T) / 2)
    expected = torch.sort(torch.cat([torch.full((5,), 2.0 + mu), torch.full((N - 5,), mu)]).to(F64)).values
    assert torch.allclose(evals, expected, rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def decaying_system():
    """A + mu I with A PSD, eigenvalues 1e4 * 0.4^i (fast decay): condition number 1e4."""
    g = generator(2)
    ev = 1e4 * 0.4 ** torch.arange(N, dtype=F64)
    A, _ = sym_with_spectrum(ev, g)
    mu = 1.0
    b = torch.randn(N, generator=g, dtype=F64)
    return A, mu, b


def test_preconditioned_cg_needs_fewer_iterations(decaying_system):
    A, mu, b = decaying_system
    system = A + mu * torch.eye(N, dtype=F64)
    x_true = torch.linalg.solve(system, b)
    P = _build(A, 12, mu)
    plain = hg.CG(maxiter=200, tol=1e-10).solve(hg.MatrixOperator(system), {"x": b})
    pcg = hg.CG(maxiter=200, tol=1e-10, preconditioner=P).solve(hg.MatrixOperator(system), {"x": b})
    assert plain.result is hg.Result.CONVERGED and pcg.result is hg.Result.CONVERGED
    assert pcg.stats.iterations < plain.stats.iterations / 2
    for sol in (plain, pcg):
        assert float((sol.value["x"] - x_true).norm() / x_true.norm()) < 1e-8
        assert torch.allclose(sol.stats.residual_norm, (b - system @ sol.value["x"]).norm(), rtol=1e-2,
                              atol=1e-11 * float(b.norm()))


def test_from_damped_on_a_tree():
    """from_damped(a I + c B) sketches B with mu = a / c; the multi-leaf tree path."""
    g = generator(3)
    ev = 1e3 * 0.3 ** torch.arange(TREE_SIZE, dtype=F64)
    B, _ = sym_with_spectrum(ev, g)
    a, c = 2.0, 0.5
    op = hg.DampedOperator(tree_operator(B), a, c)
    like = unflatten(torch.zeros(TREE_SIZE, dtype=F64), TREE_SHAPES)
    P = hg.NystromPreconditioner.from_damped(op, like, 8, generator=generator(4))
    assert P.mu == pytest.approx(a / c)
    rhs = unflatten(torch.randn(TREE_SIZE, generator=g, dtype=F64), TREE_SHAPES)
    x_true = torch.linalg.solve(a * torch.eye(TREE_SIZE, dtype=F64) + c * B, flatten(rhs))
    plain = hg.CG(maxiter=100, tol=1e-10).solve(op, rhs)
    pcg = hg.CG(maxiter=100, tol=1e-10, preconditioner=P).solve(op, rhs)
    assert pcg.stats.iterations < plain.stats.iterations
    assert float((flatten(pcg.value) - x_true).norm() / x_true.norm()) < 1e-8
    assert set(pcg.value) == set(TREE_SHAPES)


def test_strongly_indefinite_operator_raises():
    A, _ = sym_with_spectrum(torch.linspace(-5.0, 5.0, N, dtype=F64), generator(5))
    with pytest.raises(hg.IndefiniteSketchError, match="shift"):
        _build(A, 10)


@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("mu", [0.0, 1e-2])
def test_small_negative_eigenvalues_missed_by_the_sketch_give_spd_map(rank, mu):
    """Eight positive eigenvalues (1 ... 100) and 32 at -1e-3: a sketch of rank <= 8 is positive
    definite, the build succeeds, and P^{-1} is symmetric positive definite."""
    ev = torch.cat([torch.logspace(2, 0, 8, dtype=F64), torch.full((N - 8,), -1e-3, dtype=F64)])
    A, _ = sym_with_spectrum(ev, generator(6))
    P = _build(A, rank, mu)
    assert bool((P.eigenvalues >= 0).all())
    M = dense_map(P)
    assert torch.allclose(M, M.T, atol=1e-12)
    evals = torch.linalg.eigvalsh((M + M.T) / 2)
    assert float(evals[0]) > 1e-3
    assert float(evals[-1]) <= 1 + 1e-10


def test_sketch_beyond_the_numerical_rank_with_mu_zero_keeps_map_spd():
    ev = torch.cat([torch.logspace(2, 0, 5, dtype=F64), torch.full((N - 5,), -1e-15, dtype=F64)])
    A, _ = sym_with_spectrum(ev, generator(7))
    P = _build(A, 8, 0.0)
    evals = torch.linalg.eigvalsh(dense_map(P))
    assert float(evals[0]) > 1e-8


def test_low_precision_leaves_build_in_float32():
    ev = 1e2 * 0.5 ** torch.arange(16, dtype=F64)
    A, _ = sym_with_spectrum(ev, generator(8))
    P = hg.NystromPreconditioner.build(hg.MatrixOperator(A.to(torch.bfloat16)),
                                       {"x": torch.zeros(16, dtype=torch.bfloat16)}, 4, mu=1.0,
                                       generator=generator(9))
    assert P.basis.dtype == torch.float32
    out = P({"x": torch.ones(2, 16, dtype=torch.bfloat16)})
    assert out["x"].dtype == torch.bfloat16 and out["x"].shape == (2, 16)
    # Nystrom under-approximates (A_hat <= A): lambda_hat_i <= lambda_i, the top one close.
    assert bool((P.eigenvalues <= ev[:4].float() * 1.02).all())
    assert float(P.eigenvalues[0]) == pytest.approx(100.0, rel=5e-2)


def test_invalid_arguments():
    A, _ = sym_with_spectrum(torch.linspace(1.0, 2.0, 6, dtype=F64), generator(10))
    like = {"x": torch.zeros(6, dtype=F64)}
    for rank in (0, 7, 2.0):
        with pytest.raises(ValueError, match="rank"):
            hg.NystromPreconditioner.build(hg.MatrixOperator(A), like, rank)
    with pytest.raises(ValueError, match="mu"):
        hg.NystromPreconditioner.build(hg.MatrixOperator(A), like, 2, mu=-1.0)
    with pytest.raises(ValueError, match="operator_coeff"):
        hg.NystromPreconditioner.from_damped(hg.DampedOperator(hg.MatrixOperator(A), 1.0, 0.0), like, 2)
