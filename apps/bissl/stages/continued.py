"""The conventional arms' extra training, at exactly the BiSSL stage's budget.

* :func:`run_continued_pretext` — ``alternations x lower_steps`` more SimCLR steps from the
  pretext checkpoint with the lower level's batch size and LARS settings, a fresh warm-up +
  cosine schedule and no proximal term. It reads the same batch stream as the BiSSL lower steps
  of the same seed, so both arms see the same pretext images.
* :func:`run_supervised_steps` — ``alternations x upper_steps`` supervised SGD steps on the
  downstream set (backbone + a warm-up head) with the upper optimiser's settings, so a BiSSL gain
  cannot be just more supervised training.

Each writes ``<name>.pt`` every ``checkpoint_every_steps`` steps (resumable) and
``<name>-final.pt`` holding the ``backbone`` handed to fine-tuning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from bissl.checkpoint import save_checkpoint
from bissl.config import RunConfig
from bissl.distributed import DistInfo, average_gradients, barrier
from bissl.rundir import RunDir
from bissl.stages._common import (
    Splits,
    StepHook,
    cpu_state,
    new_classifier,
    restore_training,
    seed_everything,
    start_or_resume,
    training_state,
)
from bissl.stages.bilevel import Streams, lower_optimizer, lower_step, upper_optimizer
from bissl.stages.pretext import build_simclr, prepare_simclr, training_loss


@dataclass(frozen=True)
class ExtraResult:
    """What an arm's extra training spent."""

    name: str
    pretext_images: int
    supervised_steps: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dict(self.__dict__)


def _train_loop(run: RunDir, info: DistInfo, cfg: RunConfig, *, name: str, total: int, model: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, batches: Callable[[int], Iterator[Any]],
                step_fn: Callable[[Any], dict[str, float]], resume: bool, step_hook: StepHook | None,
                backbone: Callable[[], nn.Module], spent: Callable[[int], tuple[int, int]]) -> ExtraResult:
    """Shared resumable loop: ``total`` steps of ``step_fn`` over ``batches(start)``."""
    done = run.read_result(name)
    if resume and done is not None:
        return ExtraResult(**done)
    state = start_or_resume(run, name, resume=resume)
    step = 0
    if state is not None:
        step = restore_training(state, model, optimizer, scheduler)
        run.drop_metrics_after(name, step)
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=name, disable=not info.is_main, dynamic_ncols=True, leave=False)
    for batch in batches(step):
        record = step_fn(batch)
        step += 1
        bar.update(1)
        if step % cfg.log_every_steps == 0 or step == total:
            run.log(name, step, **record)
        if step % cfg.checkpoint_every_steps == 0 and step < total and info.is_main:
            save_checkpoint(run.checkpoint(name), training_state(model, optimizer, scheduler, step))
        if step_hook is not None:
            step_hook(name, step)
    bar.close()
    images, steps = spent(total)
    result = ExtraResult(name, images, steps, time.perf_counter() - t0)
    if info.is_main:
        save_checkpoint(run.checkpoint(f"{name}-final"), {"backbone": cpu_state(backbone()),
                                                          "result": result.as_dict()}, with_rng=False)
        run.write_result(name, result.as_dict())
        run.checkpoint(name).unlink(missing_ok=True)
    barrier(info)
    return result


def run_continued_pretext(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, *, seed: int,
                          name: str, pretext: dict[str, Any], resume: bool = True,
                          step_hook: StepHook | None = None) -> ExtraResult:
    """SimCLR from ``pretext`` (the ``pretext-final`` payload) for ``bissl.total_lower_steps`` steps."""
    b = cfg.bissl
    seed_everything(seed, deterministic=cfg.deterministic)
    net = build_simclr(cfg, splits.spec.in_channels)
    net.load_state_dict(pretext["model"])
    net = prepare_simclr(net, cfg, info)
    net.train()
    opt, sched = lower_optimizer(cfg, net)
    loss = training_loss(cfg, net)
    stream = Streams.for_seed(cfg, splits, info, seed).lower
    total = b.total_lower_steps
    return _train_loop(
        run, info, cfg, name=name, total=total, model=net, optimizer=opt, scheduler=sched,
        batches=lambda start: stream.batches(start, total - start, cfg),
        step_fn=lambda batch: lower_step(net, opt, sched, loss, batch, b, info, anchor=None, lam=0.0),
        resume=resume, step_hook=step_hook, backbone=lambda: net.backbone,
        spent=lambda steps: (steps * b.lower_batch_size, 0))


def run_supervised_steps(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, *, seed: int,
                         name: str, backbone: dict[str, Tensor], head: dict[str, Tensor] | None,
                         resume: bool = True, step_hook: StepHook | None = None) -> ExtraResult:
    """``bissl.total_upper_steps`` SGD steps on backbone + head with the upper level's settings."""
    b = cfg.bissl
    seed_everything(seed, deterministic=cfg.deterministic)
    model = new_classifier(cfg, splits.spec)
    model.backbone.load_state_dict(backbone)
    if head is not None:
        model.head.load_state_dict(head)
    model = model.to(info.device)
    model.train()
    opt, sched = upper_optimizer(cfg, model)
    stream = Streams.for_seed(cfg, splits, info, seed).upper
    params = list(model.parameters())
    total = b.total_upper_steps

    def step(batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params, info)
        if b.upper_grad_clip is not None:
            nn.utils.clip_grad_norm_(params, b.upper_grad_clip)
        opt.step()
        sched.step()
        return {"loss": loss.item(), "lr": sched.get_last_lr()[0]}

    return _train_loop(
        run, info, cfg, name=name, total=total, model=model, optimizer=opt, scheduler=sched,
        batches=lambda start: stream.batches(start, total - start, cfg), step_fn=step,
        resume=resume, step_hook=step_hook, backbone=lambda: model.backbone,
        spent=lambda steps: (0, steps))
