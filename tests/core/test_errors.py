"""Bad inputs raise the documented typed errors; non-finite values are reported, never hidden."""

from __future__ import annotations

import math

import pytest
import torch
from core_helpers import F64, generator, spd

import hypergrad as hg


def _quad(p):
    return (p["w"] ** 2).sum() + (p["b"] ** 4).sum()


PARAMS = {"w": torch.ones(3, dtype=F64), "b": torch.ones(2, dtype=F64)}


@pytest.mark.parametrize("method", ["reverse", "forward", "finite_difference"])
def test_tree_mismatch_keys_shapes_dtypes(method):
    with pytest.raises(hg.TreeMismatchError, match=r"missing \['b'\].*unexpected \['c'\]"):
        hg.hvp(_quad, PARAMS, {"w": torch.ones(3, dtype=F64), "c": torch.ones(2, dtype=F64)}, method=method)
    with pytest.raises(hg.TreeMismatchError, match=r"\['b'\].*shape \(3,\)"):
        hg.hvp(_quad, PARAMS, {"w": torch.ones(3, dtype=F64), "b": torch.ones(3, dtype=F64)}, method=method)
    with pytest.raises(hg.TreeMismatchError, match=r"\['w'\].*float32"):
        hg.hvp(_quad, PARAMS, {"w": torch.ones(3), "b": torch.ones(2, dtype=F64)}, method=method)
    with pytest.raises(hg.TreeMismatchError, match=r"\['b'\].*shape"):
        hg.hvp_batched(_quad, PARAMS, {"w": torch.ones(2, 3, dtype=F64), "b": torch.ones(2, dtype=F64)},
                       method=method)


def test_tree_mismatch_error_is_a_value_error():
    assert issubclass(hg.TreeMismatchError, ValueError)
    assert issubclass(hg.TreeMismatchError, hg.HypergradError)


@pytest.mark.parametrize("solver", [hg.CG(), hg.MINRES(), hg.Neumann(), hg.LayerwiseCG()],
                         ids=["CG", "MINRES", "Neumann", "LayerwiseCG"])
def test_x0_mismatch(solver):
    op = hg.MatrixOperator(torch.eye(4, dtype=F64))
    b = {"x": torch.ones(4, dtype=F64)}
    with pytest.raises(hg.TreeMismatchError, match=r"x0.*\['x'\].*shape"):
        solver.solve(op, b, {"x": torch.ones(5, dtype=F64)})
    with pytest.raises(hg.TreeMismatchError, match=r"x0.*\['x'\].*dtype"):
        solver.solve(op, b, {"x": torch.ones(4)})
    with pytest.raises(hg.TreeMismatchError, match=r"missing \['x'\]"):
        solver.solve(op, b, {"y": torch.ones(4, dtype=F64)})


def test_implicit_grad_x0_and_tree_checks():
    lower = lambda i, o: ((i["w"] - o["t"]) ** 2).sum()  # noqa: E731
    upper = lambda i, o: (i["w"] ** 2).sum()  # noqa: E731
    inner, outer = {"w": torch.zeros(3, dtype=F64)}, {"t": torch.zeros(3, dtype=F64)}
    with pytest.raises(hg.TreeMismatchError, match=r"x0.*\['w'\]"):
        hg.implicit_grad(lower, upper, inner, outer, x0={"w": torch.zeros(4, dtype=F64)})
    with pytest.raises(hg.TreeMismatchError, match="inner"):
        hg.implicit_grad(lower, upper, {}, outer)
    with pytest.raises(hg.TreeMismatchError, match=r"outer\['t'\]"):
        hg.implicit_grad(lower, upper, inner, {"t": [1.0, 2.0]})


@pytest.mark.parametrize("solver_cls", [hg.CG, hg.MINRES, hg.LayerwiseCG])
def test_non_symmetric_operator_rejected(solver_cls):
    A = torch.eye(4, dtype=F64)
    A[0, 1] = 0.5
    b = {"x": torch.ones(4, dtype=F64)}
    op = hg.MatrixOperator(A)
    assert op.symmetric is False
    with pytest.raises(hg.OperatorTagError, match="symmetric"):
        solver_cls().solve(op, b)
    with pytest.raises(hg.OperatorTagError, match="Neumann"):
        solver_cls().solve(hg.FunctionOperator(lambda x: x), b)  # symmetric defaults to False
    # Neumann accepts it.
    assert hg.Neumann(alpha=0.5, maxiter=200, tol=1e-12).solve(op, b).result is hg.Result.CONVERGED


def test_fixed_point_grad_with_cg_needs_symmetric_flag():
    T = lambda i, o: {"w": 0.5 * i["w"] + o["t"]}  # noqa: E731
    upper = lambda i, o: (i["w"] ** 2).sum()  # noqa: E731
    inner, outer = {"w": torch.full((2,), 2.0, dtype=F64)}, {"t": torch.ones(2, dtype=F64)}
    with pytest.raises(hg.OperatorTagError):
        hg.fixed_point_grad(T, upper, inner, outer, solver=hg.CG())
    # Truth: w* = 2 t, F = ||w*||^2, dF/dt = 8 t.
    g, _ = hg.fixed_point_grad(T, upper, inner, outer, solver=hg.CG(tol=1e-12), symmetric=True)
    assert torch.allclose(g["t"], 8 * outer["t"], rtol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: hg.CG(maxiter=-1),
        lambda: hg.CG(maxiter=2.5),
        lambda: hg.CG(maxiter=True),
        lambda: hg.MINRES(tol=-1e-3),
        lambda: hg.LayerwiseCG(atol=-1.0),
        lambda: hg.CG(tol=math.nan),
        lambda: hg.CG(check_every=0),
        lambda: hg.CG(on_breakdown="ignore"),
        lambda: hg.CG(on_nonfinite="zero"),
        lambda: hg.Neumann(alpha=0.0),
        lambda: hg.Neumann(alpha=-1.0),
    ],
    ids=["maxiter<0", "maxiter-float", "maxiter-bool", "tol<0", "atol<0", "tol-nan", "check_every=0",
         "on_breakdown", "on_nonfinite", "alpha=0", "alpha<0"],
)
def test_invalid_solver_config(make):
    with pytest.raises(ValueError):
        make()


def test_invalid_solver_config_message_names_the_argument():
    with pytest.raises(ValueError, match=r"maxiter.*-1"):
        hg.CG(maxiter=-1)
    with pytest.raises(ValueError, match=r"on_breakdown.*'ignore'"):
        hg.CG(on_breakdown="ignore")


def test_other_invalid_arguments():
    with pytest.raises(ValueError, match="method"):
        hg.HessianOperator(_quad, PARAMS, method="backward")
    with pytest.raises(ValueError, match="method"):
        hg.hvp(_quad, PARAMS, PARAMS, method="backward")
    with pytest.raises(ValueError, match="square"):
        hg.MatrixOperator(torch.ones(2, 3))
    with pytest.raises(TypeError, match="LinearOperator"):
        hg.CG().solve(lambda x: x, {"x": torch.ones(2)})
    with pytest.raises(ValueError, match="damping"):
        hg.implicit_grad(lambda i, o: (i["w"] ** 2).sum(), lambda i, o: (i["w"] ** 2).sum(),
                         {"w": torch.ones(2)}, {"o": torch.ones(1)}, damping=-1.0)


def test_non_scalar_loss():
    with pytest.raises(TypeError, match="scalar"):
        hg.hvp(lambda p: p["w"] ** 2, PARAMS, PARAMS)
    with pytest.raises(TypeError, match="scalar"):
        hg.HessianOperator(lambda p: p["w"] ** 2, PARAMS).mv(PARAMS)
    lower = lambda i, o: ((i["w"] - o["t"]) ** 2).sum()  # noqa: E731
    inner, outer = {"w": torch.zeros(3, dtype=F64)}, {"t": torch.zeros(3, dtype=F64)}
    with pytest.raises(TypeError, match="upper_loss"):
        hg.implicit_grad(lower, lambda i, o: i["w"] ** 2, inner, outer)
    with pytest.raises(TypeError, match="scalar"):
        hg.implicit_grad(lambda i, o: (i["w"] - o["t"]) ** 2, lambda i, o: (i["w"] ** 2).sum(), inner, outer)


# --- non-finite values --------------------------------------------------------------------

SOLVERS = {
    "CG": lambda **kw: hg.CG(maxiter=10, tol=1e-8, **kw),
    "MINRES": lambda **kw: hg.MINRES(maxiter=10, tol=1e-8, **kw),
    "LayerwiseCG": lambda **kw: hg.LayerwiseCG(maxiter=10, tol=1e-8, **kw),
    "Neumann": lambda **kw: hg.Neumann(alpha=0.1, maxiter=10, tol=1e-8, **kw),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_nonfinite_rhs_is_reported_not_zeroed(name):
    A = spd(6, 5.0, generator(0))
    b = torch.randn(6, generator=generator(1), dtype=F64)
    b[2] = math.nan
    sol = SOLVERS[name]().solve(hg.MatrixOperator(A), {"x": b})
    assert bool(sol.stats.nonfinite)
    assert sol.result is hg.Result.NONFINITE
    assert torch.isnan(sol.value["x"]).any()
    with pytest.raises(hg.NonFiniteError):
        SOLVERS[name](on_nonfinite="raise").solve(hg.MatrixOperator(A), {"x": b})


def _nan_product_operator(after: int):
    """A = spd; every product after the first ``after`` ones has a NaN in its first entry."""
    A = spd(6, 5.0, generator(2))
    count = {"n": 0}

    def mv(x):
        count["n"] += 1
        y = A @ x["x"]
        if count["n"] > after:
            y = torch.cat([y[:1] * math.nan, y[1:]])
        return {"x": y}

    return hg.FunctionOperator(mv, symmetric=True)


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_product_is_reported(name, bad):
    A = spd(6, 5.0, generator(2))
    op = hg.FunctionOperator(lambda x: {"x": torch.cat([(A @ x["x"])[:1] * bad, (A @ x["x"])[1:]])},
                             symmetric=True)
    b = {"x": torch.randn(6, generator=generator(3), dtype=F64)}
    sol = SOLVERS[name]().solve(op, b)
    assert bool(sol.stats.nonfinite)
    assert sol.result is hg.Result.NONFINITE
    assert sol.stats.iterations == 1  # a tolerance-checking solve stops at once
    with pytest.raises(hg.NonFiniteError):
        SOLVERS[name](on_nonfinite="raise").solve(op, b)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: hg.CG(maxiter=10, tol=1e-8, on_breakdown="continue"), id="CG-continue"),
        pytest.param(lambda: hg.MINRES(maxiter=10, tol=1e-8), id="MINRES"),
        pytest.param(lambda: hg.CG(maxiter=10, tol=1e-8), id="CG-stop"),
        pytest.param(lambda: hg.LayerwiseCG(maxiter=10, tol=1e-8, on_breakdown="stop"), id="LayerwiseCG-stop"),
    ],
)
@pytest.mark.parametrize("after", [0, 2])
def test_nan_product_reaches_the_value(make, after):
    b = {"x": torch.randn(6, generator=generator(3), dtype=F64)}
    sol = make().solve(_nan_product_operator(after), b)
    assert sol.result is hg.Result.NONFINITE
    assert torch.isnan(sol.value["x"]).any()


def test_nonfinite_in_one_of_a_batch():
    A = spd(6, 5.0, generator(4))
    B = torch.randn(2, 6, generator=generator(5), dtype=F64)
    B[1, 0] = math.inf
    sol = hg.CG(maxiter=20, tol=1e-10).solve(hg.MatrixOperator(A), {"x": B}, batched=True)
    assert sol.stats.nonfinite.tolist() == [False, True]
    assert sol.result is hg.Result.NONFINITE
    assert torch.allclose(sol.value["x"][0], torch.linalg.solve(A, B[0]), rtol=1e-8)


def test_nonfinite_hessian_in_implicit_grad():
    """A NaN in the data reaches the Hessian products: stats say so and the result keeps the NaN."""
    X = torch.randn(5, 3, generator=generator(6), dtype=F64)
    X[0, 0] = math.nan
    lower = lambda i, o: ((X @ i["w"]) ** 2).mean() + (torch.exp(o["l"]) * i["w"] ** 2).sum()  # noqa: E731
    upper = lambda i, o: (i["w"] - 1.0).pow(2).sum()  # noqa: E731
    inner, outer = {"w": torch.zeros(3, dtype=F64)}, {"l": torch.zeros(3, dtype=F64)}
    _, stats = hg.implicit_grad(lower, upper, inner, outer, solver=hg.CG(maxiter=5, tol=1e-8),
                                stationarity_tol=None)
    assert stats.result is hg.Result.NONFINITE
    grads, stats = hg.implicit_grad(lower, upper, inner, outer, solver=hg.MINRES(maxiter=5, tol=1e-8),
                                    stationarity_tol=None)
    assert stats.result is hg.Result.NONFINITE
    assert torch.isnan(grads["l"]).any()
    with pytest.raises(hg.NonFiniteError):
        hg.implicit_grad(lower, upper, inner, outer, solver=hg.CG(maxiter=5, on_nonfinite="raise"),
                         stationarity_tol=None)
