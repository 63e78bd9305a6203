"""The issue-20 solvers in the BiSSL stage: mixed_refinement, subsampled_refinement, recycled_cg.

Solved to convergence they give the dense float64 solve's update (``bissl_helpers`` truths), and a
whole alternation runs with each at its default settings (in float32, so that the bfloat16
corrections really are bfloat16).
"""

from __future__ import annotations

import pytest
import torch
from bissl.stages.bilevel import alternation, build_system, stage_losses, upper_step
from bissl_helpers import INFO, N_PAIRS, batches, expected_upper_gradients, flat, make_state, rel

import hypergrad

LEVERS = [  # (solver, delta, overrides): lam + delta small, so that x differs from v
    ("mixed_refinement", 0.9, ["bissl.refine_inner_iterations=[10,10,10,10,10,10]"]),
    # The sub-batch's Hessian differs: each correction contracts the error only by ||I - M^-1 A||
    # (measured: ~0.8 at lam + delta = 1 on this tiny net, ~0.2 at 5).
    ("subsampled_refinement", 4.9, [f"bissl.refine_inner_pairs={N_PAIRS - 2}", "bissl.refine_precision=float32",
                                    f"bissl.refine_inner_iterations=[{','.join(['10'] * 16)}]"]),
    ("recycled_cg", 0.9, ["bissl.solver_iterations=300"]),
]


@pytest.mark.parametrize(("solver", "delta", "extra"), LEVERS)
def test_new_solvers_reach_the_dense_answer(solver: str, delta: float, extra: list[str]) -> None:
    lam, gamma, tau, lr = 0.1, 0.3, 0.5, 0.05
    state, cfg = make_state([f"bissl.lam={lam}", f"bissl.delta={delta}", f"bissl.gamma={gamma}",
                             f"pretext.temperature={tau}", f"bissl.upper_lr={lr}", "bissl.upper_weight_decay=0",
                             "bissl.upper_grad_clip=null", f"bissl.solver={solver}", "bissl.solver_tol=1e-12",
                             *extra])
    pairs, _ = batches(6)
    system = build_system(state, stage_losses(cfg, state.lower)[1], pairs, cfg.bissl, INFO)
    expected_type = hypergrad.RecycledCG if solver == "recycled_cg" else hypergrad.Refinement
    assert isinstance(system.solver, expected_type)
    for step in range(2):  # recycled_cg: the second solve starts from the first one's directions
        _, down = batches(20 + step)
        expected, x, v = expected_upper_gradients(state, pairs, down, lam, delta, gamma, tau)
        assert rel(x, v) > (0.1 if delta < 1 else 0.02)  # the identity solver (x = v) would fail
        before = {k: p.detach().clone() for k, p in state.upper.named_parameters()}
        momentum = {k: state.upper_opt.state[p].get("momentum_buffer") for k, p in state.upper.named_parameters()}
        momentum = {k: None if m is None else m.clone() for k, m in momentum.items()}
        lr_now = state.upper_sched.get_last_lr()[0]
        record = upper_step(state, system, down, cfg.bissl, INFO)
        assert record["skipped"] == 0.0 and record["solve_rel_residual"] < 1e-11
        scale = flat(list(expected.values())).norm()
        for k, p in state.upper.named_parameters():
            buf = (before[k] - p.detach()) / lr_now
            prev = momentum[k]
            grad = buf if prev is None else buf - cfg.bissl.upper_momentum * prev
            assert float((grad - expected[k]).norm() / scale) < 1e-8, (solver, step, k)


@pytest.mark.parametrize("solver", ["mixed_refinement", "subsampled_refinement", "recycled_cg"])
def test_one_alternation_runs_with_each_new_solver(solver: str) -> None:
    state, cfg = make_state([f"bissl.solver={solver}", "bissl.lower_steps=1", "bissl.upper_steps=3"])
    state.lower.float()
    state.upper.float()
    b = cfg.bissl
    pairs, _ = batches(3)
    pairs = tuple(t.float() for t in pairs)
    uppers = []
    for seed in range(b.upper_steps):
        x, y = batches(30 + seed)[1]
        uppers.append((x.float(), y))
    lower, upper, _ = alternation(state, stage_losses(cfg, state.lower), [pairs], pairs, uppers, b, INFO)
    assert len(lower) == 1 and len(upper) == 3
    for record in upper:
        assert record["skipped"] == 0.0
        if solver == "recycled_cg":
            assert record["solve_num_hvp"] == b.solver_iterations and record["solve_inner_hvp"] == 0
        else:  # default [2, 2]: 4 low-precision HVPs, 1 float32 residual between the corrections
            assert record["solve_inner_hvp"] == sum(b.refine_inner_iterations) == 4
            assert record["solve_num_hvp"] == len(b.refine_inner_iterations) - 1 == 1
    assert state.num_hvp == sum(r["solve_num_hvp"] + r["solve_inner_hvp"] for r in upper)
    for p in state.upper.parameters():
        assert torch.isfinite(p).all()
