r"""The BiSSL stage: alternating pretext (lower) and downstream (upper) steps.

State: the lower backbone :math:`\theta_P` with the SimCLR projector :math:`\phi_P`, and the upper
backbone :math:`\theta_D` with the linear head :math:`\phi_D`. Both backbones start from the
pretext checkpoint, :math:`\phi_D` from the linear warm-up.

Each alternation runs

1. ``lower_steps`` LARS steps on :math:`L_P(\theta_P, \phi_P) + \frac{\lambda}{2}\|\theta_P -
   \theta_D\|^2` (backbone *parameters* only in the proximal term; :math:`\theta_D` constant),
2. draws one Hessian batch and fixes :math:`H = \nabla^2_{\theta_P} L_P` there (projector held
   fixed): its gradient graph (or a Nystrom sketch) is built once and serves every upper step,
3. ``upper_steps`` SGD steps, each with

   .. math::
       v = \nabla_{\theta_P} L_D(\theta_P, \phi_D), \qquad
       \Big(I + \frac{H}{\lambda + \delta}\Big)\, x = v,

       g_{\theta_D} = x + \gamma \nabla_{\theta} L_D(\theta_D, \phi_D), \qquad
       g_{\phi_D} = \nabla_{\phi} L_D(\theta_P, \phi_D) + \gamma \nabla_{\phi} L_D(\theta_D, \phi_D).

The system is the reference code's: :math:`x = (\lambda+\delta)(H + (\lambda+\delta) I)^{-1} v`,
solved with :meth:`hypergrad.DampedOperator.bissl_system`. It is *not* routed through
:func:`hypergrad.implicit_grad`, whose damped IFT term is :math:`\lambda/(\lambda+\delta)` times
this one (see ``docs/bissl.md``). A solve that is non-finite or breaks down is never zeroed:
what happens is decided per :class:`hypergrad.Result` (:data:`SOLVE_OUTCOMES`):
``bissl.on_bad_solve`` skips that upper step (logged), stops the stage at its last checkpoint, or
(``truncate``, for a CG breakdown) uses the iterate CG froze before the non-positive curvature.

Under ``torchrun`` v, every product and the written gradients are averaged across ranks, so all
ranks solve the same system. The Hessian is that of the *mean of the per-rank losses* (each rank's
NT-Xent on its own shard, as the reference's later versions do): the NT-Xent all-gather is not
twice differentiable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import hypergrad
from bissl.augment import TwoViewDataset, normalization_stats, simclr_views
from bissl.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from bissl.config import REFINEMENT_SOLVERS, BiSSLConfig, RunConfig
from bissl.data import DatasetSpec
from bissl.distributed import (
    DistInfo,
    average_gradients,
    barrier,
    epoch_batches,
    on_main,
    resolve_device,
)
from bissl.models import Classifier
from bissl.optim import LARS, lars_param_groups, warmup_cosine
from bissl.pretext_loss import PretextBatch, PretextLoss, simclr_loss
from bissl.rundir import RunDir
from bissl.stages._common import (
    Splits,
    StepHook,
    cpu_state,
    downstream_datasets,
    eval_loader,
    evaluate_classifier,
    new_classifier,
    seed_everything,
    seeded_item,
    start_or_resume,
    warmup_parts,
)
from bissl.stages.pretext import SimCLRNet, build_simclr, prepare_simclr

STAGE = "bissl"


class BadSolveError(RuntimeError):
    """A solve was non-finite or broke down and ``bissl.on_bad_solve`` is ``"stop"``."""


# ---------------------------------------------------------------------------------------------
# Models, optimisers and the pieces of one alternation


@dataclass
class BiSSLState:
    """Everything an alternation changes (checkpointed whole)."""

    lower: SimCLRNet
    upper: Classifier
    lower_opt: LARS
    lower_sched: Any
    upper_opt: torch.optim.SGD
    upper_sched: Any
    alternation: int = 0
    previous_solution: hypergrad.Tree | None = None
    skipped: int = 0
    num_hvp: int = 0

    def payload(self) -> dict[str, Any]:
        """Checkpoint dict (RNG states are added by :func:`save_checkpoint`)."""
        return {"lower": self.lower.state_dict(), "upper": self.upper.state_dict(),
                "lower_opt": self.lower_opt.state_dict(), "lower_sched": self.lower_sched.state_dict(),
                "upper_opt": self.upper_opt.state_dict(), "upper_sched": self.upper_sched.state_dict(),
                "alternation": self.alternation, "previous_solution": self.previous_solution,
                "skipped": self.skipped, "num_hvp": self.num_hvp}

    def load(self, payload: dict[str, Any]) -> None:
        """Inverse of :meth:`payload` (RNG states are restored by the caller)."""
        self.lower.load_state_dict(payload["lower"])
        self.upper.load_state_dict(payload["upper"])
        self.lower_opt.load_state_dict(payload["lower_opt"])
        self.lower_sched.load_state_dict(payload["lower_sched"])
        self.upper_opt.load_state_dict(payload["upper_opt"])
        self.upper_sched.load_state_dict(payload["upper_sched"])
        self.alternation = int(payload["alternation"])
        self.previous_solution = payload["previous_solution"]
        self.skipped, self.num_hvp = int(payload["skipped"]), int(payload["num_hvp"])


def lower_optimizer(cfg: RunConfig, net: SimCLRNet) -> tuple[LARS, Any]:
    """LARS over backbone + projector with a warm-up + cosine schedule over all lower steps.

    Shared by the BiSSL lower steps and the conventional arm's continued pretext training.
    """
    b = cfg.bissl
    opt = LARS(lars_param_groups(net, exclude_bias_and_norm=cfg.pretext.lars_exclude_bias_and_norm),
               lr=b.lower_lr, momentum=b.lower_momentum, weight_decay=b.lower_weight_decay,
               trust_coefficient=cfg.pretext.trust_coefficient)
    sched = warmup_cosine(opt, warmup_steps=b.lower_warmup_steps, total_steps=b.total_lower_steps,
                          final_lr_ratio=b.lower_final_lr_ratio,
                          first_step_full_lr=b.lower_warmup_first_step_full_lr)
    return opt, sched


def upper_optimizer(cfg: RunConfig, model: Classifier) -> tuple[torch.optim.SGD, Any]:
    """SGD over backbone + head with a cosine schedule over all upper steps.

    Shared by the BiSSL upper steps and the conventional+ arm's supervised steps.
    """
    b = cfg.bissl
    opt = torch.optim.SGD(model.parameters(), lr=b.upper_lr, momentum=b.upper_momentum,
                          weight_decay=b.upper_weight_decay)
    sched = warmup_cosine(opt, warmup_steps=0, total_steps=b.total_upper_steps,
                          final_lr_ratio=b.upper_final_lr_ratio)
    return opt, sched


def initial_state(cfg: RunConfig, in_channels: int, upper: Classifier, pretext: dict[str, Any],
                  warmup: tuple[dict[str, Tensor], dict[str, Tensor]] | None, device: torch.device) -> BiSSLState:
    """theta_P, phi_P from the pretext checkpoint; theta_D per ``bissl.upper_init``; phi_D from the warm-up.

    Args:
        upper: a fresh classifier (its head is replaced by the warm-up's when given).
        pretext: the ``pretext-final`` checkpoint ({"model", "backbone"}).
        warmup: (backbone, head) state dicts of the linear warm-up (:func:`warmup_parts`), or
            None without a warm-up. ``upper_init: warmup`` takes theta_D's backbone from it
            (weights equal to the pretext ones, BN statistics adapted to the downstream data).
    """
    if cfg.bissl.upper_init == "warmup" and warmup is None:
        raise ValueError("bissl.upper_init: 'warmup' but there is no linear warm-up. "
                         "Fix: --set warmup.epochs=20, or bissl.upper_init=pretext")
    lower = build_simclr(cfg, in_channels)
    lower.load_state_dict(pretext["model"])
    use_warmup = cfg.bissl.upper_init == "warmup" and warmup is not None
    upper.backbone.load_state_dict(warmup[0] if use_warmup else pretext["backbone"])  # type: ignore[index]
    if warmup is not None:
        upper.head.load_state_dict(warmup[1])
    lower, upper = lower.to(device), upper.to(device)
    lower_opt, lower_sched = lower_optimizer(cfg, lower)
    upper_opt, upper_sched = upper_optimizer(cfg, upper)
    return BiSSLState(lower, upper, lower_opt, lower_sched, upper_opt, upper_sched)


def prepare_lower(net: SimCLRNet, cfg: RunConfig, info: DistInfo) -> SimCLRNet:
    """theta_P's network for the stage: on the device, with plain BatchNorm whatever ``model.sync_bn`` says.

    ``SyncBatchNorm``'s backward has no double backward in torch (pytorch#61222), so the first
    Hessian-vector product through it would fail; the released code, too, uses plain BatchNorm in
    the BiSSL stage (SyncBN only in pretext training and fine-tuning). Each rank normalises
    with its own shard's statistics, as its per-rank loss (see the module docstring) requires.
    """
    return prepare_simclr(net, cfg, info, sync_bn=False)


def load_initial_state(cfg: RunConfig, run: RunDir, spec: DatasetSpec, info: DistInfo) -> BiSSLState:
    """:func:`initial_state` from ``run``'s ``pretext-final`` and ``warmup-final`` checkpoints,
    theta_P prepared for the stage (:func:`prepare_lower`)."""
    pretext = load_checkpoint(run.checkpoint("pretext-final"))
    warmup = warmup_parts(run) if cfg.warmup.epochs > 0 else None
    state = initial_state(cfg, spec.in_channels, new_classifier(cfg, spec), pretext, warmup, info.device)
    state.lower = prepare_lower(state.lower, cfg, info)
    return state


def proximal_penalty(theta_p: hypergrad.Tree, theta_d: hypergrad.Tree, lam: float) -> Tensor:
    r""":math:`\frac{\lambda}{2}\|\theta_P - \theta_D\|^2` over backbone parameters (theta_D constant)."""
    return 0.5 * lam * sum(((theta_p[k] - theta_d[k].detach()) ** 2).sum() for k in theta_p)  # type: ignore[return-value]


def lower_step(net: SimCLRNet, opt: LARS, sched: Any, loss_fn: PretextLoss, batch: PretextBatch,
               b: BiSSLConfig, info: DistInfo, *, anchor: hypergrad.Tree | None, lam: float) -> dict[str, float]:
    r"""One LARS step on the pretext loss + :math:`\frac{\lambda}{2}\|\theta_P - \text{anchor}\|^2`.

    ``anchor`` is theta_D (a constant); ``None`` drops the proximal term: plain continued
    pretext training (the conventional arm). Clips backbone + projector at ``lower_grad_clip``.
    """
    theta_p = dict(net.backbone.named_parameters())
    pretext = loss_fn(theta_p, batch)
    prox = proximal_penalty(theta_p, anchor, lam) if anchor is not None else torch.zeros((), device=pretext.device)
    opt.zero_grad(set_to_none=True)
    (pretext + prox).backward()
    params = list(net.parameters())
    average_gradients(params, info)
    if b.lower_grad_clip is not None:
        nn.utils.clip_grad_norm_(params, b.lower_grad_clip)
    opt.step()
    sched.step()
    return {"loss": pretext.item(), "prox": prox.item(), "lr": sched.get_last_lr()[0]}


def make_solver(b: BiSSLConfig, preconditioner: hypergrad.NystromPreconditioner | None = None) -> hypergrad.Solver:
    """The configured IHVP solver (fixed iterations unless ``solver_tol > 0``)."""
    it, tol = b.solver_iterations, b.solver_tol
    checks = 1 if tol > 0 else None
    if b.solver in ("cg", "nystrom_pcg"):
        return hypergrad.CG(maxiter=it, tol=tol, check_every=checks, preconditioner=preconditioner)
    if b.solver == "layerwise_cg":
        return hypergrad.LayerwiseCG(maxiter=it, tol=tol, check_every=checks)
    if b.solver == "minres":
        return hypergrad.MINRES(maxiter=it, tol=tol, check_every=checks)
    if b.solver == "neumann":
        return hypergrad.Neumann(maxiter=it, tol=tol, check_every=checks, alpha=b.neumann_alpha)
    return hypergrad.Identity()


@dataclass
class LinearSystem:
    r"""The alternation's fixed system :math:`A = I + H/(\lambda+\delta)` and its solver."""

    operator: hypergrad.LinearOperator
    solver: hypergrad.Solver
    setup_hvp: int = 0  # products spent once per alternation (a Nystrom sketch)


def build_system(state: BiSSLState, hessian_loss: PretextLoss, batch: PretextBatch, b: BiSSLConfig,
                 info: DistInfo, *, generator: torch.Generator | None = None) -> LinearSystem:
    """Fix the Hessian at the current theta_P and this batch; build the Nystrom sketch if asked."""
    theta_p = {k: p.detach() for k, p in state.lower.backbone.named_parameters()}
    hessian = hypergrad.HessianOperator(lambda p: hessian_loss(p, batch), theta_p,
                                        reuse_graph=b.reuse_graph)
    operator: hypergrad.LinearOperator = hypergrad.DampedOperator.bissl_system(hessian, b.lam, b.delta)
    if info.distributed:
        operator = hypergrad.DistributedOperator(operator)
    if b.solver in (*REFINEMENT_SOLVERS, "recycled_cg"):
        return LinearSystem(operator, lever_solver(b, operator, hessian_loss, batch, theta_p, info))
    if b.solver != "nystrom_pcg":
        return LinearSystem(operator, make_solver(b))
    # Sketch the damped operator itself (positive definite at a trained backbone; H alone is not).
    pre = hypergrad.NystromPreconditioner.build(operator, theta_p, b.nystrom_rank, generator=generator)
    return LinearSystem(operator, make_solver(b, pre), setup_hvp=pre.num_hvp)


def lever_solver(b: BiSSLConfig, operator: hypergrad.LinearOperator, hessian_loss: PretextLoss,
                 batch: PretextBatch, theta_p: hypergrad.Tree, info: DistInfo) -> hypergrad.Solver:
    """The solvers of issue 20, built once per alternation for its fixed operator.

    ``recycled_cg``: CG with a fresh :class:`hypergrad.KrylovRecycler` (the upper steps share the
    operator). ``mixed_refinement`` / ``subsampled_refinement``: :class:`hypergrad.Refinement` whose
    corrections use the damped operator of the whole (or of a sub-) Hessian batch, with products in
    ``refine_precision`` (:func:`hypergrad.low_precision`), and whose residuals use ``operator``.
    """
    tol, checks = b.solver_tol, (1 if b.solver_tol > 0 else None)
    if b.solver == "recycled_cg":
        return hypergrad.RecycledCG(maxiter=b.solver_iterations, tol=tol, check_every=checks,
                                    recycler=hypergrad.KrylovRecycler(theta_p, b.recycle_capacity),
                                    deflate=b.recycle_deflate)
    inner_operator = operator
    if b.solver == "subsampled_refinement":
        pairs = b.refine_inner_pairs or max(1, batch[0].shape[0] // 2)
        sub = (batch[0][:pairs], batch[1][:pairs])
        hessian = hypergrad.HessianOperator(lambda p: hessian_loss(p, sub), theta_p, reuse_graph=b.reuse_graph)
        inner_operator = hypergrad.DampedOperator.bissl_system(hessian, b.lam, b.delta)
        if info.distributed:
            inner_operator = hypergrad.DistributedOperator(inner_operator)
    if b.refine_precision != "float32":
        inner_operator = hypergrad.low_precision(inner_operator, getattr(torch, b.refine_precision))
    inner = tuple(hypergrad.CG(maxiter=k, tol=0.0) if k > 0 else hypergrad.Identity()
                  for k in b.refine_inner_iterations)
    return hypergrad.Refinement(inner=inner, inner_operator=inner_operator, maxiter=len(inner), tol=tol,
                                check_every=checks, true_residual=False)


def solve_record(stats: hypergrad.SolveStats) -> dict[str, float]:
    """The scalars of one solve for the metrics log (synchronises once)."""
    rel = stats.relative_residual
    return {"solve_iterations": stats.iterations, "solve_num_hvp": stats.num_hvp, "solve_inner_hvp": stats.inner_hvp,
            "solve_residual": float(stats.residual_norm), "solve_rel_residual": float(rel),
            "solve_breakdown": float(bool(stats.breakdown)), "solve_nonfinite": float(bool(stats.nonfinite)),
            "solve_min_curvature": float("nan") if stats.min_curvature is None else float(stats.min_curvature),
            "solve_checked": float(stats.checked)}


# What a solve's outcome leaves to use, per hypergrad.Result (add new results here):
#   "answer"    the value is the solver's answer (converged, or its fixed iterations ran);
#   "truncated" the value is the last iterate before a failure (CG froze it at non-positive
#               curvature): used only with bissl.on_bad_solve=truncate (Steihaug's rule);
#   "unusable"  nothing usable (non-finite): the step is skipped, or the stage stops.
SolveOutcome = Literal["answer", "truncated", "unusable"]
SOLVE_OUTCOMES: Mapping[hypergrad.Result, SolveOutcome] = MappingProxyType({
    hypergrad.Result.CONVERGED: "answer",
    hypergrad.Result.MAX_ITERATIONS: "answer",
    hypergrad.Result.UNCHECKED: "answer",
    hypergrad.Result.BREAKDOWN: "truncated",
    # CG froze its iterate before a numerically zero pivot of I + H/(lam + delta) (H has an
    # eigenvalue ~ -(lam + delta) there): the same truncation as a breakdown.
    hypergrad.Result.SINGULAR: "truncated",
    # A solve with a tolerance whose recurrence drifted: the true residual is logged; still an answer.
    hypergrad.Result.INACCURATE: "answer",
    # Neumann / refinement whose residual grew: the iterate is worse than x = 0.
    hypergrad.Result.DIVERGED: "unusable",
    hypergrad.Result.NONFINITE: "unusable",
})


def solve_decision(result: hypergrad.Result, solver: hypergrad.Solver, b: BiSSLConfig) -> Literal["use", "skip", "stop"]:
    """What the upper step does with a solve that ended ``result``.

    A breakdown of a solver that keeps iterating past it (``layerwise_cg``, as the reference) is
    its ordinary answer. A breakdown of a solver that froze its iterate (``cg``) is used only
    with ``on_bad_solve: truncate``; otherwise ``on_bad_solve`` skips the step or stops.
    """
    if result not in SOLVE_OUTCOMES:
        raise KeyError(f"hypergrad.Result.{result.name} has no entry in bissl.stages.bilevel.SOLVE_OUTCOMES; "
                       "add one ('answer', 'truncated' or 'unusable')")
    outcome = SOLVE_OUTCOMES[result]
    if outcome == "answer" or (outcome == "truncated" and (not solver.freezes_on_breakdown
                                                          or b.on_bad_solve == "truncate")):
        return "use"
    return "stop" if b.on_bad_solve == "stop" else "skip"


def upper_step(state: BiSSLState, system: LinearSystem, batch: tuple[Tensor, Tensor], b: BiSSLConfig,
               info: DistInfo, *, warm_start: bool = False) -> dict[str, float]:
    """One upper step: v at theta_P, the solve, the gamma terms, clipping and an SGD step."""
    x, y = batch
    ce = nn.functional.cross_entropy
    lower_backbone, upper = state.lower.backbone, state.upper
    theta_p = dict(lower_backbone.named_parameters())
    head = dict(upper.head.named_parameters())

    # v and the head gradient at theta_P (this forward updates theta_P's BN buffers, as the reference)
    loss_p = ce(upper.head(lower_backbone(x)), y)
    grads = torch.autograd.grad(loss_p, [*theta_p.values(), *head.values()])
    v = hypergrad.all_reduce_mean(dict(zip(theta_p, grads[: len(theta_p)], strict=True)))
    head_p = hypergrad.all_reduce_mean(dict(zip(head, grads[len(theta_p):], strict=True)))

    x0 = state.previous_solution if warm_start else None
    solution = system.solver.solve(system.operator, v, x0)
    record = {"loss_lower_model": loss_p.item(), **solve_record(solution.stats)}
    state.num_hvp += solution.stats.num_hvp + solution.stats.inner_hvp  # inner: cheaper (Refinement's)
    result = solution.result
    decision = solve_decision(result, system.solver, b)
    record["truncated"] = float(decision == "use" and SOLVE_OUTCOMES[result] == "truncated"
                                and system.solver.freezes_on_breakdown)
    if decision != "use":
        state.skipped += 1
        if decision == "stop":
            raise BadSolveError(
                f"alternation {state.alternation}: the IHVP solve ended {result.name} ({result.message}). "
                "Stopped at the last checkpoint. Fix: more damping (bissl.delta), a lower "
                "bissl.upper_lr / bissl.lower_lr, bissl.on_bad_solve=truncate (a breakdown) or skip")
        state.upper_opt.step()  # no gradients: a no-op that keeps the schedule's length
        state.upper_sched.step()
        return {**record, "skipped": 1.0, "lr": state.upper_sched.get_last_lr()[0]}
    state.previous_solution = {k: t.detach() for k, t in solution.value.items()}

    # gradients at theta_D
    loss_d = ce(upper(x), y)
    upper_params = dict(upper.named_parameters())
    grads_d = dict(zip(upper_params, torch.autograd.grad(loss_d, list(upper_params.values())), strict=True))
    grads_d = hypergrad.all_reduce_mean(grads_d)
    for k, p in upper.backbone.named_parameters():
        p.grad = solution.value[k] + b.gamma * grads_d[f"backbone.{k}"]
    for k, p in upper.head.named_parameters():
        p.grad = head_p[k] + b.gamma * grads_d[f"head.{k}"]
    if b.upper_grad_clip is not None:
        nn.utils.clip_grad_norm_(list(upper.parameters()), b.upper_grad_clip)
    state.upper_opt.step()
    state.upper_opt.zero_grad(set_to_none=True)
    state.upper_sched.step()
    return {**record, "loss_upper_model": loss_d.item(), "skipped": 0.0,
            "lr": state.upper_sched.get_last_lr()[0]}


def alternation(state: BiSSLState, losses: tuple[PretextLoss, PretextLoss], lower_batches: Sequence[PretextBatch] | Iterator[PretextBatch],
                hessian_batch: PretextBatch, upper_batches: Sequence[tuple[Tensor, Tensor]] | Iterator[tuple[Tensor, Tensor]],
                b: BiSSLConfig, info: DistInfo, *,
                generator: torch.Generator | None = None) -> tuple[list[dict[str, float]], list[dict[str, float]], dict[str, float]]:
    """One alternation on given batches; returns (lower records, upper records, timings)."""
    train_loss, hessian_loss = losses
    t0 = time.perf_counter()
    state.lower.train()
    state.upper.train()
    anchor = dict(state.upper.backbone.named_parameters())
    lower = [lower_step(state.lower, state.lower_opt, state.lower_sched, train_loss, batch, b, info,
                        anchor=anchor, lam=b.lam) for batch in lower_batches]
    t1 = time.perf_counter()
    system = build_system(state, hessian_loss, hessian_batch, b, info, generator=generator)
    state.num_hvp += system.setup_hvp
    upper = [upper_step(state, system, batch, b, info, warm_start=b.warm_start) for batch in upper_batches]
    t2 = time.perf_counter()
    state.alternation += 1
    return lower, upper, {"lower_s": t1 - t0, "upper_s": t2 - t1, "setup_hvp": system.setup_hvp}


def stage_losses(cfg: RunConfig, net: SimCLRNet, *, gather: bool = True) -> tuple[PretextLoss, PretextLoss]:
    """(training loss of the lower steps, loss whose Hessian is taken): one pretext loss.

    ``gather=False`` keeps the training loss on this process's batch even under torchrun (a
    dry run on one rank must not enter a collective).
    """
    p = cfg.pretext
    train = simclr_loss(net, temperature=p.temperature, view_passes=p.view_passes, update_buffers=True,
                        gather_distributed=gather)
    hessian = simclr_loss(net, temperature=p.temperature, view_passes=p.view_passes,
                          update_buffers=cfg.bissl.hvp_updates_bn, gather_distributed=False)
    return train, hessian


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable batch streams


def stream_seed(seed: int, stream: int) -> int:
    """Independent seeds for the lower, Hessian and downstream streams of one run seed."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]) % 2**31


class _EpochItems(Dataset):
    """``dataset[i]`` with the torch RNG seeded from (seed, epoch, i); keys are (epoch, i)."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        return seeded_item(self.base, seed=self.seed, epoch=epoch, index=index)


@dataclass
class BatchStream:
    """An endless stream of batches: batch ``i`` is a pure function of (seed, i).

    Epochs are reshuffled (``epoch_batches``); a stream that runs past its data starts a new
    epoch, so small downstream sets cycle and every alternation gets exactly its steps.
    ``first_epoch`` continues an earlier stage's epoch numbering (the pretext stage's).
    """

    dataset: Dataset
    batch_size: int
    seed: int
    info: DistInfo
    first_epoch: int = 0
    _cache: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    def keys(self, i: int) -> list[tuple[int, int]]:
        """(epoch, index) keys of batch ``i``."""
        per_epoch = len(self.dataset) // self.batch_size  # type: ignore[arg-type]
        if per_epoch == 0:
            raise ValueError(f"batch size {self.batch_size} exceeds the {len(self.dataset)} items")  # type: ignore[arg-type]
        epoch = self.first_epoch + i // per_epoch
        if epoch not in self._cache:
            self._cache = {epoch: epoch_batches(len(self.dataset), self.batch_size, epoch=epoch,  # type: ignore[arg-type]
                                                seed=self.seed, info=self.info)}
        return [(epoch, j) for j in self._cache[epoch][i % per_epoch]]

    def first_of_pass(self, i: int) -> int:
        """Index of the first batch of the pass (epoch) that batch ``i`` belongs to."""
        per_epoch = len(self.dataset) // self.batch_size  # type: ignore[arg-type]
        return i - i % per_epoch

    def batches(self, start: int, count: int, cfg: RunConfig) -> Iterator[Any]:
        """Batches ``start .. start + count - 1`` on the device."""
        yield from self.load([self.keys(i) for i in range(start, start + count)], cfg)

    def load(self, keys: list[list[tuple[int, int]]], cfg: RunConfig) -> Iterator[Any]:
        """Batches of the given (epoch, index) keys on the device, augmented with this stream's seed."""
        data = DataLoader(_EpochItems(self.dataset, self.seed), batch_sampler=keys,
                          num_workers=cfg.data.num_workers, pin_memory=self.info.device.type == "cuda")
        for batch in data:
            yield tuple(t.to(self.info.device, non_blocking=True) for t in batch)


def pretext_pairs(cfg: RunConfig, splits: Splits) -> TwoViewDataset:
    """The pretext split with the SimCLR two-view augmentation."""
    mean, std = normalization_stats(cfg.data.pretext_name)
    a = cfg.augment
    view1, view2 = simclr_views(cfg.data.image_size, in_channels=splits.spec.in_channels,
                                aspect_ratio_quirk=a.aspect_ratio_quirk, scale=a.crop_scale, blur=a.blur,
                                hflip=a.hflip, mean=mean, std=std)
    return TwoViewDataset(splits.pretext, view1, view2)


@dataclass(frozen=True)
class Streams:
    """The three batch streams of the stage for one run seed."""

    lower: BatchStream
    hessian: BatchStream
    upper: BatchStream

    @classmethod
    def for_seed(cls, cfg: RunConfig, splits: Splits, info: DistInfo, seed: int) -> Streams:
        """Lower and Hessian batches from the pretext pairs, upper from the downstream train set.

        The lower stream continues the pretext stage's epochs, so the conventional arm's
        continued pretext training (same seed) sees exactly the lower steps' images.
        """
        pairs = pretext_pairs(cfg, splits)
        train_aug = downstream_datasets(cfg, splits)[0]
        b = cfg.bissl
        return cls(lower=BatchStream(pairs, b.lower_batch_size, seed, info, first_epoch=cfg.pretext.epochs),
                   hessian=BatchStream(pairs, b.hessian_batch, stream_seed(seed, 1), info),
                   upper=BatchStream(train_aug, b.upper_batch_size, stream_seed(seed, 2), info))


def hessian_batch(streams: Streams, alternation: int, cfg: RunConfig) -> PretextBatch:
    """The Hessian batch of ``alternation`` (drawn after its lower steps), per ``bissl.hessian_batch_source``.

    ``independent``: batch ``alternation`` of the Hessian stream: images and augmentations of
    its own, new every alternation. ``reference`` (the released code): the images of the first
    batch of the lower stream's current pass (the pass of the alternation's last lower step),
    re-augmented (the Hessian stream's seed, keyed by the alternation), so the same images serve
    every alternation until the lower stream starts a new pass.
    """
    b = cfg.bissl
    if b.hessian_batch_source == "independent":
        return next(streams.hessian.batches(alternation, 1, cfg))
    first = streams.lower.first_of_pass((alternation + 1) * b.lower_steps - 1)
    keys = [(alternation, index) for _, index in streams.lower.keys(first)]
    return next(streams.hessian.load([keys], cfg))


# ---------------------------------------------------------------------------------------------
# The stage driver


@dataclass(frozen=True)
class BiSSLResult:
    """Outcome of the stage (accuracies in %)."""

    name: str
    alternations: int
    num_hvp: int
    skipped_steps: int
    seconds_per_alternation: float
    lower_val_top1: float
    upper_val_top1: float
    pretext_images: int
    upper_steps: int

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dict(self.__dict__)


def _log_records(run: RunDir, name: str, state: BiSSLState, b: BiSSLConfig, lower: list[dict[str, float]],
                 upper: list[dict[str, float]], timing: dict[str, float]) -> None:
    a = state.alternation - 1
    for i, rec in enumerate(lower):
        run.log(f"{name}-lower", a * b.lower_steps + i + 1, **rec)
    for i, rec in enumerate(upper):
        run.log(f"{name}-upper", a * b.upper_steps + i + 1, **rec)
    run.log(name, state.alternation, **timing, hvp_total=state.num_hvp, skipped_total=state.skipped)


def _val_top1(cfg: RunConfig, backbone: nn.Module, head: nn.Module, splits: Splits, info: DistInfo) -> float:
    """Validation top-1 of backbone + head (the models are put back in train mode)."""
    model = Classifier(backbone, head)
    _, _, val, _ = downstream_datasets(cfg, splits)
    with torch.random.fork_rng(devices=[]):
        return evaluate_classifier(model, eval_loader(val, cfg, info), info.device, cfg.eval.topk)["top1"]


def run_bissl(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, *, seed: int | None = None,
              name: str = STAGE, resume: bool = False, step_hook: StepHook | None = None) -> BiSSLResult:
    """Run the BiSSL stage from the pretext and warm-up checkpoints of ``run``.

    Writes ``<name>.pt`` every ``bissl.checkpoint_every_alternations`` alternations and
    ``<name>-final.pt`` with the handed-over ``backbone`` (theta_P or theta_D, ``bissl.handover``),
    both models and the result. Logs ``<name>-lower`` (per lower step), ``<name>-upper`` (per
    upper step, with every solve's stats) and ``<name>`` (per alternation) records.

    Args:
        seed: run seed of the stage's batches and head-free randomness (default ``cfg.seed``).
        name: stage name for checkpoints, metrics and results.
        resume: continue from ``<name>.pt``; a finished stage returns its stored result.
        step_hook: called as ``step_hook(name, alternation)`` after every alternation (after its
            checkpoint, if one was written).
    """
    b = cfg.bissl
    seed = cfg.seed if seed is None else seed
    done = run.read_result(name)
    if resume and done is not None:
        return BiSSLResult(**done)
    saved = start_or_resume(run, name, resume=resume)
    seed_everything(seed, deterministic=cfg.deterministic)

    state = load_initial_state(cfg, run, splits.spec, info)
    if saved is not None:
        state.load(saved)
        restore_rng_state(saved["rng"])
        for stage, steps in ((f"{name}-lower", b.lower_steps), (f"{name}-upper", b.upper_steps), (name, 1)):
            run.drop_metrics_after(stage, state.alternation * steps)
        if info.is_main:
            print(f"[{name}] resumed at alternation {state.alternation} of {b.alternations}", flush=True)
    losses = stage_losses(cfg, state.lower)
    streams = Streams.for_seed(cfg, splits, info, seed)

    def save(path_name: str) -> None:
        if info.is_main:
            save_checkpoint(run.checkpoint(path_name), state.payload())

    start_alt, t_start = state.alternation, time.perf_counter()
    bar = tqdm(total=b.alternations, initial=state.alternation, desc=name, disable=not info.is_main,
               dynamic_ncols=True, leave=False)
    while state.alternation < b.alternations:
        a = state.alternation
        generator = torch.Generator().manual_seed(stream_seed(seed, 3 + a))
        lower, upper, timing = alternation(
            state, losses, streams.lower.batches(a * b.lower_steps, b.lower_steps, cfg),
            hessian_batch(streams, a, cfg),
            streams.upper.batches(a * b.upper_steps, b.upper_steps, cfg), b, info, generator=generator)
        if b.eval_every_alternations and state.alternation % b.eval_every_alternations == 0:
            timing["val_top1_lower"] = on_main(info, lambda: _val_top1(
                cfg, state.lower.backbone, state.upper.head, splits, info))
        _log_records(run, name, state, b, lower, upper, timing)
        res = [r["solve_rel_residual"] for r in upper]
        bar.update(1)
        bar.set_postfix(lower=f"{lower[-1]['loss']:.3f}", upper=f"{upper[-1]['loss_lower_model']:.3f}",
                        rel_res=f"{max(res):.1e}", hvp=state.num_hvp)
        if state.alternation % b.checkpoint_every_alternations == 0 and state.alternation < b.alternations:
            save(name)
        if step_hook is not None:
            step_hook(name, state.alternation)
    bar.close()
    elapsed = time.perf_counter() - t_start

    lower_val = on_main(info, lambda: _val_top1(cfg, state.lower.backbone, state.upper.head, splits, info))
    upper_val = on_main(info, lambda: _val_top1(cfg, state.upper.backbone, state.upper.head, splits, info))
    handed = state.lower.backbone if b.handover == "lower" else state.upper.backbone
    result = BiSSLResult(name=name, alternations=b.alternations, num_hvp=state.num_hvp,
                         skipped_steps=state.skipped,
                         seconds_per_alternation=elapsed / max(b.alternations - start_alt, 1),
                         lower_val_top1=lower_val, upper_val_top1=upper_val,
                         pretext_images=b.total_lower_steps * b.lower_batch_size,
                         upper_steps=b.total_upper_steps)
    if info.is_main:
        save_checkpoint(run.checkpoint(f"{name}-final"), {
            "backbone": cpu_state(handed), "lower": cpu_state(state.lower), "upper": cpu_state(state.upper),
            "result": result.as_dict()}, with_rng=False)
        run.write_result(name, result.as_dict())
        run.checkpoint(name).unlink(missing_ok=True)
        print(f"[{name}] {b.alternations} alternations, {state.num_hvp} HVPs, {state.skipped} skipped "
              f"steps, {result.seconds_per_alternation:.2f} s/alternation; val top-1 theta_P+head "
              f"{lower_val:.2f}%, theta_D+head {upper_val:.2f}%", flush=True)
    barrier(info)
    return result


# ---------------------------------------------------------------------------------------------
# Dry run (``bissl validate``)


def dry_run(cfg: RunConfig, spec: DatasetSpec, *, batch: int, generator: torch.Generator) -> dict[str, float]:
    """One lower step and one upper step on random tensors with ``batch`` images per batch.

    Runs on ``cfg.device`` (``auto``: a GPU when one is visible). Returns the measured times, on
    a GPU the peak device memory (``peak_memory_bytes``), and a projection of one alternation at
    the configured batch sizes, scaling each part linearly in its batch size (a rough estimate on
    this machine).
    """
    b, s = cfg.bissl, cfg.data.image_size
    info = DistInfo(device=resolve_device(cfg.device))
    cuda = info.device.type == "cuda"
    in_channels, num_classes = spec.in_channels, spec.num_classes
    net, upper = build_simclr(cfg, in_channels), new_classifier(cfg, spec)
    warmup = (net.backbone.state_dict(), upper.head.state_dict())  # stands in for the warm-up's parts
    state = initial_state(cfg, in_channels, upper, {"model": net.state_dict(), "backbone": net.backbone.state_dict()},
                          warmup, info.device)
    train_loss, hessian_loss = stage_losses(cfg, state.lower, gather=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats(info.device)

    def images() -> Tensor:
        return torch.randn(batch, in_channels, s, s, generator=generator).to(info.device)

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(info.device)
        return time.perf_counter()

    pairs = (images(), images())
    down = (images(), torch.randint(0, num_classes, (batch,), generator=generator).to(info.device))
    anchor = dict(state.upper.backbone.named_parameters())
    for _ in range(2):  # the first call pays one-off costs
        t0 = clock()
        rec_lower = lower_step(state.lower, state.lower_opt, state.lower_sched, train_loss, pairs, b, info,
                               anchor=anchor, lam=b.lam)
    t_lower = clock() - t0
    t0 = clock()
    system = build_system(state, hessian_loss, pairs, b, info, generator=generator)
    probe = {k: torch.randn(p.shape, generator=generator).to(info.device)
             for k, p in state.lower.backbone.named_parameters()}
    system.operator.mv(probe)  # builds the graph (reuse_graph) and one product
    t_first = clock() - t0
    t0 = clock()
    system.operator.mv(probe)
    t_hvp = clock() - t0
    t0 = clock()
    rec_upper = upper_step(state, system, down, b, info)
    t_upper = clock() - t0
    hvps = rec_upper["solve_num_hvp"]
    t_upper_grads = max(t_upper - hvps * t_hvp, 0.0)
    t_build = max(t_first - t_hvp, 0.0) + system.setup_hvp * t_hvp
    projected = (b.lower_steps * t_lower * b.lower_batch_size / batch
                 + t_build * b.hessian_batch / batch
                 + b.upper_steps * (t_upper_grads * b.upper_batch_size / batch + hvps * t_hvp * b.hessian_batch / batch))
    for key, value in (("lower loss", rec_lower["loss"]), ("upper loss", rec_upper["loss_lower_model"])):
        if not torch.isfinite(torch.tensor(value)):
            raise RuntimeError(f"BiSSL dry run: {key} is not finite ({value})")
    out = {"lower_step_s": t_lower, "hvp_s": t_hvp, "upper_step_s": t_upper, "graph_build_s": t_build,
           "hvp_per_solve": hvps, "projected_alternation_s": projected,
           "solve_rel_residual": rec_upper["solve_rel_residual"]}
    if cuda:
        out["peak_memory_bytes"] = float(torch.cuda.max_memory_allocated(info.device))
    return out
