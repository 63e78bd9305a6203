"""Fixed-iteration solves never wait for the device: every tensor -> Python conversion is
patched to raise around ``solver.solve(...)`` (stats are read after unpatching)."""

from __future__ import annotations

import pytest
import torch
from core_helpers import (
    F64,
    TREE_SHAPES,
    TREE_SIZE,
    HostSyncError,
    generator,
    no_host_sync,
    spd,
    tree_operator,
    unflatten,
)

import hypergrad as hg

FIXED = {
    "CG-tol0": hg.CG(maxiter=6, tol=0.0),
    "CG-nocheck": hg.CG(maxiter=6, tol=1e-6, check_every=None),
    "LayerwiseCG": hg.LayerwiseCG(maxiter=6, tol=0.0),
    "MINRES": hg.MINRES(maxiter=6, tol=0.0),
    "Neumann": hg.Neumann(alpha=0.05, maxiter=6, check_every=None),
}


def test_guard_catches_every_conversion():
    """Control: the guard trips on each patched method and restores them afterwards."""
    t = torch.tensor([1.5])
    for convert in (lambda: t.item(), lambda: bool(t), lambda: float(t), lambda: int(t), lambda: t.tolist(),
                    lambda: 1 if t > 0 else 0, lambda: t.cpu(), lambda: t.numpy(), lambda: t.nonzero(),
                    lambda: torch.nonzero(t), lambda: t.argwhere(), lambda: torch.argwhere(t)):
        with no_host_sync(), pytest.raises(HostSyncError):
            convert()
    assert t.item() == 1.5 and bool(t) and t.tolist() == [1.5]
    assert t.cpu() is t and t.numpy().tolist() == [1.5] and torch.nonzero(t).tolist() == [[0]]


@pytest.mark.parametrize("name", sorted(FIXED))
@pytest.mark.parametrize("batched", [False, True])
def test_fixed_iteration_solve_on_a_tree_does_not_sync(name, batched):
    A = spd(TREE_SIZE, 20.0, generator(0))
    shape = (3, TREE_SIZE) if batched else (TREE_SIZE,)
    b = unflatten(torch.randn(shape, generator=generator(1), dtype=F64), TREE_SHAPES)
    x0 = unflatten(torch.randn(shape, generator=generator(2), dtype=F64), TREE_SHAPES)
    op = tree_operator(A)
    with no_host_sync():
        sol = FIXED[name].solve(op, b, batched=batched)
        sol_x0 = FIXED[name].solve(op, b, x0, batched=batched)
    assert sol.stats.iterations == 6 and sol_x0.stats.iterations == 6
    assert sol.stats.residual_history.shape[0] == 7


def test_preconditioned_cg_does_not_sync():
    A = spd(TREE_SIZE, 1e3, generator(3))
    like = unflatten(torch.zeros(TREE_SIZE, dtype=F64), TREE_SHAPES)
    P = hg.NystromPreconditioner.build(tree_operator(A), like, 5, generator=generator(4))  # build may sync
    b = unflatten(torch.randn(TREE_SIZE, generator=generator(5), dtype=F64), TREE_SHAPES)
    with no_host_sync():
        sol = hg.CG(maxiter=5, tol=0.0, preconditioner=P).solve(tree_operator(A), b)
    assert sol.stats.iterations == 5


@pytest.mark.parametrize("name", sorted(FIXED))
def test_hessian_operator_reverse_path_does_not_sync(name):
    g = generator(6)
    X = torch.randn(12, 3, generator=g, dtype=F64)
    y = torch.randn(12, 2, generator=g, dtype=F64)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(F64)
    fwd = hg.functional(net)
    params = {k: v.detach() for k, v in net.named_parameters()}
    op = hg.HessianOperator(lambda p: ((fwd(p, X) - y) ** 2).mean(), params, method="reverse")
    b = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    with no_host_sync():
        sol = FIXED[name].solve(op, b)  # the first product builds the gradient graph inside
    assert sol.stats.iterations == 6


@pytest.mark.parametrize("solver", [hg.CG(maxiter=6, tol=1e-6, check_every=1), hg.MINRES(maxiter=6, tol=1e-6),
                                    hg.CG(maxiter=6, tol=0.0, on_nonfinite="raise")],
                         ids=["CG-check", "MINRES-check", "CG-raise-policy"])
def test_checking_solve_trips_the_guard(solver):
    """Positive control: a tolerance check (or a raise policy) must synchronise."""
    A = spd(TREE_SIZE, 20.0, generator(7))
    b = unflatten(torch.randn(TREE_SIZE, generator=generator(8), dtype=F64), TREE_SHAPES)
    with no_host_sync(), pytest.raises(HostSyncError):
        solver.solve(tree_operator(A), b)


_HOST_TRANSFERS = {
    "cpu": lambda r: r.cpu(),
    "numpy": lambda r: torch.from_numpy(r.numpy()),
    "torch.nonzero": lambda r: r + 0 * torch.nonzero(r).sum(),
    "Tensor.nonzero": lambda r: r + 0 * r.nonzero().sum(),
}


@pytest.mark.parametrize("transfer", sorted(_HOST_TRANSFERS))
@pytest.mark.parametrize("name", sorted(FIXED))
def test_a_host_transfer_inside_the_solver_loop_trips_the_guard(transfer, name):
    """Positive control: an operator that copies to the host (or reads a value-dependent shape)
    inside a fixed-iteration solve is caught, although no Python number is ever produced."""
    A = spd(TREE_SIZE, 20.0, generator(11))
    b = unflatten(torch.randn(TREE_SIZE, generator=generator(12), dtype=F64), TREE_SHAPES)
    op = tree_operator(A)
    leaky = hg.FunctionOperator(lambda x: {k: _HOST_TRANSFERS[transfer](v) for k, v in op.mv(x).items()},
                                symmetric=True)
    FIXED[name].solve(leaky, b)  # runs fine outside the guard
    with no_host_sync(), pytest.raises(HostSyncError):
        FIXED[name].solve(leaky, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_iteration_solve_has_no_cuda_sync(name):
    device = torch.device("cuda")
    A = spd(TREE_SIZE, 20.0, generator(9)).to(device)
    b = unflatten(torch.randn(2, TREE_SIZE, generator=generator(10), dtype=F64).to(device), TREE_SHAPES)
    op = tree_operator(A)
    FIXED[name].solve(op, b, batched=True)  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sol = FIXED[name].solve(op, b, batched=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sol.stats.iterations == 6
