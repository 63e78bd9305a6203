"""The BiSSL stage's steps against independent float64 computations.

Truths (``bissl_helpers``) are built without the stage's code: NT-Xent written out, the pretext
loss through ``torch.func.functional_call`` with cloned buffers, the dense Hessian by double
backward (``torch.autograd.functional.hessian``; ``torch.func.hessian`` is wrong for train-mode BN
in torch 2.14.1), ``torch.linalg.solve`` of the damped system, LARS and SGD updates by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from bissl.stages.bilevel import build_system, lower_step, stage_losses, upper_step
from bissl_helpers import (
    INFO,
    batches,
    expected_upper_gradients,
    flat,
    make_state,
    pretext_loss_reference,
    rel,
)
from torch import Tensor

import hypergrad

# --- tests ------------------------------------------------------------------------------------

SETTINGS = [  # (lam, delta, gamma, temperature): lam + delta small, so x differs from v
    (0.1, 0.9, 0.3, 0.5),
    (0.3, 1.2, 1.0, 0.7),
]


@pytest.mark.parametrize("warm_start", [False, True])
@pytest.mark.parametrize(("lam", "delta", "gamma", "tau"), SETTINGS)
def test_upper_steps_equal_dense_solve(lam: float, delta: float, gamma: float, tau: float,
                                       warm_start: bool) -> None:
    lr = 0.05
    state, cfg = make_state([f"bissl.lam={lam}", f"bissl.delta={delta}", f"bissl.gamma={gamma}",
                             f"pretext.temperature={tau}", f"bissl.upper_lr={lr}", "bissl.upper_weight_decay=0",
                             "bissl.upper_grad_clip=null", "bissl.solver=cg", "bissl.solver_iterations=200",
                             "bissl.solver_tol=1e-13", f"bissl.warm_start={str(warm_start).lower()}"])
    b = cfg.bissl
    pairs, _ = batches(1)
    _, hessian_loss = stage_losses(cfg, state.lower)
    system = build_system(state, hessian_loss, pairs, b, INFO)
    for step in range(2):  # the second step warm-starts from the first when asked
        _, down = batches(10 + step)
        expected, x, v = expected_upper_gradients(state, pairs, down, lam, delta, gamma, tau)
        assert rel(x, v) > 0.1  # the identity solver (x = v) would fail this test
        before = {k: p.detach().clone() for k, p in state.upper.named_parameters()}
        momentum = {k: state.upper_opt.state[p].get("momentum_buffer") for k, p in state.upper.named_parameters()}
        momentum = {k: None if m is None else m.clone() for k, m in momentum.items()}
        lr_now = state.upper_sched.get_last_lr()[0]
        record = upper_step(state, system, down, b, INFO, warm_start=b.warm_start)
        assert record["skipped"] == 0.0 and record["solve_rel_residual"] < 1e-11
        # + the warm start's residual, + the product that confirms a tolerance solve's true residual
        assert record["solve_num_hvp"] == record["solve_iterations"] + (1 if warm_start and step else 0) + 1
        scale = flat(list(expected.values())).norm()
        for k, p in state.upper.named_parameters():
            # SGD with momentum m: buf = m * buf + g; p -= lr * buf
            buf = (before[k] - p.detach()) / lr_now
            prev = momentum[k]
            grad = buf if prev is None else buf - cfg.bissl.upper_momentum * prev
            assert float((grad - expected[k]).norm() / scale) < 1e-8, k


@pytest.mark.parametrize(("lam", "trust", "tau"), [(0.001, 0.001, 0.5), (0.3, 0.02, 0.2)])
def test_lower_step_equals_hand_computed_lars_update(lam: float, trust: float, tau: float) -> None:
    lr, wd = 0.7, 1e-3
    state, cfg = make_state([f"bissl.lam={lam}", f"pretext.trust_coefficient={trust}",
                             f"pretext.temperature={tau}", f"bissl.lower_lr={lr}",
                             f"bissl.lower_weight_decay={wd}", "bissl.lower_grad_clip=null"])
    pairs, _ = batches(2)
    net = copy.deepcopy(state.lower)
    params = dict(net.named_parameters())
    backbone = {k.removeprefix("backbone."): p for k, p in params.items() if k.startswith("backbone.")}
    theta_d = {k: p.detach() for k, p in state.upper.backbone.named_parameters()}
    loss = pretext_loss_reference(net, backbone, pairs, tau)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    expected = {}
    for k, p in params.items():
        g = grads[k]
        if k.startswith("backbone."):
            g = g + lam * (p.detach() - theta_d[k.removeprefix("backbone.")])  # proximal gradient
        d = g + wd * p.detach()
        p_norm, d_norm = p.detach().norm(), d.norm()
        q = trust * p_norm / (d_norm + 1e-8) if p_norm > 0 and d_norm > 0 else 1.0  # LARS trust ratio
        expected[k] = p.detach() - lr * q * d

    train_loss, _ = stage_losses(cfg, state.lower)
    buffers_before = {k: b.clone() for k, b in state.lower.named_buffers()}
    lower_step(state.lower, state.lower_opt, state.lower_sched, train_loss, pairs, cfg.bissl, INFO,
               anchor=dict(state.upper.backbone.named_parameters()), lam=lam)
    for k, p in state.lower.named_parameters():
        assert rel(p.detach(), expected[k]) < 1e-12, k

    # The proximal term touches no buffer and no projector parameter: same step with lam = 0.
    plain, cfg0 = make_state([f"pretext.trust_coefficient={trust}", f"pretext.temperature={tau}",
                              f"bissl.lower_lr={lr}", f"bissl.lower_weight_decay={wd}",
                              "bissl.lower_grad_clip=null"])
    for k, b in plain.lower.named_buffers():
        assert torch.equal(b, buffers_before[k])
    lower_step(plain.lower, plain.lower_opt, plain.lower_sched, stage_losses(cfg0, plain.lower)[0], pairs,
               cfg0.bissl, INFO, anchor=None, lam=0.0)
    for (k, b), (_, b0) in zip(state.lower.named_buffers(), plain.lower.named_buffers(), strict=True):
        assert torch.equal(b, b0), k
    for (k, p), (_, p0) in zip(state.lower.named_parameters(), plain.lower.named_parameters(), strict=True):
        if k.startswith("projector."):
            assert torch.equal(p, p0), k
        elif p.dim() > 1:
            assert not torch.equal(p, p0), k  # the backbone does feel the proximal term


@pytest.mark.parametrize("hvp_updates_bn", [False, True])
def test_hvp_buffer_policy(hvp_updates_bn: bool) -> None:
    state, cfg = make_state([f"bissl.hvp_updates_bn={str(hvp_updates_bn).lower()}", "bissl.reuse_graph=false"])
    pairs, down = batches(3)
    # What the v computation alone does to theta_P's buffers: one train-mode forward on x_d.
    probe = copy.deepcopy(state.lower.backbone)
    probe(down[0])
    expected = dict(probe.named_buffers())
    _, hessian_loss = stage_losses(cfg, state.lower)
    system = build_system(state, hessian_loss, pairs, cfg.bissl, INFO)
    record = upper_step(state, system, down, cfg.bissl, INFO)
    assert record["solve_num_hvp"] == 5
    changed = [k for k, b in state.lower.backbone.named_buffers()
               if k.endswith("running_mean") and not torch.equal(b, expected[k])]
    assert (len(changed) > 0) == hvp_updates_bn


def test_graph_reuse_equals_rebuild_and_counts_products(monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[int] = []
    original = hypergrad.HessianOperator.matmat

    def counting(self: hypergrad.HessianOperator, X: dict[str, Tensor]) -> dict[str, Tensor]:
        counted.append(next(iter(X.values())).shape[0])
        return original(self, X)

    monkeypatch.setattr(hypergrad.HessianOperator, "matmat", counting)
    finals = []
    for reuse in (True, False):
        counted.clear()
        state, cfg = make_state([f"bissl.reuse_graph={str(reuse).lower()}", "bissl.delta=1.0",
                                 "bissl.solver_iterations=7"])
        pairs, _ = batches(4)
        system = build_system(state, stage_losses(cfg, state.lower)[1], pairs, cfg.bissl, INFO)
        logged = 0
        for step in range(3):
            logged += int(upper_step(state, system, batches(20 + step)[1], cfg.bissl, INFO)["solve_num_hvp"])
        assert logged == sum(counted) == 3 * 7
        finals.append(torch.cat([p.detach().reshape(-1) for p in state.upper.parameters()]))
    assert float((finals[0] - finals[1]).abs().max()) < 1e-12


def test_bad_solve_is_skipped_or_stops() -> None:
    from bissl.stages.bilevel import BadSolveError

    pairs, down = batches(5)
    for policy in ("skip", "stop"):
        state, cfg = make_state([f"bissl.on_bad_solve={policy}"])
        system = build_system(state, stage_losses(cfg, state.lower)[1], pairs, cfg.bissl, INFO)
        nan_operator = hypergrad.FunctionOperator(lambda x: {k: v * float("nan") for k, v in x.items()},
                                                  symmetric=True)
        system.operator = nan_operator
        before = [p.detach().clone() for p in state.upper.parameters()]
        if policy == "stop":
            with pytest.raises(BadSolveError, match="non-finite"):
                upper_step(state, system, down, cfg.bissl, INFO)
        else:
            record = upper_step(state, system, down, cfg.bissl, INFO)
            assert record["skipped"] == 1.0 and record["solve_nonfinite"] == 1.0
        assert all(torch.equal(a, p) for a, p in zip(before, state.upper.parameters(), strict=True))
        assert state.skipped == 1


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_two_gloo_ranks_equal_single_process_truth(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-rank losses: the averaged system is the mean of the per-shard Hessians (see the stage's
    docstring); the truth is a dense solve of that mean in one process."""
    import torch.multiprocessing as mp
    from bissl_helpers import DIST_SETTINGS, distributed_upper_step_worker

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(distributed_upper_step_worker, args=(2, f"file://{tmp_path / 'rdv'}", str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    state, _ = make_state(DIST_SETTINGS)
    pairs, down = batches(7)
    expected, x, v = expected_upper_gradients(state, pairs, down, 0.1, 0.9, 0.3, 0.5, shards=2)
    assert rel(x, v) > 0.1
    single, _, _ = expected_upper_gradients(state, pairs, down, 0.1, 0.9, 0.3, 0.5, shards=1)
    scale = flat(list(expected.values())).norm()
    assert float((flat(list(single.values())) - flat(list(expected.values()))).norm() / scale) > 1e-3
    for res in ranks:
        assert res["rel_residual"] < 1e-11
        for k, p in state.upper.named_parameters():
            grad = (p.detach() - res["params"][k]) / 0.05
            assert float((grad - expected[k]).norm() / scale) < 1e-8, k
    for k in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k])


@pytest.mark.parametrize(("solver", "extra"), [("minres", []), ("nystrom_pcg", ["bissl.nystrom_rank=6"]),
                                               ("neumann", ["bissl.neumann_alpha=1.0"]), ("identity", [])])
def test_every_configured_solver_reaches_its_answer(solver: str, extra: list[str]) -> None:
    """Each solver option, solved to convergence, gives the dense solve's update; identity gives x = v."""
    lam, delta, gamma, tau, lr = 0.1, 0.9, 0.3, 0.5, 0.05
    iterations = 0 if solver == "identity" else 300
    state, cfg = make_state([f"bissl.lam={lam}", f"bissl.delta={delta}", f"bissl.gamma={gamma}",
                             f"pretext.temperature={tau}", f"bissl.upper_lr={lr}", "bissl.upper_weight_decay=0",
                             "bissl.upper_grad_clip=null", f"bissl.solver={solver}",
                             f"bissl.solver_iterations={iterations}", "bissl.solver_tol=0", *extra])
    pairs, down = batches(6)
    expected, x, v = expected_upper_gradients(state, pairs, down, lam, delta, gamma, tau)
    if solver == "identity":  # x = v: the backbone gradient is v + gamma * grad at theta_D
        expected = {k: e - (x_k if k.startswith("backbone.") else 0) + (v_k if k.startswith("backbone.") else 0)
                    for (k, e), x_k, v_k in zip(expected.items(), [*unflat_like(x, state), *[0, 0]],
                                                [*unflat_like(v, state), *[0, 0]], strict=True)}
    before = {k: p.detach().clone() for k, p in state.upper.named_parameters()}
    system = build_system(state, stage_losses(cfg, state.lower)[1], pairs, cfg.bissl, INFO)
    record = upper_step(state, system, down, cfg.bissl, INFO)
    assert record["skipped"] == 0.0
    assert record["solve_num_hvp"] == iterations  # the Nystrom sketch is counted once, in setup_hvp
    assert system.setup_hvp == (6 if solver == "nystrom_pcg" else 0)
    scale = flat(list(expected.values())).norm()
    for k, p in state.upper.named_parameters():
        grad = (before[k] - p.detach()) / lr
        assert float((grad - expected[k]).norm() / scale) < 1e-8, (solver, k)


def unflat_like(vector: Tensor, state: object) -> list[Tensor]:
    """Split a flat backbone vector into the backbone's parameter shapes (in order)."""
    out, i = [], 0
    for p in state.lower.backbone.parameters():  # type: ignore[attr-defined]
        out.append(vector[i:i + p.numel()].reshape(p.shape))
        i += p.numel()
    return out


@pytest.mark.parametrize(("override", "field"), [
    ("bissl.solver_iterations=0", "bissl.solver_iterations"),
    ("bissl.solver=gauss", "bissl.solver"),
    ("bissl.lam=0", "bissl.lam"),
    ("bissl.lower_batch_size=4096", "bissl.lower_batch_size"),
])
def test_bad_bissl_settings_name_the_field(override: str, field: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bissl.cli import main

    assert main(["validate", "--set", override]) == 2  # ConfigError -> exit 2, message on stderr
    assert field in capsys.readouterr().err


def test_bad_bissl_settings_messages(capsys: pytest.CaptureFixture[str]) -> None:
    from bissl.cli import main

    main(["validate", "--set", "bissl.solver_iterations=0"])
    err = capsys.readouterr().err
    assert "bissl.solver_iterations" in err and "Fix:" in err
    main(["validate", "--set", "bissl.upper_batch_size=5000"])
    err = capsys.readouterr().err
    assert "bissl.upper_batch_size: got 5000" in err
