"""Run a mode: the quadratic's accuracy-vs-cost points and the two outer-loop problems' traces.

Nothing here is a test: every number goes to the JSON file, the report reads it. Seconds count
the contender's own work (inner steps, estimate, outer update); the exact evaluations of the
outer loss (the examples' Newton-CG) are not timed.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import hypergrad as hg

from .._common import machine_summary, median_times
from .contenders import BY_NAME, CONTENDERS, Settings, initial_state, random_candidate
from .problems import OUTER_PROBLEMS, OuterProblem, Quadratic, quadratic


@dataclass(frozen=True)
class Mode:
    seeds: tuple[int, ...]
    small: bool  # the examples' small data
    quad_n: int
    quad_m: int
    quad_steps: tuple[int, ...]  # K grid of the quadratic
    quad_lam: float  # F2SA's multiplier on the quadratic
    quad_gamma: float  # V-PBGD's penalty on the quadratic
    settings: dict[str, Settings] = field(default_factory=dict)  # per outer problem
    budgets: dict[str, float] = field(default_factory=dict)  # gradient-equivalents per run
    evaluations: int = 20  # exact evaluations per run (evenly spaced in cost)
    hvp_rounds: int = 30  # timed rounds of the gradient / product measurement


def _settings(k: int, m: int, t: int, k_rs: int) -> Settings:
    return Settings(inner_steps=k, solver_iterations=m, truncate=t,
                    f2sa_lam=hg.PenaltySchedule(initial=10.0, power=0.5, maximum=1000.0),
                    vpbgd_gamma=10.0, vpbgd_penalty_steps=k, random_inner_steps=k_rs)


MODES = {
    # CI: tiny data, 2 seeds, a few outer steps. Checks that everything runs and is recorded.
    "smoke": Mode(seeds=(0, 1), small=True, quad_n=20, quad_m=4, quad_steps=(4, 8, 16), quad_lam=1e3,
                  quad_gamma=100.0,
                  settings={"digits-l2": _settings(4, 2, 2, 10), "hypercleaning": _settings(4, 2, 2, 10)},
                  budgets={"digits-l2": 80.0, "hypercleaning": 80.0}, evaluations=2, hvp_rounds=3),
    # The real run: sized for <= 15 minutes on 2 idle cores.
    "full": Mode(seeds=(0, 1, 2, 3, 4), small=False, quad_n=300, quad_m=30,
                 quad_steps=(10, 20, 40, 80, 160, 320), quad_lam=1e3, quad_gamma=100.0,
                 settings={"digits-l2": _settings(20, 10, 5, 100), "hypercleaning": _settings(20, 10, 5, 100)},
                 budgets={"digits-l2": 6000.0, "hypercleaning": 6000.0}, evaluations=20, hvp_rounds=30),
}
MIN_PENALTY = 10.0  # the smallest multiplier any contender uses (sets the penalised step size)
MAX_OUTER_STEPS = 100_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# The cost of a Hessian product, in gradients


def hvp_cost(lower: Any, inner: hg.Tree, outer: hg.Tree, rounds: int) -> dict[str, Any]:
    """Median time of one gradient of the lower loss and of one product on a built gradient graph."""
    f = lambda p: lower(p, outer)  # noqa: E731
    leaves = {k: t.detach().requires_grad_(True) for k, t in inner.items()}
    graph = hg.GradientGraph(f(leaves), leaves)
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=t.dtype) for k, t in inner.items()}
    times = median_times({"gradient": lambda: hg.gradient(f, inner), "product": lambda: graph.vjp(v)}, rounds)
    return {"ratio": times["product"] / times["gradient"], "gradient_ms": 1e3 * times["gradient"],
            "product_ms": 1e3 * times["product"], "rounds": rounds,
            "how": "one Hessian-vector product = one backward through a built first-order graph "
                   "(reverse over reverse, what CG, Neumann and ITD's reverse pass spend); one gradient = "
                   "a forward and backward of the lower loss; medians of interleaved rounds at the start point"}


# ---------------------------------------------------------------------------------------------
# The quadratic


def _quad_estimate(name: str, q: Quadratic, k: int, mode: Mode) -> tuple[hg.Tree, int, int]:
    eta = 1.0 / q.ell
    y0, x = q.start(), q.outer()
    m = max(1, k // 4)
    if name in ("implicit-cg", "implicit-neumann", "partial"):
        y = y0
        for _ in range(k):
            g = hg.gradient(lambda p: q.lower(p, x), y)
            y = {"y": y["y"] - eta * g["y"]}
        if name == "partial":
            return hg.gradient(lambda o: q.upper(y, o), x), k + 1, 0
        solver = hg.CG(maxiter=m, tol=0.0) if name == "implicit-cg" else hg.Neumann(maxiter=m, alpha=eta, tol=0.0)
        grads, stats = hg.implicit_grad(q.lower, q.upper, y, x, solver=solver, stationarity_tol=None,
                                        on_failure="ignore")
        return grads, k + 2, int(stats.num_hvp) + 1
    if name in ("itd", "itd-truncated"):
        grads, s = hg.unrolled_grad(q.lower, q.upper, y0, x, steps=k, step_size=eta,
                                    truncate=m if name == "itd-truncated" else None)
        return grads, s.grad_evals, s.hvp
    if name == "f2sa":
        grads, s = hg.f2sa_grad(q.lower, q.upper, y0, x, lam=mode.quad_lam, steps=k, step_size=eta,
                                penalty_step_size=1.0 / (q.ell + 1.0 / mode.quad_lam))
        return grads, s.grad_evals, s.hvp
    if name == "v-pbgd":
        grads, s = hg.penalty_grad(q.lower, q.upper, y0, x, gamma=mode.quad_gamma, steps=k, step_size=eta,
                                   penalty_steps=k, penalty_step_size=1.0 / (q.ell + 1.0 / mode.quad_gamma))
        return grads, s.grad_evals, s.hvp
    raise ValueError(f"unknown quadratic contender {name!r}")


QUAD_CONTENDERS = {
    "implicit-cg": "implicit, CG (K GD steps, m = K/4 products)",
    "implicit-neumann": "implicit, Neumann (K GD steps, m = K/4 products)",
    "itd": "ITD, full (K steps)",
    "itd-truncated": "ITD, truncated (last K/4 steps)",
    "f2sa": "F2SA (lambda fixed, K steps per inner problem)",
    "v-pbgd": "V-PBGD (gamma fixed, K lower + K penalised steps)",
    "partial": "floor: partial derivative d_x F at y_K (ignores y's dependence on x)",
}


def run_quadratic(mode: Mode, seed: int) -> dict[str, Any]:
    q = quadratic(seed, mode.quad_n, mode.quad_m)
    truth = q.truth()
    cost = hvp_cost(q.lower, q.start(), q.outer(), mode.hvp_rounds)
    points: dict[str, list[dict[str, Any]]] = {}
    for name in QUAD_CONTENDERS:
        rows = []
        for k in mode.quad_steps:
            t0 = time.perf_counter()
            grads, n_grad, n_hvp = _quad_estimate(name, q, k, mode)
            seconds = time.perf_counter() - t0
            error = float((grads["x"] - truth).norm())
            rows.append({"k": k, "grads": n_grad, "hvps": n_hvp, "cost": n_grad + cost["ratio"] * n_hvp,
                         "seconds": seconds, "error": error, "rel_error": error / float(truth.norm())})
        points[name] = rows
    return {"seed": seed, "hvp_cost": cost, "points": points,
            "spectrum": [q.mu, q.ell], "n": mode.quad_n, "m": mode.quad_m}


# ---------------------------------------------------------------------------------------------
# Outer loops


def run_outer(problem: OuterProblem, name: str, s: Settings, budget: float, ratio: float, evaluations: int,
              seed: int, initial: tuple[float, float, float, hg.Tree] | None = None) -> dict[str, Any]:
    """One contender's hypergradient descent (or random search) until ``budget`` gradient-equivalents.

    ``initial``: the start point's evaluation, shared by the contenders (computed if ``None``).
    """
    contender = BY_NAME[name]
    state = initial_state(problem)
    outer = dict(problem.outer0)
    value, test, stationarity, eval_inner = initial or problem.evaluate(outer, problem.inner0)
    worst_stationarity = stationarity
    n_grad = n_hvp = k = 0
    seconds, cost = 0.0, 0.0
    points = [{"k": 0, "grads": 0, "hvps": 0, "cost": 0.0, "seconds": 0.0, "value": value, "test": test}]
    every = budget / evaluations
    next_eval = every
    gen = torch.Generator().manual_seed(10_000 + seed)
    best: tuple[float, hg.Tree] | None = None
    status = "budget"
    while cost < budget and k < MAX_OUTER_STEPS:
        t0 = time.perf_counter()
        if contender.step is None:
            cand, cand_value, used, state = random_candidate(problem, s, state, gen)
            if best is None or cand_value < best[0]:
                best = (cand_value, cand)
            outer = best[1]
            n_grad += used
        else:
            grads, used, products, state = contender.step(problem, s, state, outer, k)
            outer = problem.update(outer, grads, k)
            n_grad += used
            n_hvp += products
        seconds += time.perf_counter() - t0
        k += 1
        cost = n_grad + ratio * n_hvp
        if not all(bool(torch.isfinite(t).all()) for t in outer.values()):
            status = "non-finite outer variables"
            break
        if cost >= next_eval or cost >= budget:
            value, test, stationarity, eval_inner = problem.evaluate(outer, eval_inner)
            worst_stationarity = max(worst_stationarity, stationarity)
            points.append({"k": k, "grads": n_grad, "hvps": n_hvp, "cost": cost, "seconds": seconds,
                           "value": value, "test": test})
            while next_eval <= cost:
                next_eval += every
    return {"points": points, "status": status, "outer_steps": k,
            "evaluation_stationarity": worst_stationarity}


def run_mode(mode_name: str, seeds: tuple[int, ...] | None = None, problems: list[str] | None = None,
             contenders: list[str] | None = None) -> dict[str, Any]:
    mode = MODES[mode_name]
    seeds = seeds or mode.seeds
    chosen = contenders or [c.name for c in CONTENDERS]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out: dict[str, Any] = {
        "mode": mode_name, "started": started, "machine": {**machine_summary(),
                                                          "torch_threads": str(torch.get_num_threads())},
        "versions": {"torch": torch.__version__, "hypergrad": hg.__version__,
                     "scikit-learn": importlib.metadata.version("scikit-learn")},
        "quadratic": {"contenders": QUAD_CONTENDERS, "lam": mode.quad_lam, "gamma": mode.quad_gamma, "seeds": []},
        "problems": {},
    }
    for seed in seeds:
        log(f"quadratic, seed {seed}")
        out["quadratic"]["seeds"].append(run_quadratic(mode, seed))
    for pname in problems or list(mode.settings):
        s, budget = mode.settings[pname], mode.budgets[pname]
        entry: dict[str, Any] = {"settings": s.describe(), "budget": budget, "seeds": [],
                                 "labels": {c.name: c.label for c in CONTENDERS},
                                 "families": {c.name: c.family for c in CONTENDERS}}
        for seed in seeds:
            problem = OUTER_PROBLEMS[pname](seed, mode.small, MIN_PENALTY)
            entry.update(description=problem.description, random_rule=problem.random_rule,
                         test_metric=problem.test_metric, step_size=problem.step_size,
                         penalty_step_size=problem.penalty_step_size)
            cost = hvp_cost(problem.lower, problem.inner0, problem.outer0, mode.hvp_rounds)
            log(f"{pname}, seed {seed}: a product costs {cost['ratio']:.2f} gradients")
            runs = {}
            initial = problem.evaluate(problem.outer0, problem.inner0)
            for name in chosen:
                t0 = time.perf_counter()
                runs[name] = run_outer(problem, name, s, budget, cost["ratio"], mode.evaluations, seed, initial)
                last = runs[name]["points"][-1]
                log(f"  {name:17s} {runs[name]['outer_steps']:5d} outer steps, loss {last['value']:.4f}, "
                    f"{last['seconds']:.1f} s measured ({time.perf_counter() - t0:.1f} s with evaluations)")
            entry["seeds"].append({"seed": seed, "hvp_cost": cost, "runs": runs})
        out["problems"][pname] = entry
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out
