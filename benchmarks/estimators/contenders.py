"""The contenders: one outer step of each estimator, with its warm starts and its exact cost.

Every contender solves the inner problem(s) with the same plain gradient steps (step size
``problem.step_size``, warm-started from the previous outer step), so the estimators differ
only in how they turn inner steps into a hypergradient:

* ``implicit-cg`` / ``implicit-neumann``: K inner steps, then :func:`hypergrad.implicit_grad`
  with a fixed-iteration CG or Neumann solve (m products) — cost K + 2 gradients and m + 1
  Hessian products (the mixed term is one more second-order backward).
* ``itd`` / ``itd-truncated``: :func:`hypergrad.unrolled_grad` through K steps (all, or the last T).
* ``f2sa``: :func:`hypergrad.f2sa_grad`, K steps on each inner problem, multiplier from a
  :class:`hypergrad.PenaltySchedule` over outer steps.
* ``v-pbgd``: :func:`hypergrad.penalty_grad`, fixed penalty gamma = 10, K lower steps and K y
  steps per outer step, the last one joint. Why not the paper's single joint y step, or a larger
  gamma: in untimed trials (seed 0, 1500 gradient-equivalents, K = 20) with the examples' outer
  step rules, which every contender shares, one y step per outer step raised the validation
  loss on both problems (digits 0.60 -> 2.06, hyper-cleaning 1.10 -> 2.4-4.0, gamma 10 or 100):
  y lags x and the penalty term's error, multiplied by gamma, steers x. With K y steps, gamma =
  100 did the same (0.60 -> 1.06, 1.10 -> 1.69) while gamma = 10 descended (0.16, 0.26). The
  paper pairs the joint step with an x step of order 1/gamma, which the shared rules do not.
* ``random-search`` (the floor): draw an outer point, K_rs warm-started gradient steps, keep the
  candidate whose validation loss (at those steps) is lowest; a loss evaluation counts as one
  gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import hypergrad as hg

from .problems import OuterProblem

State = dict[str, Any]
StepResult = tuple[hg.Tree, int, int, State]  # grads, gradient evaluations, Hessian products, state


@dataclass(frozen=True)
class Settings:
    """Per-problem settings shared by the contenders (stated in the report)."""

    inner_steps: int  # K
    solver_iterations: int  # m for CG / Neumann
    truncate: int  # T for truncated ITD
    f2sa_lam: hg.PenaltySchedule
    vpbgd_gamma: float
    vpbgd_penalty_steps: int  # y steps per outer step, the last one joint (the paper: 1)
    random_inner_steps: int  # K_rs per random-search candidate

    def describe(self) -> dict[str, Any]:
        return {"inner_steps": self.inner_steps, "solver_iterations": self.solver_iterations,
                "truncate": self.truncate,
                "f2sa_lam": {"initial": self.f2sa_lam.initial, "power": self.f2sa_lam.power,
                             "maximum": self.f2sa_lam.maximum},
                "vpbgd_gamma": self.vpbgd_gamma, "vpbgd_penalty_steps": self.vpbgd_penalty_steps,
                "random_inner_steps": self.random_inner_steps}


def gd(problem: OuterProblem, start: hg.Tree, outer: hg.Tree, steps: int) -> hg.Tree:
    """``steps`` gradient steps on the lower loss (one gradient evaluation each)."""
    y = start
    for _ in range(steps):
        g = hg.gradient(lambda p: problem.lower(p, outer), y)
        y = {k: y[k] - problem.step_size * g[k] for k in y}
    return y


def _implicit(solver_of: Callable[[OuterProblem, Settings], hg.Solver]) -> Callable[..., StepResult]:
    def step(problem: OuterProblem, s: Settings, state: State, outer: hg.Tree, k: int) -> StepResult:
        y = gd(problem, state["y"], outer, s.inner_steps)
        grads, stats = hg.implicit_grad(problem.lower, problem.upper, y, outer, solver=solver_of(problem, s),
                                        stationarity_tol=None, on_failure="ignore")
        return grads, s.inner_steps + 2, int(stats.num_hvp) + 1, {"y": y}

    return step


def _itd(truncated: bool) -> Callable[..., StepResult]:
    def step(problem: OuterProblem, s: Settings, state: State, outer: hg.Tree, k: int) -> StepResult:
        grads, stats = hg.unrolled_grad(problem.lower, problem.upper, state["y"], outer, steps=s.inner_steps,
                                        step_size=problem.step_size,
                                        truncate=s.truncate if truncated else None)
        return grads, stats.grad_evals, stats.hvp, {"y": stats.inner}

    return step


def _f2sa(problem: OuterProblem, s: Settings, state: State, outer: hg.Tree, k: int) -> StepResult:
    grads, stats = hg.f2sa_grad(problem.lower, problem.upper, state["y"], outer, lam=s.f2sa_lam(k),
                                steps=s.inner_steps, step_size=problem.step_size, lower_inner=state["z"],
                                penalty_step_size=problem.penalty_step_size)
    return grads, stats.grad_evals, stats.hvp, {"y": stats.inner, "z": stats.lower_inner}


def _vpbgd(problem: OuterProblem, s: Settings, state: State, outer: hg.Tree, k: int) -> StepResult:
    grads, stats = hg.penalty_grad(problem.lower, problem.upper, state["y"], outer, gamma=s.vpbgd_gamma,
                                   steps=s.inner_steps, step_size=problem.step_size, lower_inner=state["z"],
                                   penalty_steps=s.vpbgd_penalty_steps, penalty_step_size=problem.penalty_step_size)
    return grads, stats.grad_evals, stats.hvp, {"y": stats.inner, "z": stats.lower_inner}


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    family: str
    step: Callable[..., StepResult] | None  # None: random search


CONTENDERS = [
    Contender("implicit-cg", "implicit, CG (m products)", "implicit",
              _implicit(lambda p, s: hg.CG(maxiter=s.solver_iterations, tol=0.0))),
    Contender("implicit-neumann", "implicit, Neumann (m products)", "implicit",
              _implicit(lambda p, s: hg.Neumann(maxiter=s.solver_iterations, alpha=p.step_size, tol=0.0))),
    Contender("itd", "ITD, full (K steps)", "unrolled", _itd(False)),
    Contender("itd-truncated", "ITD, truncated (last T steps)", "unrolled", _itd(True)),
    Contender("f2sa", "F2SA (growing lambda)", "first-order", _f2sa),
    Contender("v-pbgd", "V-PBGD (fixed gamma, K y steps, the last joint)", "first-order", _vpbgd),
    Contender("random-search", "random search (floor)", "floor", None),
]
BY_NAME = {c.name: c for c in CONTENDERS}


def initial_state(problem: OuterProblem) -> State:
    return {"y": dict(problem.inner0), "z": dict(problem.inner0)}


def random_candidate(problem: OuterProblem, s: Settings, state: State, gen: torch.Generator) -> tuple[hg.Tree, float, int, State]:
    """One random-search candidate: ``(outer, validation loss at K_rs steps, gradient evaluations, state)``."""
    outer = problem.random_outer(gen)
    y = gd(problem, state["y"], outer, s.random_inner_steps)
    with torch.no_grad():
        value = float(problem.upper(y, outer))
    return outer, value, s.random_inner_steps + 1, {"y": y}
