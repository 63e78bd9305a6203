"""Supervised training of backbone + linear head: fine-tuning (and, frozen, the linear warm-up).

:func:`train_classifier` is the one supervised loop: SGD with momentum, optional warm-up + cosine
schedule, validation every few epochs with the best-val weights kept, checkpoints every
``checkpoint_every_steps`` steps and resume. :func:`run_finetune` starts it from the pretext
backbone with a new (or the warmed-up) head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from bissl.checkpoint import load_checkpoint, save_checkpoint
from bissl.config import RunConfig
from bissl.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    epoch_batches,
    on_main,
    prepare_model,
)
from bissl.models import Classifier
from bissl.optim import warmup_cosine
from bissl.rundir import RunDir
from bissl.stages._common import (
    SeededItems,
    Splits,
    StepHook,
    cpu_state,
    downstream_datasets,
    eval_loader,
    evaluate_classifier,
    loader,
    new_classifier,
    restore_training,
    seed_everything,
    start_or_resume,
    training_state,
    warmup_parts,
)
from bissl.stages.pretext import pretext_backbone_state


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one supervised run."""

    lr: float
    weight_decay: float
    momentum: float
    epochs: int
    batch_size: int
    seed: int
    schedule: Literal["cosine", "constant"] = "cosine"
    final_lr_ratio: float = 0.001
    warmup_epochs: int = 0
    freeze_backbone: bool = False
    bn_train_mode: bool = True
    grad_clip: float | None = None
    eval_every_epochs: int = 1


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_classifier` (accuracies in %)."""

    name: str
    best_val_top1: float
    best_epoch: int
    last_val_top1: float
    steps: int

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dict(self.__dict__)


def train_classifier(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, model: Classifier,
                     settings: TrainSettings, *, name: str, resume: bool = False,
                     keep_final: bool = True, step_hook: StepHook | None = None) -> TrainResult:
    """Train ``model`` on the downstream train split, validating on the val split.

    Args:
        cfg: validated config (data, eval, checkpoint settings).
        run: run directory; checkpoints ``<name>.pt`` (in progress) and ``<name>-final.pt``
            ({"best", "last", "result"}) unless ``keep_final`` is False.
        info: process placement.
        splits: loaded datasets.
        model: classifier to train (its initial weights are the starting point).
        settings: optimiser and schedule.
        name: stage name used for checkpoints and metrics.
        resume: continue from ``<name>.pt``; a finished run returns its stored result.
        keep_final: write ``<name>-final.pt`` (search trials only keep the JSON result).
        step_hook: called as ``step_hook(name, step)`` after every step.
    Returns:
        The best-val and last-val top-1 accuracies.
    """
    s = settings
    done = run.read_result(name)
    if resume and done is not None:
        return TrainResult(**done)
    state = start_or_resume(run, name, resume=resume)
    train_aug, _, val, _ = downstream_datasets(cfg, splits)
    steps_per_epoch = len(train_aug) // s.batch_size
    total = s.epochs * steps_per_epoch

    if s.freeze_backbone:
        model.backbone.requires_grad_(False)
    net, bare = prepare_model(model, info, sync_bn=cfg.model.sync_bn and not s.freeze_backbone)
    params = [p for p in bare.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.schedule == "cosine":
        scheduler: Any = warmup_cosine(optimizer, warmup_steps=s.warmup_epochs * steps_per_epoch,
                                       total_steps=total, final_lr_ratio=s.final_lr_ratio)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loss_fn = nn.CrossEntropyLoss()

    step, best_top1, best_epoch, last_top1 = 0, -1.0, -1, -1.0
    best_state = cpu_state(bare)
    if state is not None:
        step = restore_training(state, bare, optimizer, scheduler)
        best_top1, best_epoch = float(state["best_top1"]), int(state["best_epoch"])
        last_top1, best_state = float(state["last_top1"]), state["best"]
        run.drop_metrics_after(name, step)
        if info.is_main:
            print(f"[{name}] resumed from checkpoint at step {step}; continuing at step {step + 1} "
                  f"of {total}", flush=True)

    def save(path_name: str) -> None:
        if info.is_main:
            save_checkpoint(run.checkpoint(path_name), training_state(
                bare, optimizer, scheduler, step, best=best_state, best_top1=best_top1,
                best_epoch=best_epoch, last_top1=last_top1))

    bar = tqdm(total=total, initial=step, desc=name, disable=not info.is_main, dynamic_ncols=True,
               leave=False)
    for epoch in range(step // steps_per_epoch, s.epochs):
        batches = epoch_batches(len(train_aug), s.batch_size, epoch=epoch, seed=s.seed, info=info)
        batches = batches[step - epoch * steps_per_epoch:]
        net.train()
        if s.freeze_backbone and not s.bn_train_mode:
            bare.backbone.eval()
        for x, y in loader(SeededItems(train_aug, seed=s.seed, epoch=epoch), batches, cfg, info):
            logits = net(x.to(info.device, non_blocking=True))
            loss = loss_fn(logits, torch.as_tensor(y).to(info.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, s.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every_steps == 0 or step == total:
                run.log(name, step, loss=loss.item(), lr=scheduler.get_last_lr()[0])
            if step % cfg.checkpoint_every_steps == 0:
                save(name)
            if step_hook is not None:
                step_hook(name, step)
        if (epoch + 1) % s.eval_every_epochs == 0 or epoch + 1 == s.epochs:
            metrics = on_main(info, lambda: evaluate_classifier(
                bare, eval_loader(val, cfg, info), info.device, cfg.eval.topk))
            last_top1 = metrics["top1"]
            run.log(name, step, **{f"val_{k}": v for k, v in metrics.items()})
            bar.set_postfix(val_top1=f"{last_top1:.1f}")
            if last_top1 > best_top1:
                best_top1, best_epoch, best_state = last_top1, epoch + 1, cpu_state(bare)
    bar.close()
    result = TrainResult(name, best_top1, best_epoch, last_top1, step)
    if info.is_main:
        if keep_final:
            save_checkpoint(run.checkpoint(f"{name}-final"), {
                "best": best_state, "last": cpu_state(bare), "result": result.as_dict()},
                with_rng=False)
        run.write_result(name, result.as_dict())
        run.checkpoint(name).unlink(missing_ok=True)
    barrier(info)
    return broadcast_object(info, result)


@dataclass(frozen=True)
class FinetuneInit:
    """Where fine-tuning starts: backbone and head weights; ``None`` draws them at random."""

    backbone: dict[str, Tensor] | None
    head: dict[str, Tensor] | None = None


def pretext_init(cfg: RunConfig, run: RunDir) -> FinetuneInit:
    """The run's pretext backbone, with the warm-up's head (and BN buffers) if ``head_init: warmup``."""
    if cfg.finetune.head_init == "warmup" and cfg.warmup.epochs > 0:
        backbone, head = warmup_parts(run)
        return FinetuneInit(backbone=backbone, head=head)
    return FinetuneInit(backbone=pretext_backbone_state(run))


def finetune_model(cfg: RunConfig, splits: Splits, init: FinetuneInit, *, seed: int) -> Classifier:
    """Classifier at ``init``; what ``init`` leaves out is drawn from the torch RNG seeded by ``seed``."""
    torch.manual_seed(seed)
    model = new_classifier(cfg, splits.spec)
    if init.backbone is not None:
        model.backbone.load_state_dict(init.backbone)
    if init.head is not None:
        model.head.load_state_dict(init.head)
    return model


def run_finetune(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, *, lr: float,
                 weight_decay: float, seed: int, name: str, epochs: int | None = None,
                 resume: bool = False, keep_final: bool = True, init: FinetuneInit | None = None,
                 step_hook: StepHook | None = None) -> TrainResult:
    """Fine-tune backbone + linear head at (lr, weight_decay, seed).

    ``init`` defaults to the run's pretext backbone (:func:`pretext_init`).
    """
    seed_everything(seed, deterministic=cfg.deterministic)
    f = cfg.finetune
    settings = TrainSettings(
        lr=lr, weight_decay=weight_decay, momentum=f.momentum, epochs=epochs or f.epochs,
        batch_size=f.batch_size, seed=seed, schedule="cosine", final_lr_ratio=f.final_lr_ratio,
        warmup_epochs=min(f.warmup_epochs, (epochs or f.epochs) - 1), grad_clip=f.grad_clip,
        eval_every_epochs=f.eval_every_epochs)
    model = finetune_model(cfg, splits, init or pretext_init(cfg, run), seed=seed)
    return train_classifier(cfg, run, info, splits, model, settings, name=name, resume=resume,
                            keep_final=keep_final, step_hook=step_hook)


def test_metrics(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits,
                 name: str) -> dict[str, float]:
    """Test-split metrics of the best-val weights of fine-tuning run ``name``."""
    model = new_classifier(cfg, splits.spec)
    model.load_state_dict(load_checkpoint(run.checkpoint(f"{name}-final"))["best"])
    model.to(info.device)
    _, _, _, test = downstream_datasets(cfg, splits)
    return evaluate_classifier(model, eval_loader(test, cfg, info), info.device, cfg.eval.topk)
