"""Krylov recycling (issue 20, lever 3): KrylovRecycler and RecycledCG against dense float64 truths.

The Galerkin guess is compared with the dense formula ``Q (Q^T A Q)^-1 Q^T b`` for an orthonormal
basis ``Q`` of the recorded directions (``torch.linalg.qr``), the basis with its own definition
(orthonormal rows, ``AU = U A``, ``E = U A U^T``), and the exact-subspace case with the
eigenvectors of ``A``.
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

N = TREE_SIZE
LIKE = unflatten(torch.zeros(N, dtype=F64))


class Recorder(hg.LinearOperator):
    """Keeps the flat inputs of every product (written here, independently of the library)."""

    symmetric = True
    positive_definite = True

    def __init__(self, base: hg.LinearOperator) -> None:
        self.base, self.inputs = base, []

    def mv(self, x):
        return {k: v[0] for k, v in self.matmat({k: v.unsqueeze(0) for k, v in x.items()}).items()}

    def matmat(self, X):
        self.inputs.append(flatten(X).reshape(-1, N))
        return self.base.matmat(X)


@pytest.fixture(scope="module")
def system():
    g = generator(0)
    lam = torch.logspace(0, 2, N, dtype=F64)
    A64, Q = sym_with_spectrum(lam, g)
    return {"A64": A64, "Q": Q, "lam": lam, "A": tree_operator(A64)}


def dense_galerkin(A64: torch.Tensor, directions: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(directions.T)  # (n, m), orthonormal columns spanning the directions
    return Q @ torch.linalg.solve(Q.T @ A64 @ Q, Q.T @ b)


def check_basis(recycler: hg.KrylovRecycler, A64: torch.Tensor, tol: float) -> None:
    U = recycler.U[: recycler.filled].double()
    active = recycler.active[: recycler.filled].double()
    assert torch.allclose(U @ U.T, torch.diag(active), atol=tol)
    assert torch.allclose(recycler.AU[: recycler.filled].double(), U @ A64, atol=tol * float(A64.norm()))
    E = recycler.E[: recycler.filled, : recycler.filled]
    assert torch.allclose(E, U @ A64 @ U.T, atol=tol * float(A64.norm()))


def test_galerkin_guess_equals_the_dense_projection(system):
    A64, g = system["A64"], generator(1)
    recycler = hg.KrylovRecycler(LIKE, capacity=12)
    recorder = Recorder(system["A"])
    counted = CountingOperator(recorder)
    solver = hg.RecycledCG(recycler=recycler, maxiter=3, tol=0.0)
    base = torch.randn(N, generator=g, dtype=F64)
    for _ in range(4):
        b = base + 0.5 * torch.randn(N, generator=g, dtype=F64)
        x = torch.linalg.solve(A64, b)
        directions = torch.cat(recorder.inputs)[-12:] if recorder.inputs else None
        calls = counted.calls
        sol = solver.solve(counted, unflatten(b))
        assert counted.calls - calls == 3 == sol.stats.num_hvp  # the guess costs no product
        if directions is None:
            assert float(sol.stats.residual_history[0]) == pytest.approx(float(b.norm()))
            continue
        guess = dense_galerkin(A64, directions, b)
        r0 = float((b - A64 @ guess).norm())
        assert float(sol.stats.residual_history[0]) == pytest.approx(r0, rel=1e-8)
        # The guess minimises the A-norm error over the span: never worse than x0 = 0.
        err_a = float((x - guess) @ A64 @ (x - guess))
        assert err_a <= float(x @ A64 @ x)
    check_basis(recycler, A64, 1e-10)


def test_exact_invariant_subspace_gives_the_exact_solution_there(system):
    A64, Q, g = system["A64"], system["Q"], generator(2)
    recycler = hg.KrylovRecycler(LIKE, capacity=8)
    top = Q[:, -5:].T  # 5 eigenvectors (largest eigenvalues), mixed so that they are not orthonormal
    W = torch.randn(5, 5, generator=g, dtype=F64) @ top
    recycler.add(unflatten(W), unflatten(W @ A64))
    b = torch.randn(N, generator=g, dtype=F64)
    x = torch.linalg.solve(A64, b)
    X0, AX0 = recycler.galerkin(unflatten(b.unsqueeze(0)))
    x0, ax0 = flatten(X0)[0], flatten(AX0)[0]
    assert torch.allclose(top @ x0, top @ x, atol=1e-12 * float(x.norm()))  # exact on the subspace
    assert torch.allclose(ax0, A64 @ x0, atol=1e-12 * float(b.norm()))
    assert float((top @ (b - A64 @ x0)).abs().max()) < 1e-12 * float(b.norm())  # residual orthogonal to it
    b_in = top.T @ torch.randn(5, generator=g, dtype=F64)  # b in the subspace: the guess is the solution
    X0, _ = recycler.galerkin(unflatten(b_in.unsqueeze(0)))
    assert torch.allclose(flatten(X0)[0], torch.linalg.solve(A64, b_in), atol=1e-12 * float(b_in.norm()))


def test_deflation_maps_the_recycled_eigenvalues_to_one(system):
    """P^-1 A (dense, column by column) has eigenvalue 1 on span U and the remaining lam unchanged."""
    A64, Q, lam = system["A64"], system["Q"], system["lam"]
    recycler = hg.KrylovRecycler(LIKE, capacity=8)
    top = Q[:, -4:].T
    recycler.add(unflatten(top), unflatten(top @ A64))
    apply = recycler.preconditioner()
    P_inv = torch.stack([flatten(apply(unflatten(col.unsqueeze(0))))[0] for col in torch.eye(N, dtype=F64)], 1)
    assert torch.allclose(P_inv, P_inv.T, atol=1e-12)
    eig = torch.linalg.eigvals(P_inv @ A64).real.sort().values
    expected = torch.cat([lam[:-4], torch.ones(4, dtype=F64)]).sort().values
    assert torch.allclose(eig, expected, atol=1e-9 * float(lam.max()))
    # Deflated CG converges like CG on the remaining spectrum (kappa lam[-5]/lam[0], not lam[-1]/lam[0]).
    b = torch.randn(N, generator=generator(3), dtype=F64)
    x = torch.linalg.solve(A64, b)
    k = 6
    plain = flatten(hg.CG(maxiter=k, tol=0.0).solve(system["A"], unflatten(b)).value)
    recycler.operator = system["A"]
    deflated = flatten(hg.RecycledCG(recycler=recycler, maxiter=k, tol=0.0, deflate=True, update=False)
                       .solve(system["A"], unflatten(b)).value)
    kappa = float(lam[-5] / lam[0])
    rho = (kappa**0.5 - 1) / (kappa**0.5 + 1)
    assert float((deflated - x).norm() / x.norm()) <= 2 * kappa**0.5 * rho**k
    assert float((deflated - x).norm()) < float((plain - x).norm())


def test_capacity_wraps_keeping_an_orthonormal_basis(system):
    A64, g = system["A64"], generator(4)
    recycler = hg.KrylovRecycler(LIKE, capacity=6)
    batches = [torch.randn(4, N, generator=g, dtype=F64) for _ in range(3)]
    for W in batches:
        recycler.add(unflatten(W), unflatten(W @ A64))
        check_basis(recycler, A64, 1e-10)
    assert recycler.filled == 6 and int(recycler.size) == 6
    # The newest batch is always held whole; older slots were overwritten. The basis lies in the span
    # of everything added, and the guess is the dense Galerkin projection onto the rows it holds.
    U = recycler.U.double()
    newest = batches[2]
    assert torch.allclose(newest @ U.T @ U, newest, atol=1e-10 * float(newest.norm()))
    everything = torch.cat(batches)
    Q, _ = torch.linalg.qr(everything.T)
    assert torch.allclose(U @ Q @ Q.T, U, atol=1e-10)
    b = torch.randn(N, generator=g, dtype=F64)
    X0, _ = recycler.galerkin(unflatten(b.unsqueeze(0)))
    assert torch.allclose(flatten(X0)[0], dense_galerkin(A64, U, b), atol=1e-9 * float(b.norm()))


def test_dependent_directions_are_dropped(system):
    A64, g = system["A64"], generator(9)
    recycler = hg.KrylovRecycler(LIKE, capacity=12)
    W = torch.randn(4, N, generator=g, dtype=F64)
    recycler.add(unflatten(W), unflatten(W @ A64))
    before = recycler.U.clone()
    mixed = torch.randn(3, 4, generator=g, dtype=F64) @ W  # in the span already
    recycler.add(unflatten(mixed), unflatten(mixed @ A64))
    assert recycler.filled == 7 and int(recycler.size) == 4
    assert torch.equal(recycler.U[:4], before[:4]) and float(recycler.U[4:7].abs().max()) == 0.0
    check_basis(recycler, A64, 1e-10)


def test_float32_leaves_keep_a_float32_basis(system):
    like = {k: v.float() for k, v in LIKE.items()}
    recycler = hg.KrylovRecycler(like, capacity=9)
    A32 = hg.FunctionOperator(lambda x: unflatten(system["A64"].float() @ flatten(x)), symmetric=True,
                              batched_fn=lambda X: unflatten(flatten(X) @ system["A64"].float().T))
    solver = hg.RecycledCG(recycler=recycler, maxiter=3, tol=0.0)
    g = generator(5)
    for _ in range(3):
        solver.solve(A32, unflatten(torch.randn(N, generator=g)))
    assert recycler.U.dtype == torch.float32
    check_basis(recycler, system["A64"], 1e-5)


def test_later_solves_start_closer(system):
    """Right-hand sides that share a component (BiSSL's v_k): the initial residual falls solve by solve."""
    A64, g = system["A64"], generator(6)
    base = torch.randn(N, generator=g, dtype=F64)
    rhs = [base + 0.1 * torch.randn(N, generator=g, dtype=F64) for _ in range(5)]
    recycler = hg.KrylovRecycler(LIKE, capacity=20)
    solver = hg.RecycledCG(recycler=recycler, maxiter=3, tol=0.0)
    starts, errors, plain = [], [], []
    for b in rhs:
        x = torch.linalg.solve(A64, b)
        sol = solver.solve(system["A"], unflatten(b))
        starts.append(float(sol.stats.residual_history[0] / b.norm()))
        errors.append(float((flatten(sol.value) - x).norm() / x.norm()))
        plain.append(float((flatten(hg.CG(maxiter=3, tol=0.0).solve(system["A"], unflatten(b)).value) - x).norm()
                           / x.norm()))
    assert starts[0] == pytest.approx(1.0)
    assert all(later < 0.5 for later in starts[2:])
    assert all(e < p for e, p in zip(errors[1:], plain[1:], strict=True))


def test_fixed_iterations_never_synchronise(system):
    recycler = hg.KrylovRecycler(LIKE, capacity=8)
    solver = hg.RecycledCG(recycler=recycler, maxiter=3, tol=0.0, deflate=True)
    g = generator(7)
    with no_host_sync():
        for _ in range(4):
            solver.solve(system["A"], unflatten(torch.randn(N, generator=g, dtype=F64)))


def test_batched_solves_add_every_direction(system):
    recycler = hg.KrylovRecycler(LIKE, capacity=32)
    B = torch.randn(3, N, generator=generator(8), dtype=F64)
    sol = hg.RecycledCG(recycler=recycler, maxiter=2, tol=0.0).solve(system["A"], unflatten(B), batched=True)
    assert sol.stats.num_hvp == 6 and recycler.filled == 6 and int(recycler.size) == 6


def test_operator_binding_and_reset(system):
    recycler = hg.KrylovRecycler(LIKE, capacity=8)
    solver = hg.RecycledCG(recycler=recycler, maxiter=2, tol=0.0)
    b = unflatten(torch.ones(N, dtype=F64))
    solver.solve(system["A"], b)
    with pytest.raises(ValueError, match="another operator"):
        solver.solve(tree_operator(system["A64"]), b)
    recycler.reset()
    assert recycler.filled == 0 and int(recycler.size) == 0
    solver.solve(tree_operator(system["A64"]), b)


@pytest.mark.parametrize("kwargs, match", [
    ({"capacity": 0}, "capacity"),
    ({"drop_tol": 0.0}, "drop_tol"),
    ({"rcond": 1.5}, "rcond"),
])
def test_recycler_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hg.KrylovRecycler(LIKE, **kwargs)


def test_recycled_cg_validation():
    with pytest.raises(ValueError, match="KrylovRecycler"):
        hg.RecycledCG()
    with pytest.raises(ValueError, match="deflate"):
        hg.RecycledCG(recycler=hg.KrylovRecycler(LIKE), deflate=True, preconditioner=lambda r: r)
