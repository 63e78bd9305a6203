"""Smoke mode of the estimator benchmark (CI): every contender runs, costs are counted as
documented, the truths are right, and the report renders from the JSON. No timing is asserted.

Independent checks: the quadratic's closed-form hypergradient against ``torch.func.grad`` of
``x -> F(y*(x), x)`` with ``y*(x)`` by ``torch.linalg.solve``; the exact evaluator's solutions
against the example loss's own gradient (recorded in the run).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.estimators.contenders import CONTENDERS
from benchmarks.estimators.problems import quadratic
from benchmarks.estimators.report import BEGIN, END, summarise, targets, value_at, write_report
from benchmarks.estimators.run import MODES, QUAD_CONTENDERS, run_mode

MODE = MODES["smoke"]
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `python -m benchmarks.estimators run` does by default
    try:
        return run_mode("smoke", seeds=(0,))
    finally:
        torch.set_num_threads(threads)


def test_quadratic_truth_is_the_derivative_of_the_reduced_objective():
    q = quadratic(0, 10, 3)

    def phi(x):
        y = torch.linalg.solve(q.H, q.B @ x + q.b)
        return q.upper({"y": y}, {"x": x})

    assert torch.allclose(q.truth(), torch.func.grad(phi)(q.x), rtol=1e-10, atol=1e-12)


def test_quadratic_points(result):
    seed = result["quadratic"]["seeds"][0]
    assert set(seed["points"]) == set(QUAD_CONTENDERS)
    r = seed["hvp_cost"]["ratio"]
    assert r > 0
    for rows in seed["points"].values():
        assert [p["k"] for p in rows] == list(MODE.quad_steps)
        for p in rows:
            assert math.isfinite(p["error"]) and p["cost"] == pytest.approx(p["grads"] + r * p["hvps"])
    for name in ("itd", "implicit-cg", "f2sa"):  # more inner steps, closer (F2SA: down to its 1/lam bias)
        errors = [p["error"] for p in seed["points"][name]]
        assert errors[-1] < errors[0], name
    itd = seed["points"]["itd"]
    assert all(p["grads"] == p["k"] + 1 and p["hvps"] == p["k"] for p in itd)
    assert all(p["hvps"] == 0 for n in ("f2sa", "v-pbgd", "partial") for p in seed["points"][n])


def test_every_contender_ran_and_counted(result):
    for pname, entry in result["problems"].items():
        s = entry["settings"]
        k = s["inner_steps"]
        per_step = {  # (gradients, Hessian products) per outer step, as documented in contenders.py
            "implicit-cg": (k + 2, s["solver_iterations"] + 1),
            "implicit-neumann": (k + 2, s["solver_iterations"] + 1),
            "itd": (k + 1, k),
            "itd-truncated": (k + 1, s["truncate"]),
            "f2sa": (k + 1 + 2 * k + 2, 0),
            "v-pbgd": (k + 1 + 2 * s["vpbgd_penalty_steps"], 0),
            "random-search": (s["random_inner_steps"] + 1, 0),
        }
        seed = entry["seeds"][0]
        assert set(seed["runs"]) == {c.name for c in CONTENDERS}
        for name, run in seed["runs"].items():
            pts = run["points"]
            assert run["status"] == "budget", (pname, name, run["status"])
            assert pts[-1]["cost"] >= entry["budget"]
            assert all(a["cost"] <= b["cost"] and a["seconds"] <= b["seconds"] for a, b in itertools.pairwise(pts))
            grads, hvps = per_step[name]
            for p in pts:
                assert (p["grads"], p["hvps"]) == (p["k"] * grads, p["k"] * hvps), (pname, name, p)
                assert math.isfinite(p["value"])
            # the exact evaluator really solved the example's inner problem
            assert run["evaluation_stationarity"] < 1e-7, (pname, name)


def test_report_renders_from_json(result, tmp_path):
    results = tmp_path / "estimators.json"
    results.write_text(json.dumps(result))
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(DOCS / "estimators.md", docs / "estimators.md")
    page = write_report(results, docs)
    text = page.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "Not measured yet" not in text and "First to the target" in text
    assert "## Which one, before measuring" in text  # the hand-written part is kept
    for name in QUAD_CONTENDERS:
        assert f"`{name}`" in text
    for image in ("quadratic", "digits-l2", "hypercleaning"):
        assert (docs / "img" / "estimators" / f"{image}.png").stat().st_size > 1000
    # Regenerating replaces the block instead of appending a second one.
    text2 = write_report(results, docs).read_text()
    assert text2.count(BEGIN) == 1 and text2 == text


def test_targets_and_budget_values():
    points = [{"k": 0, "cost": 0.0, "seconds": 0.0, "value": 1.0, "test": 0.0},
              {"k": 1, "cost": 10.0, "seconds": 1.0, "value": 0.5, "test": 0.0},
              {"k": 2, "cost": 20.0, "seconds": 2.0, "value": 0.2, "test": 0.0}]
    assert value_at(points, 15.0) == 0.5 and value_at(points, 20.0) == 0.2
    entry = {"budget": 20.0, "seeds": [{"seed": 0, "runs": {
        "a": {"points": points, "outer_steps": 2, "status": "budget"},
        "b": {"points": [points[0], {**points[2], "value": 0.9}], "outer_steps": 1, "status": "budget"}}}]}
    assert targets(entry)[0] == pytest.approx(1.0 - 0.9 * 0.8)
    summary = summarise(entry)
    assert summary["a"]["reached"] == 1 and summary["a"]["cost_to_target"] == 20.0
    assert summary["b"]["reached"] == 0 and summary["b"]["cost_to_target"] is None
