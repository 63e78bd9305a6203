"""LayerwiseCG against a plain re-implementation of the BiSSL reference formula, against
per-block CG on block-diagonal operators, and against CG on coupled ones."""

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


def reference_layerwise_cg(matvec, b: dict[str, torch.Tensor], iterations: int) -> dict[str, torch.Tensor]:
    """The reference formula, per tensor l: alpha_l = r_l.r_l / d_l.(Ad)_l,
    beta_l = r_l,new.r_l,new / r_l.r_l; x0 = 0; a fixed number of iterations.

    A leaf whose residual is exactly zero (a one-element leaf is solved in one step) keeps its
    value: its alpha and beta are taken as 0 instead of 0/0.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    d = {k: v.clone() for k, v in b.items()}
    rr = {k: torch.sum(r[k] * r[k]) for k in b}
    for _ in range(iterations):
        Ad = matvec(d)  # the product is joint
        for k in b:
            if rr[k] == 0:
                continue
            alpha = rr[k] / torch.sum(d[k] * Ad[k])
            x[k] = x[k] + alpha * d[k]
            r[k] = r[k] - alpha * Ad[k]
            rr_new = torch.sum(r[k] * r[k])
            d[k] = r[k] + (rr_new / rr[k]) * d[k]
            rr[k] = rr_new
    return x


def _coupled(seed: int):
    g = generator(seed)
    A = spd(TREE_SIZE, 20.0, g)
    b = unflatten(torch.randn(TREE_SIZE, generator=g, dtype=F64))
    return A, b


def _block_diagonal(seed: int):
    g = generator(seed)
    sizes = [12, 5, 4, 1]
    blocks = [spd(s, 10.0, g) if s > 1 else torch.tensor([[2.5]], dtype=F64) for s in sizes]
    A = torch.block_diag(*blocks)
    b = unflatten(torch.randn(TREE_SIZE, generator=g, dtype=F64))
    return A, blocks, b


def _rel(a, b) -> float:
    return float((flatten(a) - flatten(b)).norm() / flatten(b).norm())


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_matches_reference_formula_on_coupled_operator(iterations):
    A, b = _coupled(0)
    ref = reference_layerwise_cg(lambda d: unflatten(A @ flatten(d)), b, iterations)
    sol = hg.LayerwiseCG(maxiter=iterations, tol=0.0, on_breakdown="continue").solve(tree_operator(A), b)
    assert sol.stats.iterations == iterations
    assert _rel(sol.value, ref) < 1e-12


def test_matches_reference_formula_with_default_policy_when_curvature_stays_positive():
    A, _, b = _block_diagonal(1)
    A = A + 0.05 * spd(TREE_SIZE, 2.0, generator(2))  # weakly coupled
    sol = hg.LayerwiseCG(maxiter=4, tol=0.0).solve(tree_operator(A), b)
    assert float(sol.stats.min_curvature) > 0 and not bool(sol.stats.breakdown)
    ref = reference_layerwise_cg(lambda d: unflatten(A @ flatten(d)), b, 4)
    assert _rel(sol.value, ref) < 1e-12


@pytest.mark.parametrize("iterations", [1, 3, 12])
def test_equals_per_block_cg_on_block_diagonal_operator(iterations):
    A, blocks, b = _block_diagonal(3)
    sol = hg.LayerwiseCG(maxiter=iterations, tol=0.0).solve(tree_operator(A), b)
    for (key, shape), block in zip(TREE_SHAPES.items(), blocks, strict=True):
        cg = hg.CG(maxiter=iterations, tol=0.0).solve(hg.MatrixOperator(block), {"x": b[key].reshape(-1)})
        expected = cg.value["x"].reshape(shape)
        assert torch.allclose(sol.value[key], expected, rtol=1e-10, atol=1e-12), key


def test_converges_to_the_solution_on_block_diagonal_operator():
    A, _, b = _block_diagonal(4)
    sol = hg.LayerwiseCG(maxiter=50, tol=1e-12).solve(tree_operator(A), b)
    x_true = torch.linalg.solve(A, flatten(b))
    assert float((flatten(sol.value) - x_true).norm() / x_true.norm()) < 1e-10
    assert sol.result is hg.Result.CONVERGED
    cg = hg.CG(maxiter=50, tol=1e-12).solve(tree_operator(A), b)
    assert _rel(sol.value, cg.value) < 1e-10


def test_differs_from_cg_on_coupled_operator():
    A, b = _coupled(5)
    lw = hg.LayerwiseCG(maxiter=5, tol=0.0, on_breakdown="continue").solve(tree_operator(A), b)
    cg = hg.CG(maxiter=5, tol=0.0).solve(tree_operator(A), b)
    assert _rel(lw.value, cg.value) > 1e-3
    # Standard CG minimises the A-norm error over the Krylov space; layerwise CG does not.
    x_true = torch.linalg.solve(A, flatten(b))

    def a_err(x):
        e = flatten(x) - x_true
        return float(e @ A @ e)

    assert a_err(cg.value) < a_err(lw.value)


def test_single_leaf_layerwise_equals_cg():
    g = generator(6)
    A = spd(15, 50.0, g)
    b = {"x": torch.randn(15, generator=g, dtype=F64)}
    for k in (1, 4, 9):
        lw = hg.LayerwiseCG(maxiter=k, tol=0.0).solve(hg.MatrixOperator(A), b)
        cg = hg.CG(maxiter=k, tol=0.0).solve(hg.MatrixOperator(A), b)
        assert torch.allclose(lw.value["x"], cg.value["x"], rtol=1e-10, atol=1e-12)


def _bissl_like_system(seed: int = 9):
    """I + H/(lam + delta) with an indefinite H (eigenvalues -0.6 ... 2.7), as measured for BiSSL:
    positive definite, well conditioned, coupled across tensors."""
    g = generator(seed)
    H = sym_with_spectrum(torch.linspace(-0.6, 2.7, TREE_SIZE, dtype=F64), g)[0]
    A = torch.eye(TREE_SIZE, dtype=F64) + H / 10.001
    b = unflatten(torch.randn(TREE_SIZE, generator=g, dtype=F64))
    return A, b


def test_stalls_on_coupled_bissl_like_system_where_cg_converges():
    A, b = _bissl_like_system()
    x_true = torch.linalg.solve(A, flatten(b))
    lw = hg.LayerwiseCG(maxiter=20, tol=0.0).solve(tree_operator(A), b)
    cg = hg.CG(maxiter=20, tol=0.0).solve(tree_operator(A), b)
    err_lw = float((flatten(lw.value) - x_true).norm() / x_true.norm())
    err_cg = float((flatten(cg.value) - x_true).norm() / x_true.norm())
    assert err_cg < 1e-12
    assert err_lw > 1e-3


def test_reported_residual_is_the_true_residual_on_coupled_operator():
    A, b = _bissl_like_system()
    sol = hg.LayerwiseCG(maxiter=100, tol=1e-10).solve(tree_operator(A), b)
    true_res = (flatten(b) - A @ flatten(sol.value)).norm()
    assert torch.allclose(sol.stats.residual_norm, true_res, rtol=1e-3)
    if sol.result is hg.Result.CONVERGED:
        assert true_res <= sol.stats.threshold


def test_true_residual_false_saves_the_product_and_says_unchecked():
    A, b = _bissl_like_system()
    sol = hg.LayerwiseCG(maxiter=5, tol=0.0, true_residual=False).solve(tree_operator(A), b)
    with_check = hg.LayerwiseCG(maxiter=5, tol=0.0).solve(tree_operator(A), b)
    assert sol.stats.num_hvp == 5 and with_check.stats.num_hvp == 6
    assert sol.result is hg.Result.UNCHECKED
    assert torch.equal(flatten(sol.value), flatten(with_check.value))
    expected = reference_layerwise_cg(lambda d: unflatten(A @ flatten(d)), b, 5)
    assert _rel(sol.value, expected) < 1e-12
