"""When solvers stop, and what they report when they do: ``atol``, ``check_every``, breakdown.

The truth is a dense residual ``||b - A x_j||`` of the fixed-iteration iterates (``tol=0``), the
BiSSL reference formula of LayerwiseCG (re-implemented in the test), or ``torch.linalg.solve``.
"""

from __future__ import annotations

import math

import pytest
import torch
from core_helpers import F64, generator, spd, sym_with_spectrum

import hypergrad as hg

N = 16


def _system(seed: int = 0):
    g = generator(seed)
    return spd(N, 200.0, g), torch.randn(N, generator=g, dtype=F64)


def _solver(name: str, **kw):
    return {"CG": hg.CG, "MINRES": hg.MINRES, "GMRES": hg.GMRES}[name](**kw)


def _true_residuals(name: str, A, b, up_to: int) -> list[float]:
    """``||b - A x_j||`` for j = 1..up_to, each from a fixed-iteration solve and a dense product."""
    out = []
    for j in range(1, up_to + 1):
        x = _solver(name, maxiter=j, tol=0.0).solve(hg.MatrixOperator(A), {"x": b}).value["x"]
        out.append(float((b - A @ x).norm()))
    return out


def _threshold_after(residuals: list[float], at_least: int, avoid_multiple_of: int = 0) -> tuple[int, float]:
    """``(j, threshold)``: the first iterate j >= at_least whose residual is clearly (x0.8) below
    every earlier one, and a threshold halfway (geometrically) between, so that j is the first
    iterate within it with a margin far above rounding."""
    for j in range(at_least, len(residuals) + 1):
        if avoid_multiple_of and j % avoid_multiple_of == 0:
            continue
        before = min(residuals[: j - 1])
        if residuals[j - 1] < 0.8 * before:
            return j, math.sqrt(residuals[j - 1] * before)
    raise AssertionError("no clear residual drop: change the test system")


@pytest.mark.parametrize("name", ["CG", "MINRES", "GMRES"])
def test_atol_alone_stops_the_solve(name):
    """tol = 0, atol > 0: stop at the first iterate whose residual is within atol."""
    A, b = _system()
    first, atol = _threshold_after(_true_residuals(name, A, b, N), 4)
    sol = _solver(name, maxiter=50, tol=0.0, atol=atol).solve(hg.MatrixOperator(A), {"x": b})
    assert sol.stats.iterations == first
    assert float(sol.stats.threshold) == pytest.approx(atol, rel=1e-15)
    assert sol.result is hg.Result.CONVERGED


@pytest.mark.parametrize("name", ["CG", "MINRES", "GMRES"])
def test_threshold_is_the_larger_of_tol_and_atol(name):
    A, b = _system(1)
    first, atol = _threshold_after(_true_residuals(name, A, b, N), 5)
    tol = 1e-3 * atol / float(b.norm())  # the relative threshold alone would run much longer
    sol = _solver(name, maxiter=50, tol=tol, atol=atol).solve(hg.MatrixOperator(A), {"x": b})
    assert float(sol.stats.threshold) == pytest.approx(max(tol * float(b.norm()), atol), rel=1e-15)
    assert sol.stats.iterations == first


@pytest.mark.parametrize("name", ["CG", "MINRES", "GMRES"])
@pytest.mark.parametrize("every", [3, 4])
def test_check_every_checks_only_on_its_interval(name, every):
    """The solve stops at the first multiple of ``check_every`` whose residual is within the threshold."""
    A, b = _system(2)
    # first is not a multiple of every: an every-iteration check would stop earlier.
    residuals = _true_residuals(name, A, b, N)
    first, threshold = _threshold_after(residuals, 4, avoid_multiple_of=every)
    tol = threshold / float(b.norm())
    expected = next(j for j in range(every, N + 1, every) if residuals[j - 1] <= threshold)
    assert expected > first
    sol = _solver(name, maxiter=50, tol=tol, check_every=every).solve(hg.MatrixOperator(A), {"x": b})
    assert sol.stats.iterations == expected
    assert sol.result is hg.Result.CONVERGED


# --- breakdown ---------------------------------------------------------------------------

def test_converged_is_false_after_a_breakdown_even_with_a_small_residual():
    """on_breakdown='continue': CG meets negative curvature yet reaches a tiny residual; the
    solve is still not 'converged' (the operator is not what CG assumes)."""
    g = generator(3)
    ev = torch.cat([torch.tensor([-1.5], dtype=F64), torch.linspace(0.5, 3.0, 9, dtype=F64)])
    A, Q = sym_with_spectrum(ev, g)
    b = torch.randn(10, generator=g, dtype=F64) + 3.0 * Q[:, 0]
    sol = hg.CG(maxiter=40, tol=1e-10, on_breakdown="continue").solve(hg.MatrixOperator(A), {"x": b})
    assert float((b - A @ sol.value["x"]).norm()) <= 1e-10 * float(b.norm())  # the residual is small
    assert bool(sol.stats.breakdown)
    assert not bool(sol.stats.converged)
    assert sol.result is hg.Result.BREAKDOWN


def _reference_layerwise_until_breakdown(A: torch.Tensor, b: dict[str, torch.Tensor], sizes: dict[str, int],
                                         iterations: int):
    """The reference per-tensor CG; returns (iterate before the first step whose per-tensor
    denominator d_l.(Ad)_l is <= 0, that step's 1-based index) or (final iterate, None)."""
    keys = list(sizes)

    def flat(t):
        return torch.cat([t[k] for k in keys])

    def split(v):
        return dict(zip(keys, torch.split(v, [sizes[k] for k in keys]), strict=True))

    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    d = {k: v.clone() for k, v in b.items()}
    for step in range(1, iterations + 1):
        Ad = split(A @ flat(d))
        if any(float(d[k] @ Ad[k]) <= 0 for k in keys):
            return x, step
        for k in keys:
            rr = r[k] @ r[k]
            alpha = rr / (d[k] @ Ad[k])
            x[k] = x[k] + alpha * d[k]
            r[k] = r[k] - alpha * Ad[k]
            d[k] = r[k] + (r[k] @ r[k]) / rr * d[k]
    return x, None


def test_layerwise_cg_stop_freezes_the_right_hand_side_at_the_breakdown():
    """A coupled indefinite operator: the iterate is frozen where the reference formula first
    meets a non-positive per-tensor denominator (step >= 2, so a real iterate), per right-hand side."""
    sizes = {"a": 3, "b": 4}
    g = generator(12)
    ev = torch.cat([torch.tensor([-0.4], dtype=F64), torch.linspace(0.5, 3.0, 6, dtype=F64)])
    A, _ = sym_with_spectrum(ev, g)
    b1 = {"a": torch.randn(3, generator=g, dtype=F64), "b": torch.randn(4, generator=g, dtype=F64)}
    frozen, step = _reference_layerwise_until_breakdown(A, b1, sizes, 30)
    assert step is not None and step >= 2  # a real iterate gets frozen, not the zero start

    def mv(x):
        y = A @ torch.cat([x["a"], x["b"]], dim=-1).unsqueeze(-1)
        return {"a": y[..., :3, 0], "b": y[..., 3:, 0]}

    op = hg.FunctionOperator(lambda x: {k: v[0] for k, v in mv({k: t.unsqueeze(0) for k, t in x.items()}).items()},
                             symmetric=True, batched_fn=mv)
    sol = hg.LayerwiseCG(maxiter=30, tol=1e-12, on_breakdown="stop").solve(op, b1)
    assert bool(sol.stats.breakdown)
    for k in sizes:
        assert torch.allclose(sol.value[k], frozen[k], rtol=1e-10, atol=1e-12), k
    # Batched with a second right-hand side that breaks down later: each is frozen at its own step.
    v = torch.randn(7, generator=generator(102), dtype=F64)
    b2 = {"a": v[:3], "b": v[3:]}
    frozen2, step2 = _reference_layerwise_until_breakdown(A, b2, sizes, 30)
    assert step2 is not None and step2 > step + 1
    batched = {k: torch.stack([b1[k], b2[k]]) for k in sizes}
    sol2 = hg.LayerwiseCG(maxiter=30, tol=1e-12, on_breakdown="stop").solve(op, batched, batched=True)
    assert sol2.stats.breakdown.tolist() == [True, True]
    for k in sizes:
        assert torch.allclose(sol2.value[k][0], frozen[k], rtol=1e-10, atol=1e-12), k
        assert torch.allclose(sol2.value[k][1], frozen2[k], rtol=1e-10, atol=1e-12), k
