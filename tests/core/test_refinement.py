"""Refinement (issue 20, levers 1 and 2) against dense float64 truths from ``torch.linalg.solve``.

Lever 1: low-precision (bfloat16) inner products, float32 outer residuals. Lever 2: a perturbed
("cheap") inner operator whose bias the outer residuals remove. The per-step contraction is
checked against what the theory says it is: ``e_{j+1} = A^{-1} r_j - d_j``, i.e. the inner
solve's relative accuracy on ``r_j`` measured against ``A^{-1}``.
"""

from __future__ import annotations

import pytest
import torch
from core_helpers import (
    F64,
    TREE_SIZE,
    CountingOperator,
    flatten,
    generator,
    no_host_sync,
    sym_with_spectrum,
    tree_operator,
    unflatten,
)

import hypergrad as hg

BF16 = torch.bfloat16
N = 40


def rel(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth).norm() / truth.norm())


@pytest.fixture(scope="module")
def system():
    """A = Q diag(1..20) Q^T (kappa 20) in float32, its bf16 view, b, and the float64 truth."""
    g = generator(0)
    A64, _ = sym_with_spectrum(torch.linspace(1.0, 20.0, N, dtype=F64), g)
    b64 = torch.randn(N, generator=g, dtype=F64)
    A = hg.MatrixOperator(A64.float(), symmetric=True)
    return {"A64": A64, "A": A, "low": hg.low_precision(A, BF16), "b": {"x": b64.float()},
            "x": torch.linalg.solve(A64, b64)}


def test_low_precision_matrix_products_are_bf16_rounded(system):
    v = {"x": torch.randn(N, generator=generator(1))}
    exact = system["A64"] @ v["x"].double()
    low = system["low"].mv(v)["x"]
    assert low.dtype == torch.float32
    err = rel(low, exact)
    assert 1e-4 < err < 3e-2  # bfloat16 keeps 8 significand bits (unit roundoff 2^-8 = 3.9e-3)


def test_bf16_products_alone_plateau(system):
    """CG with bf16 products stalls at the rounding level of its operator, whatever maxiter."""
    errors = [rel(hg.CG(maxiter=k, tol=0.0).solve(system["low"], system["b"]).value["x"], system["x"])
              for k in (40, 80)]
    assert min(errors) > 1e-3
    assert errors[1] > 0.5 * errors[0]  # no progress from doubling the iterations


def test_refinement_reaches_float32_accuracy_and_contracts_as_the_inner_solve(system):
    inner = hg.CG(maxiter=8, tol=0.0)
    solver = hg.Refinement(inner=inner, inner_operator=system["low"], maxiter=6, tol=0.0)
    iterates: list[torch.Tensor] = []
    sol = solver.solve(system["A"], system["b"], callback=lambda j, x: iterates.append(x["x"].clone()))
    A64, x_true, b = system["A64"], system["x"], system["b"]["x"]
    errors = [1.0] + [rel(x, x_true) for x in iterates]
    # Float32 accuracy (kappa * eps32 ~ 1e-6), which bf16 products alone cannot reach (>1e-3 above).
    assert errors[-1] < 1e-5
    # The theory: e_{j+1} = A^{-1} r_j - d_j, so ||e_{j+1}|| / ||e_j|| is the inner solve's relative
    # error on r_j measured against A^{-1} -- computed here independently with float64 A^{-1}.
    previous = torch.zeros(N)
    for j, x in enumerate(iterates):
        r = b - previous @ system["A"].matrix.mT  # the float32 residual the solver forms
        d = inner.solve(system["low"], {"x": r}).value["x"]
        exact = torch.linalg.solve(A64, r.double())
        predicted = rel(d, exact)
        measured = errors[j + 1] / errors[j]
        if errors[j] > 1e-4:  # above float32 rounding of r_j
            assert abs(measured - predicted) <= 0.1 * predicted + 1e-3, (j, measured, predicted)
            assert predicted < 0.1  # 8 CG iterations on kappa 20 plus bf16 rounding
        previous = x
    assert sol.stats.num_hvp == 6 and sol.stats.inner_hvp == 6 * 8  # 5 residuals + the final one
    assert sol.stats.residual_source == "true"
    true_residual = float((b.double() - A64 @ iterates[-1].double()).norm())
    assert float(sol.stats.residual_norm) == pytest.approx(true_residual, rel=1e-2, abs=1e-6)


def test_tolerance_stops_early_with_a_true_residual(system):
    solver = hg.Refinement(inner=hg.CG(maxiter=8, tol=0.0), inner_operator=system["low"], maxiter=20, tol=1e-5)
    sol = solver.solve(system["A"], system["b"])
    assert sol.result is hg.Result.CONVERGED
    assert sol.stats.iterations < 20
    assert sol.stats.num_hvp == sol.stats.iterations  # one residual per correction, no confirming product
    b, x = system["b"]["x"].double(), sol.value["x"].double()
    assert float((b - system["A64"] @ x).norm() / b.norm()) <= 1e-5 * 1.01


def test_fixed_iterations_without_true_residual_is_unchecked(system):
    solver = hg.Refinement(inner=hg.CG(maxiter=3, tol=0.0), inner_operator=system["low"], maxiter=2, tol=0.0,
                           true_residual=False)
    counted = CountingOperator(system["A"])
    sol = solver.solve(counted, system["b"])
    assert counted.calls == 1 == sol.stats.num_hvp  # the residual between the two corrections only
    assert sol.stats.inner_hvp == 6
    assert sol.result is hg.Result.UNCHECKED
    assert not sol.stats.checked


def test_identity_correction_contracts_by_i_minus_a():
    """(CG(2), Identity()): after one residual, d = r, so e_2 = (I - A) e_1: ||e_2|| <= ||I - A|| ||e_1||."""
    g = generator(2)
    H, _ = sym_with_spectrum(torch.linspace(-0.05, 0.3, N, dtype=F64), g)  # A = I + H: like BiSSL's I + H/c
    A64 = torch.eye(N, dtype=F64) + H
    b64 = torch.randn(N, generator=g, dtype=F64)
    x_true = torch.linalg.solve(A64, b64)
    A = hg.MatrixOperator(A64.float(), symmetric=True)
    iterates: list[torch.Tensor] = []
    solver = hg.Refinement(inner=(hg.CG(maxiter=2, tol=0.0), hg.Identity()), inner_operator=hg.low_precision(A),
                           maxiter=2, tol=0.0, true_residual=False)
    sol = solver.solve(A, {"x": b64.float()}, callback=lambda j, x: iterates.append(x["x"].clone()))
    e1, e2 = rel(iterates[0], x_true), rel(iterates[1], x_true)
    assert e2 <= float(torch.linalg.matrix_norm(H, ord=2)) * e1 + 1e-3 * 0.3  # + bf16 rounding of r
    assert e2 < e1
    assert sol.stats.num_hvp == 1 and sol.stats.inner_hvp == 2
    assert sol.result is hg.Result.UNCHECKED  # the Identity correction has no residual


def test_cheap_operator_converges_to_the_full_systems_solution():
    """Lever 2: a perturbed inner operator M; with exact inner solves, e_J = (I - M^-1 A)^J e_0 exactly."""
    g = generator(3)
    n = TREE_SIZE
    A64, _ = sym_with_spectrum(torch.linspace(1.0, 10.0, n, dtype=F64), g)
    P, _ = sym_with_spectrum(torch.linspace(-0.3, 0.3, n, dtype=F64), g)
    M64 = A64 + P @ A64 @ P + P  # another SPD matrix, different eigenvectors
    assert float(torch.linalg.eigvalsh(M64)[0]) > 0
    b64 = torch.randn(n, generator=g, dtype=F64)
    x_true = torch.linalg.solve(A64, b64)
    biased = torch.linalg.solve(M64, b64)
    assert rel(biased, x_true) > 0.05  # solving with M alone is wrong by this much
    G = torch.eye(n, dtype=F64) - torch.linalg.solve(M64, A64)  # the iteration matrix
    A, M = tree_operator(A64), tree_operator(M64)
    J = 12
    iterates: list[torch.Tensor] = []
    solver = hg.Refinement(inner=hg.CG(maxiter=3 * n, tol=0.0), inner_operator=M, maxiter=J, tol=0.0)
    sol = solver.solve(A, unflatten(b64), callback=lambda j, x: iterates.append(flatten(x).clone()))
    e = x_true.clone()
    for x in iterates:
        e = G @ e
        assert float(((x_true - x) - e).norm()) <= 1e-8 * float(x_true.norm())
    rho = float(torch.linalg.eigvals(G).abs().max())
    assert rho < 1
    assert rel(iterates[-1], x_true) <= 2 * rho ** J * 10 + 1e-12
    assert rel(iterates[-1], x_true) < 1e-4 < rel(biased, x_true)
    assert sol.stats.inner_hvp == J * 3 * n and sol.stats.num_hvp == J


@pytest.mark.parametrize("rows, converges", [(32, True), (16, False)])
def test_subsampled_hessian_as_inner_operator(rows, converges):
    """Lever 2 on a Hessian: inner = the Hessian of the first ``rows`` of 64 samples, outer = all 64.

    It converges to the full system's solution exactly when the spectral radius of
    I - M^-1 A (dense, float64) is below 1, and is reported DIVERGED otherwise.
    """
    g = generator(4)
    X = torch.randn(64, 6, generator=g, dtype=F64)
    y = torch.randn(64, generator=g, dtype=F64)
    params = {"w": 0.3 * torch.randn(6, generator=g, dtype=F64), "b": torch.zeros((), dtype=F64)}

    def loss(p, rows=slice(None)):
        pred = torch.tanh(X[rows] @ p["w"] + p["b"])
        return ((pred - y[rows]) ** 2).mean() + 0.05 * (p["w"] ** 2).sum()

    c = 2.0
    A = hg.DampedOperator.bissl_system(hg.HessianOperator(loss, params), 0.0, c)
    M = hg.DampedOperator.bissl_system(hg.HessianOperator(lambda p: loss(p, slice(0, rows)), params), 0.0, c)
    flat = torch.cat([params["w"], params["b"].reshape(1)])
    A64 = torch.eye(7, dtype=F64) + torch.func.hessian(lambda z: loss({"w": z[:6], "b": z[6]}))(flat) / c
    M64 = torch.eye(7, dtype=F64) + torch.func.hessian(
        lambda z: loss({"w": z[:6], "b": z[6]}, slice(0, rows)))(flat) / c
    rho = float(torch.linalg.eigvals(torch.eye(7, dtype=F64) - torch.linalg.solve(M64, A64)).abs().max())
    assert (rho < 1) == converges
    v = {"w": torch.randn(6, generator=g, dtype=F64), "b": torch.ones((), dtype=F64)}
    b64 = torch.cat([v["w"], v["b"].reshape(1)])
    x_true = torch.linalg.solve(A64, b64)
    # MINRES: M may be indefinite (a small sub-batch), and an exact inner solve isolates M's bias.
    solver = hg.Refinement(inner=hg.MINRES(maxiter=7, tol=0.0), inner_operator=M, maxiter=60, tol=1e-12)
    sol = solver.solve(A, v)
    if converges:
        x = torch.cat([sol.value["w"], sol.value["b"].reshape(1)])
        assert sol.result is hg.Result.CONVERGED
        assert rel(x, x_true) < 1e-10
        assert rel(torch.linalg.solve(M64, b64), x_true) > 1e-2  # M alone is biased by this much
    else:
        assert sol.result is hg.Result.DIVERGED


def test_low_precision_hessian_refinement_beats_its_plateau():
    """bf16 products of a Hessian via autocast: refinement reaches float32 accuracy, CG on them does not."""
    g = generator(5)
    X = torch.randn(64, 8, generator=g)
    W1 = torch.randn(8, 16, generator=g) / 3
    params = {"w1": W1, "w2": torch.randn(16, 3, generator=g) / 4}
    labels = torch.randint(0, 3, (64,), generator=g)

    def loss(p):
        return torch.nn.functional.cross_entropy(torch.tanh(X @ p["w1"]) @ p["w2"], labels)

    A = hg.DampedOperator.bissl_system(hg.HessianOperator(loss, params), 0.0, 0.5)
    low = hg.low_precision(A, BF16)
    params64 = {k: t.double() for k, t in params.items()}
    X64 = X.double()
    sizes = [t.numel() for t in params.values()]

    def loss64(z):
        w1, w2 = torch.split(z, sizes)
        return torch.nn.functional.cross_entropy(torch.tanh(X64 @ w1.reshape(8, 16)) @ w2.reshape(16, 3), labels)

    flat = torch.cat([t.reshape(-1) for t in params64.values()])
    A64 = torch.eye(flat.numel(), dtype=F64) + torch.func.hessian(loss64)(flat) / 0.5
    assert float(torch.linalg.eigvalsh(A64)[0]) > 0
    v = {k: torch.randn(t.shape, generator=g) for k, t in params.items()}
    x_true = torch.linalg.solve(A64, torch.cat([t.reshape(-1).double() for t in v.values()]))

    def err(x):
        return rel(torch.cat([t.reshape(-1) for t in x.values()]), x_true)

    u = {k: torch.randn(t.shape, generator=g) for k, t in params.items()}
    product_err = float(sum(((low.mv(u)[k] - A.mv(u)[k]) ** 2).sum() for k in u) ** 0.5
                        / sum((A.mv(u)[k] ** 2).sum() for k in u) ** 0.5)
    assert 1e-5 < product_err < 5e-2  # the autocast products are bf16 products
    plateau = err(hg.CG(maxiter=30, tol=0.0).solve(low, v).value)
    refined = hg.Refinement(inner=hg.CG(maxiter=8, tol=0.0), inner_operator=low, maxiter=5, tol=0.0).solve(A, v)
    assert err(refined.value) < 1e-5 < 1e-4 < plateau


def test_batched_equals_one_by_one(system):
    g = generator(6)
    B = torch.randn(3, N, generator=g)
    # A float32 inner operator: batched and single products then agree to float32 rounding.
    solver = hg.Refinement(inner=hg.CG(maxiter=4, tol=0.0), inner_operator=system["A"], maxiter=3, tol=0.0)
    together = solver.solve(system["A"], {"x": B}, batched=True)
    for i in range(3):
        alone = solver.solve(system["A"], {"x": B[i]})
        assert torch.allclose(together.value["x"][i], alone.value["x"], rtol=1e-4, atol=1e-5)
    assert together.stats.residual_norm.shape == (3,)
    assert together.stats.num_hvp == 3 * 3 and together.stats.inner_hvp == 3 * 3 * 4


def test_fixed_iterations_never_synchronise(system):
    solver = hg.Refinement(inner=(hg.CG(maxiter=2, tol=0.0), hg.Identity()), inner_operator=system["low"],
                           maxiter=3, tol=0.0)
    with no_host_sync():
        solver.solve(system["A"], system["b"])


def test_diverging_corrections_are_reported(system):
    """M = A / 3 gives d = 3 A^-1 r, so e_{j+1} = -2 e_j: the residual grows."""
    A64 = system["A64"]
    M = hg.MatrixOperator((A64 / 3).float(), symmetric=True)
    sol = hg.Refinement(inner=hg.CG(maxiter=2 * N, tol=0.0), inner_operator=M, maxiter=3, tol=0.0).solve(
        system["A"], system["b"])
    assert sol.result is hg.Result.DIVERGED


def test_inner_breakdown_freezes_the_right_hand_side(system):
    M = hg.MatrixOperator(-system["A"].matrix, symmetric=True)  # negative definite: CG breaks down
    sol = hg.Refinement(inner=hg.CG(maxiter=3, tol=0.0), inner_operator=M, maxiter=2, tol=0.0).solve(
        system["A"], system["b"])
    assert bool(sol.stats.breakdown) and sol.result is hg.Result.BREAKDOWN
    assert float(sol.stats.min_curvature) < 0
    assert torch.equal(sol.value["x"], torch.zeros(N))  # the broken correction was not applied


@pytest.mark.parametrize("kwargs, match", [
    ({"inner": "cg"}, "inner must be a hypergrad solver"),
    ({"inner": ()}, "inner must be a hypergrad solver"),
    ({"inner_operator": torch.eye(2)}, "inner_operator must be None"),
    ({"true_residual": 1}, "true_residual must be a bool"),
    ({"maxiter": -1}, "maxiter"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hg.Refinement(**kwargs)


def test_low_precision_rejects_unknown_operators_and_dtypes():
    class Custom(hg.LinearOperator):
        symmetric = True
        positive_definite = False

        def mv(self, x):
            return x

    with pytest.raises(TypeError, match="CastOperator"):
        hg.low_precision(Custom())
    with pytest.raises(ValueError, match=r"bfloat16 or torch\.float16"):
        hg.low_precision(hg.MatrixOperator(torch.eye(2)), torch.float32)
