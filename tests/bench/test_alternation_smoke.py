"""Smoke mode of the alternation benchmark (CI): correctness of every contender, no timing.

Tiny CNN, float64, a damped system that is positive definite (delta = 50). Everything is
checked against a dense computation that shares no code with the benchmark or hypergrad:
``torch.autograd.functional.hessian`` of the flattened pretext loss and ``torch.linalg``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import hypergrad as hg
from benchmarks._common import ravel as flatten
from benchmarks._common import unravel as unflatten
from benchmarks.alternation.contenders import CONTENDERS, Clock
from benchmarks.alternation.reference import CountingProduct, layerwise_cg
from benchmarks.alternation.report import (
    SAME_METHOD_AS_REFERENCE,
    overhead_verdict,
    pooled,
    speedups,
    write_report,
)
from benchmarks.alternation.run import (
    MODES,
    IndefiniteSystemError,
    contenders,
    peers,
    run_mode,
    truth,
)
from benchmarks.alternation.workload import alternation, pretrained_models

MODE = MODES["smoke"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def workload():
    backbone, projector, feat, _ = pretrained_models(MODE.sizes, CPU)
    return alternation(MODE.sizes, backbone, projector, feat, 0, CPU)


def dense_operator(f, params, c: float) -> torch.Tensor:
    flat = flatten(params)
    H = torch.autograd.functional.hessian(lambda z: f(unflatten(z, params)), flat)
    H = (H + H.T) / 2
    return torch.eye(flat.numel(), dtype=flat.dtype) + H / c


@pytest.fixture(scope="module")
def dense(workload):
    A = dense_operator(workload.f, workload.params, workload.c)
    xs = [torch.linalg.solve(A, flatten(v)) for v in workload.rhs]
    eig = torch.linalg.eigvalsh(A)
    return {"A": A, "xs": xs, "eig": eig}


def cg_bound(kappa: float, k: int) -> float:
    """Relative 2-norm error bound of CG after k iterations from zero: 2 sqrt(kappa) rho^k."""
    rho = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    return 2 * math.sqrt(kappa) * rho**k


def dense_layerwise(A: torch.Tensor, b: torch.Tensor, sizes: list[int], iterations: int) -> torch.Tensor:
    """The reference code's per-tensor CG, written on a dense matrix with index blocks."""
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    blocks = [slice(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    x, r, d = torch.zeros_like(b), b.clone(), b.clone()
    for _ in range(iterations):
        ad = A @ d
        for s in blocks:
            rr = r[s] @ r[s]
            alpha = rr / (d[s] @ ad[s])
            x[s] = x[s] + alpha * d[s]
            r[s] = r[s] - alpha * ad[s]
            d[s] = r[s] + (r[s] @ r[s]) / rr * d[s]
    return x


def test_operator_is_positive_definite(dense):
    assert dense["eig"][0] > 0.1, "the smoke workload must be SPD for the CG bounds below"


def test_reference_equals_dense_layerwise_cg(workload, dense):
    sizes = [t.numel() for t in workload.params.values()]
    product = CountingProduct(workload.f, workload.params, workload.c)
    for v in workload.rhs:
        before = product.calls
        x = flatten(layerwise_cg(product, v, 5))
        assert product.calls - before == 5
        expected = dense_layerwise(dense["A"], flatten(v), sizes, 5)
        assert torch.allclose(x, expected, rtol=0, atol=1e-12 * expected.abs().max())


def test_truth_equals_dense_solve(workload, dense):
    xs, info = truth(workload, MODE.truth_tol)
    for x, ref, s in zip(xs, dense["xs"], info["solves"], strict=True):
        assert float((flatten(x) - ref).norm() / ref.norm()) < 1e-10
        assert s["relative_residual"] < 1e-11


@pytest.fixture(scope="module")
def measured(workload, dense):
    truths = [unflatten(x, workload.params) for x in dense["xs"]]
    return contenders(workload, truths, MODE, Clock(CPU), None)


def test_every_contender_ran(measured):
    assert set(measured) == {c.name for c in CONTENDERS}


def test_contender_errors_within_bounds(workload, dense, measured):
    eig = dense["eig"]
    kappa = float(eig[-1] / eig[0])
    norms = [float(x.norm()) for x in dense["xs"]]
    for name, c in measured.items():
        for p in c["points"]:
            k, errors = p["iterations"], p["errors"]
            if name in ("cg", "cg-recycled"):
                # A Galerkin guess from recycled directions never increases the A-norm error.
                bounds = [cg_bound(kappa, k)] * len(errors)
            elif name in ("cg-deflated", "cg-deflated-bf16"):
                # M^-1 = (I - WW^T) + W E^-1 W^T has eigenvalues in [1/l_max(A), 1/l_min(A)] and 1,
                # so kappa(M^-1 A) <= kappa(A)^2; the Galerkin guess never increases the A-norm error.
                rho = (kappa - 1) / (kappa + 1)
                low_precision = 0.1 * float((eig - 1).abs().max()) * kappa if name.endswith("bf16") else 0.0
                bounds = [2 * math.sqrt(kappa) * rho**k + low_precision] * len(errors)
            elif name == "cg-warm":
                # k iterations from the previous solution x0: ||x - x0|| <= ||x|| + ||x0||.
                prev = [0.0] + [n * (1 + cg_bound(kappa, k)) for n in norms[:-1]]
                bounds = [cg_bound(kappa, k) * (n + q) / n for n, q in zip(norms, prev, strict=True)]
            elif name == "identity":
                bounds = [float((eig - 1).abs().max())] * len(errors)
            elif name == "cg-bf16":
                # bfloat16 keeps 8 significand bits; through a forward and two backward passes the
                # product H u is allowed a 10% error of ||H/c|| ||u||, amplified by kappa.
                h_norm = float((eig - 1).abs().max())
                bounds = [cg_bound(kappa, k) + 0.1 * h_norm * kappa] * len(errors)
            elif name == "cg-subsampled":
                A_sub = dense_operator(workload.f_sub, workload.params, workload.c)
                eig_sub = torch.linalg.eigvalsh(A_sub)
                assert eig_sub[0] > 0
                k_sub = float(eig_sub[-1] / eig_sub[0])
                bounds = []
                for v, x in zip(workload.rhs, dense["xs"], strict=True):
                    x_sub = torch.linalg.solve(A_sub, flatten(v))
                    bias = float((x_sub - x).norm() / x.norm())
                    bounds.append(cg_bound(k_sub, k) * float(x_sub.norm()) / float(x.norm()) + bias)
            elif name == "nystrom-pcg":
                A_op = hg.DampedOperator(hg.HessianOperator(workload.f, workload.params), 1.0, 1.0 / workload.c)
                pre = hg.NystromPreconditioner.build(A_op, workload.params, MODE.sizes.nystrom_rank,
                                                     generator=torch.Generator().manual_seed(0))
                cols = [flatten(pre({n: t.unsqueeze(0) for n, t in unflatten(col, workload.params).items()}))
                        for col in dense["A"].T]
                pa = torch.stack(cols, dim=1)  # P^{-1} A: similar to an SPD matrix
                ev = torch.linalg.eigvals(pa).real
                k_p = float(ev.max() / ev.min())
                rho = (math.sqrt(k_p) - 1) / (math.sqrt(k_p) + 1)
                bounds = [2 * math.sqrt(kappa) * rho**k] * len(errors)
            elif name.startswith("refine-"):
                bounds = [refinement_bound(name, k, workload, dense)] * len(errors)
            elif name in ("reference", "layerwise-reuse"):
                sizes = [t.numel() for t in workload.params.values()]
                exact = [dense_layerwise(dense["A"], flatten(v), sizes, k) for v in workload.rhs]
                bounds = [float((e - x).norm() / x.norm()) + 1e-10 for e, x in zip(exact, dense["xs"], strict=True)]
            else:
                pytest.fail(f"no bound for contender {name}")
            for i, (err, bound) in enumerate(zip(errors, bounds, strict=True)):
                assert err <= bound * (1 + 1e-9) + 1e-12, f"{name}, {k} iterations, rhs {i}: {err:.3e} > {bound:.3e}"


def refinement_bound(name: str, corrections: int, workload, dense) -> float:
    """Relative error bound of hg.Refinement after ``corrections`` corrections from x = 0.

    e_{j+1} = A^-1 r_j - d_j with d_j the inner solve on r_j = A e_j, so ||e_{j+1}|| <= rho_j ||e_j||:
    for k CG iterations on the inner operator M, rho <= ||I - M^-1 A|| + cg_bound(kappa_M, k) ||M^-1 A||
    (both dense, float64). bfloat16 products perturb M by the bf16 Hessian's error, which costs a
    correction up to ||delta H / c|| kappa: allowed 0.2 ||H/c|| kappa (twice cg-bf16's one-off
    allowance: here each correction pays it, and the measured per-correction contraction, ~0.11
    ||H/c|| kappa, is above 0.1 -- the whole model, batch and both backward passes are bfloat16).
    The product-free correction d = r contracts by ||I - A||.
    """
    A, eig = dense["A"], dense["eig"]
    kappa, h_norm = float(eig[-1] / eig[0]), float((eig - 1).abs().max())
    if "-sub" in name:
        M = dense_operator(workload.f_sub, workload.params, workload.c)
        assert torch.linalg.eigvalsh(M)[0] > 0
    else:
        M = A
    eig_m = torch.linalg.eigvalsh(M)
    kappa_m = float(eig_m[-1] / eig_m[0])
    MA = torch.linalg.solve(M, A)
    mismatch = float(torch.linalg.matrix_norm(torch.eye(A.shape[0], dtype=A.dtype) - MA, ord=2))
    low = 0.2 * h_norm * kappa if ("bf16" in name or "autocast" in name) else 0.0
    k = 3 if "-cg3" in name else 2
    rho_cg = mismatch + cg_bound(kappa_m, k) * float(torch.linalg.matrix_norm(MA, ord=2)) + low
    rho_identity = h_norm + low  # d = r: e' = (I - A) e, with r's rounding through no bf16 product
    bound = 1.0
    for j in range(corrections):
        bound *= rho_identity if (name.endswith("-id") and j > 0) else rho_cg
    return bound


def test_products_counted(measured):
    rhs = MODE.sizes.rhs
    for p in measured["reference"]["points"]:
        assert p["products"] == rhs * p["iterations"]
    for name in ("cg", "cg-recycled", "cg-deflated", "cg-bf16", "cg-deflated-bf16", "layerwise-reuse"):
        for p in measured[name]["points"]:
            assert p["products"] == rhs * p["iterations"], name
    for name in ("refine-bf16-cg2", "refine-bf16-cg3", "refine-autocast-cg2", "refine-sub-cg2", "refine-sub-bf16-cg2",
                 "refine-bf16-cg2-id"):
        k = 3 if "-cg3" in name else 2

        def inner(J: int, name: str = name, k: int = k) -> int:
            return k if name.endswith("-id") else k * J  # -id: then d = r, no product

        extra = measured[name]["extra"]  # of the last budget run
        assert extra["inner_products_per_solve"] == inner(extra["corrections"]), name
        assert extra["full_products_per_solve"] == extra["corrections"] - 1, name  # none after the last
        for p in measured[name]["points"]:
            J = p["iterations"]  # corrections
            assert p["products"] == rhs * (inner(J) + J - 1), name
    for p in measured["cg-warm"]["points"]:  # one product for the warm start's residual
        assert p["products"] == rhs * p["iterations"] + (rhs - 1)
    nystrom = measured["nystrom-pcg"]
    sketches = 1 if nystrom["extra"]["sketched"] == "H + cI" else 2  # H's sketch, then A's
    for p in nystrom["points"]:
        assert p["products"] == sketches * MODE.sizes.nystrom_rank + rhs * p["iterations"]
    assert measured["identity"]["points"][0]["products"] == 0


def test_peers_read_nothing_on_the_host_in_fixed_iteration_mode(workload, dense):
    truths = [unflatten(x, workload.params) for x in dense["xs"]]
    out = peers(workload, truths, CPU)
    eig = dense["eig"]
    kappa = float(eig[-1] / eig[0])
    for k in (4, 5):
        row = out["rows"][f"hypergrad CG, {k} iterations"]
        assert row["host_reads_per_solve"] == 0
        assert row["products_per_solve"] == k
        assert max(row["errors"]) <= cg_bound(kappa, k)
    if not isinstance(out["torchopt"], str) or "not installed" not in out["torchopt"]:
        row = out["rows"]["torchopt.linalg.cg, maxiter 4"]
        assert row["products_per_solve"] == 5  # it forms the initial residual with a product
        assert row["host_reads_per_solve"] > 0


def test_report_renders_from_json(tmp_path: Path, monkeypatch):
    result = run_mode("smoke", CPU, sections=("alternation", "overhead"))
    assert result["seeds"][0]["overhead"]["max_rel_difference"] < 1e-12  # hypergrad's product = autograd's
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "alternation-quick.json").write_text(json.dumps(result))
    out = write_report(tmp_path / "results", tmp_path / "docs")
    text = out.read_text()
    assert "## Targets" in text and "GPU" in text
    assert (tmp_path / "docs" / "img" / "benchmarks" / "alternation-quick.png").stat().st_size > 1000
    table, ups = pooled(result), speedups(result)
    assert table["reference"][-1]["products"] == MODE.sizes.rhs * 5
    # Standard CG reaches the reference's error at some budget on an SPD system.
    assert ups["cg"]["reached"] == 1
    # Every seed says which process measured it.
    run = result["seeds"][0]["runs"][0]
    assert run["sections"] == ["alternation", "overhead"] and run["pid"] > 0
    assert "**Provenance**" in text and f"pid {run['pid']}" in text
    # The overhead is a median over interleaved pairs, with each pair's ratio kept.
    o = result["seeds"][0]["overhead"]
    assert len(o["overhead_reused_pairs"]) == MODE.overhead_pairs
    lo, hi = o["overhead_reused_range"]
    assert lo <= o["overhead_reused"] <= hi


def _result_with(ref_error: float, errors: dict[str, float]) -> dict:
    """A hand-made result: the reference at 10 s with ``ref_error``; every contender at 5 s."""
    def point(err: float, sec: float) -> dict:
        return {"iterations": 5, "seconds": sec, "median_error": err, "errors": [err], "products": 40}

    cs = {"reference": {"label": "r", "points": [point(ref_error, 10.0)]}}
    cs |= {name: {"label": name, "points": [point(err, 5.0)]} for name, err in errors.items()}
    return {"seeds": [{"seed": 0, "contenders": cs}]}


def test_equal_error_is_strict_except_for_the_reference_method():
    same = next(iter(SAME_METHOD_AS_REFERENCE))
    ups = speedups(_result_with(1.0, {"cg": 1.0, "worse-by-half-a-percent": 1.005, same: 1.005, "better": 0.5}))
    assert ups["cg"]["median"] == 2.0 and ups["better"]["median"] == 2.0  # at or below the bar: qualifies
    assert ups["worse-by-half-a-percent"]["reached"] == 0  # no allowance for another method
    assert ups[same]["median"] == 2.0  # float32 rounding of the reference's own method and precision


def test_overhead_verdict_needs_the_spread():
    def pairs(med: float, lo: float, hi: float) -> dict:
        return {"pairs": 5, "overhead_reused": med, "overhead_reused_range": [lo, hi],
                "overhead_rebuilt": med, "overhead_rebuilt_range": [lo, hi]}

    assert overhead_verdict(pairs(0.01, -0.02, 0.04)) == "met"
    assert overhead_verdict(pairs(0.01, -0.02, 0.09)).startswith("not shown")
    assert overhead_verdict(pairs(0.08, 0.06, 0.09)) == "not met"


def test_indefinite_system_stops_the_run(monkeypatch):
    import benchmarks.alternation.run as run_module

    real_truth = run_module.truth

    def negative_curvature(*args, **kwargs):
        xs, info = real_truth(*args, **kwargs)
        info["solves"][0]["min_curvature"] = -0.5
        return xs, info

    monkeypatch.setattr(run_module, "truth", negative_curvature)
    with pytest.raises(IndefiniteSystemError, match=r"-0\.5"):
        run_mode("smoke", CPU, sections=("alternation",), names=["reference"])


def test_append_merges_sections_and_contenders():
    from benchmarks.alternation.__main__ import merge

    old = {"seeds": [{"seed": 0, "truth": "t0", "contenders": {"a": 1, "b": 2}, "peers": "p0"}], "finished": "x"}
    new = {"seeds": [{"seed": 0, "overhead": "o0", "contenders": {"b": 3}}, {"seed": 1, "truth": "t1"}],
           "finished": "y"}
    out = merge(old, new)
    assert out["seeds"] == [{"seed": 0, "truth": "t0", "contenders": {"a": 1, "b": 3}, "peers": "p0",
                             "overhead": "o0"}, {"seed": 1, "truth": "t1"}]
    # Provenance accumulates: both processes stay listed for seed 0.
    old = {"seeds": [{"seed": 0, "runs": [{"pid": 1}]}], "finished": "x"}
    new = {"seeds": [{"seed": 0, "runs": [{"pid": 2}]}], "finished": "y"}
    assert merge(old, new)["seeds"][0]["runs"] == [{"pid": 1}, {"pid": 2}]
    assert out["finished"] == "y"
