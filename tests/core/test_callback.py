"""``Solver.solve(callback=...)``: the iterates it shows are the solver's, checked against
hand-written float64 recurrences on a dense SPD matrix."""

from __future__ import annotations

import pytest
import torch

import hypergrad as hg


def spd(n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.linspace(1.0, 30.0, n, dtype=torch.float64)) @ Q.T


def textbook_cg_iterates(A: torch.Tensor, b: torch.Tensor, k: int) -> list[torch.Tensor]:
    x, r = torch.zeros_like(b), b.clone()
    d, out = r.clone(), []
    for _ in range(k):
        ad = A @ d
        alpha = (r @ r) / (d @ ad)
        x = x + alpha * d
        r_new = r - alpha * ad
        d = r_new + (r_new @ r_new) / (r @ r) * d
        r = r_new
        out.append(x)
    return out


def neumann_iterates(A: torch.Tensor, b: torch.Tensor, alpha: float, k: int) -> list[torch.Tensor]:
    x, out = torch.zeros_like(b), []
    for _ in range(k):
        x = x + alpha * (b - A @ x)
        out.append(x)
    return out


def watch(solver: hg.Solver, A: torch.Tensor, b: torch.Tensor, **kw) -> tuple[list[int], list[torch.Tensor], hg.Solution]:
    seen: list[tuple[int, torch.Tensor]] = []
    sol = solver.solve(hg.MatrixOperator(A), {"x": b}, callback=lambda i, x: seen.append((i, x["x"].clone())), **kw)
    return [i for i, _ in seen], [x for _, x in seen], sol


def test_cg_callback_sees_every_textbook_iterate():
    A, b = spd(), torch.ones(12, dtype=torch.float64)
    its, xs, sol = watch(hg.CG(maxiter=6, tol=0.0), A, b)
    assert its == [1, 2, 3, 4, 5, 6]
    for x, expected in zip(xs, textbook_cg_iterates(A, b, 6), strict=True):
        torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xs[-1], sol.value["x"], rtol=0, atol=0)


def test_neumann_callback_sees_every_iterate():
    A, b = spd(), torch.ones(12, dtype=torch.float64)
    its, xs, _ = watch(hg.Neumann(maxiter=4, tol=0.0, alpha=0.03), A, b)
    assert its == [1, 2, 3, 4]
    for x, expected in zip(xs, neumann_iterates(A, b, 0.03, 4), strict=True):
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-14)


def test_callback_stops_with_the_solver():
    A, b = spd(), torch.ones(12, dtype=torch.float64)
    its, _, sol = watch(hg.CG(maxiter=100, tol=1e-10), A, b)
    assert its == list(range(1, sol.stats.iterations + 1))
    assert sol.stats.iterations < 100


def test_batched_callback_sees_stacked_iterates():
    A = spd()
    B = torch.stack([torch.ones(12, dtype=torch.float64), torch.arange(12, dtype=torch.float64)])
    seen = []
    hg.CG(maxiter=3, tol=0.0).solve(hg.MatrixOperator(A), {"x": B}, batched=True,
                                    callback=lambda i, x: seen.append(x["x"].clone()))
    assert seen[-1].shape == (2, 12)
    torch.testing.assert_close(seen[-1][1], textbook_cg_iterates(A, B[1], 3)[-1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", [hg.MINRES(maxiter=3, tol=0.0), hg.LayerwiseCG(maxiter=3, tol=0.0)])
def test_other_solvers_report_their_final_iterate(solver):
    A, b = spd(), torch.ones(12, dtype=torch.float64)
    its, xs, sol = watch(solver, A, b)
    assert its == [1, 2, 3]
    torch.testing.assert_close(xs[-1], sol.value["x"], rtol=0, atol=0)


def test_gmres_refuses_a_callback():
    with pytest.raises(ValueError, match="GMRES does not form its iterate"):
        hg.GMRES(maxiter=3).solve(hg.MatrixOperator(spd()), {"x": torch.ones(12, dtype=torch.float64)},
                                  callback=lambda i, x: None)
