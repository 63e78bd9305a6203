"""Tiny float64 BiSSL problems and independent truths shared by the stage tests.

A plain module (not a conftest) so that processes spawned by the distributed test import it by
name. Truths are built without the stage's code: NT-Xent written out, the pretext loss through
``torch.func.functional_call`` with cloned buffers, dense Hessians by double backward.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from bissl.config import load_config
from bissl.distributed import DistInfo
from bissl.models import Classifier, LinearHead
from bissl.stages.bilevel import BiSSLState, lower_optimizer, upper_optimizer
from bissl.stages.pretext import SimCLRNet
from torch import Tensor, nn
from torch.func import functional_call

INFO = DistInfo()
N_PAIRS, N_DOWN, CLASSES, SIDE = 12, 8, 3, 4
FEAT = 2 * SIDE * SIDE


def tiny_backbone() -> nn.Module:
    """Conv + train-mode BN + tanh, flattened: 24 parameters, 4 BN buffers."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten())


def make_state(overrides: list[str], seed: int = 0) -> tuple[BiSSLState, Any]:
    """A float64 BiSSL state on tiny BN networks; theta_D = theta_P + a perturbation."""
    cfg = load_config("digits", ["pretext.lars_exclude_bias_and_norm=false", *overrides])
    torch.manual_seed(seed)
    lower = SimCLRNet(tiny_backbone(), nn.Linear(FEAT, 4)).double()
    with torch.no_grad():  # BN makes the loss invariant to the conv scale: H shrinks by 1/100,
        lower.backbone[0].weight.mul_(10.0)  # so I + H/(lam+delta) is positive definite at 1.0
    upper = Classifier(copy.deepcopy(lower.backbone), LinearHead(FEAT, CLASSES)).double()
    with torch.no_grad():
        for p in upper.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    lower_opt, lower_sched = lower_optimizer(cfg, lower)
    upper_opt, upper_sched = upper_optimizer(cfg, upper)
    return BiSSLState(lower, upper, lower_opt, lower_sched, upper_opt, upper_sched), cfg


def batches(seed: int = 1) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pairs = (torch.randn(N_PAIRS, 1, SIDE, SIDE, generator=g, dtype=torch.float64),
             torch.randn(N_PAIRS, 1, SIDE, SIDE, generator=g, dtype=torch.float64))
    down = (torch.randn(N_DOWN, 1, SIDE, SIDE, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (N_DOWN,), generator=g))
    return pairs, down


# --- independent truths -----------------------------------------------------------------------


def nt_xent_reference(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    sim = sim - torch.diag(torch.full((2 * n,), math.inf, dtype=z.dtype))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def pretext_loss_reference(net: SimCLRNet, backbone: dict[str, Tensor], pairs: tuple[Tensor, Tensor],
                           tau: float) -> Tensor:
    """Separate passes per view, BN in train mode, buffers cloned (never updated)."""
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state.update({k: v for k, v in net.named_parameters() if k.startswith("projector.")})
    state.update({k: b.clone() for k, b in net.named_buffers()})
    z1 = functional_call(net, state, (pairs[0],))
    z2 = functional_call(net, state, (pairs[1],))
    return nt_xent_reference(z1, z2, tau)


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vector[i:i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def expected_upper_gradients(state: BiSSLState, pairs: tuple[Tensor, Tensor], down: tuple[Tensor, Tensor],
                             lam: float, delta: float, gamma: float, tau: float, *, shards: int = 1
                             ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """(expected gradient of every upper parameter, x, v) from a dense solve.

    With ``shards > 1`` the batches are cut into equal shards (one per rank): H, v and every
    gradient are the means of the per-shard ones (BN statistics per shard).
    """
    lower, upper = copy.deepcopy(state.lower), copy.deepcopy(state.upper)
    like = {k: p.detach() for k, p in lower.backbone.named_parameters()}
    theta = flat(list(like.values()))
    pair_shards = list(zip(pairs[0].chunk(shards), pairs[1].chunk(shards), strict=True))
    down_shards = list(zip(down[0].chunk(shards), down[1].chunk(shards), strict=True))
    H = sum(torch.autograd.functional.hessian(
        lambda t, ps=ps: pretext_loss_reference(lower, unflat(t, like), ps, tau), theta)
        for ps in pair_shards) / shards
    A = torch.eye(theta.numel(), dtype=theta.dtype) + H / (lam + delta)
    assert torch.linalg.eigvalsh(A).min() > 0.05, "the test problem must be positive definite"
    head = list(upper.head.parameters())
    names = [k for k, _ in upper.named_parameters()]
    g_p = [torch.zeros_like(p) for p in [*lower.backbone.parameters(), *head]]
    g_d = [torch.zeros_like(p) for p in upper.parameters()]
    for x_d, y in down_shards:
        loss_p = F.cross_entropy(upper.head(lower.backbone(x_d)), y)
        for acc, g in zip(g_p, torch.autograd.grad(loss_p, [*lower.backbone.parameters(), *head]), strict=True):
            acc += g / shards
        loss_d = F.cross_entropy(upper(x_d), y)
        for acc, g in zip(g_d, torch.autograd.grad(loss_d, list(upper.parameters())), strict=True):
            acc += g / shards
    v = flat(g_p[: len(like)])
    x = torch.linalg.solve(A, v)
    gd = dict(zip(names, g_d, strict=True))
    expected = {f"backbone.{k}": xk + gamma * gd[f"backbone.{k}"] for k, xk in unflat(x, like).items()}
    for (k, _), gp in zip(upper.head.named_parameters(), g_p[len(like):], strict=True):
        expected[f"head.{k}"] = gp + gamma * gd[f"head.{k}"]
    return expected, x, v


DIST_SETTINGS = ["bissl.lam=0.1", "bissl.delta=0.9", "bissl.gamma=0.3", "pretext.temperature=0.5",
                 "bissl.upper_lr=0.05", "bissl.upper_weight_decay=0", "bissl.upper_grad_clip=null",
                 "bissl.solver=cg", "bissl.solver_iterations=200", "bissl.solver_tol=1e-13"]


def distributed_upper_step_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """One BiSSL upper step on rank ``rank``'s shard of the batches (gloo, CPU)."""
    import torch.distributed as dist
    from bissl.stages.bilevel import build_system, stage_losses, upper_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        state, cfg = make_state(DIST_SETTINGS)
        pairs, down = batches(7)
        mine = tuple(t.chunk(world)[rank] for t in pairs)
        my_down = tuple(t.chunk(world)[rank] for t in down)
        info = DistInfo(rank=rank, world_size=world)
        system = build_system(state, stage_losses(cfg, state.lower)[1], mine, cfg.bissl, info)  # type: ignore[arg-type]
        record = upper_step(state, system, my_down, cfg.bissl, info)  # type: ignore[arg-type]
        torch.save({"params": {k: p.detach() for k, p in state.upper.named_parameters()},
                    "rel_residual": record["solve_rel_residual"]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def dense_hessian(net: SimCLRNet, pairs: tuple[Tensor, Tensor], tau: float) -> Tensor:
    """Hessian of the reference pretext loss w.r.t. the flattened backbone parameters."""
    like = {k: p.detach() for k, p in net.backbone.named_parameters()}
    theta = flat(list(like.values()))
    return torch.autograd.functional.hessian(
        lambda t: pretext_loss_reference(net, unflat(t, like), pairs, tau), theta)
