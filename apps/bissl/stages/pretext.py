"""SimCLR pretext stage: backbone + projector trained with NT-Xent and LARS.

Writes ``checkpoints/pretext.pt`` every ``checkpoint_every_steps`` steps and
``checkpoints/pretext-final.pt`` (backbone and projector state) at the end; logs the loss and,
every ``pretext.eval_every_epochs`` epochs, the kNN accuracy and a linear probe accuracy of the
frozen backbone features on the downstream val split.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from bissl.augment import TwoViewDataset, normalization_stats, simclr_views
from bissl.checkpoint import load_checkpoint, save_checkpoint
from bissl.config import RunConfig
from bissl.distributed import DistInfo, average_gradients, barrier, epoch_batches, on_main
from bissl.metrics import extract_features, knn_accuracy, linear_probe_accuracy
from bissl.models import Projector
from bissl.optim import LARS, lars_param_groups, warmup_cosine
from bissl.pretext_loss import PretextLoss, simclr_loss
from bissl.rundir import RunDir
from bissl.stages._common import (
    SeededItems,
    Splits,
    StepHook,
    downstream_datasets,
    eval_loader,
    loader,
    new_backbone,
    restore_training,
    seed_everything,
    start_or_resume,
    training_state,
)

STAGE = "pretext"


class SimCLRNet(nn.Module):
    """Backbone followed by the SimCLR projector: images (N, C, H, W) -> embeddings (N, D)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))


def build_simclr(cfg: RunConfig, in_channels: int) -> SimCLRNet:
    """Backbone + projector of the configured sizes (random init from the torch RNG)."""
    backbone, feat_dim = new_backbone(cfg, in_channels)
    projector = Projector(feat_dim, cfg.model.projector_hidden_dim, cfg.model.projector_out_dim)
    return SimCLRNet(backbone, projector)


def training_loss(cfg: RunConfig, net: SimCLRNet) -> PretextLoss:
    """The pretext loss as trained: BatchNorm statistics updated, negatives from every rank."""
    return simclr_loss(net, temperature=cfg.pretext.temperature, view_passes=cfg.pretext.view_passes,
                       update_buffers=True)


def prepare_simclr(net: SimCLRNet, cfg: RunConfig, info: DistInfo, *, sync_bn: bool | None = None) -> SimCLRNet:
    """Move to the device; SyncBN when distributed on GPU and ``sync_bn`` (default
    ``model.sync_bn``). No DDP wrapper: the forward is a functional call and gradients are
    averaged by :func:`bissl.distributed.average_gradients`."""
    net = net.to(info.device)
    sync_bn = cfg.model.sync_bn if sync_bn is None else sync_bn
    if info.distributed and sync_bn and info.device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # type: ignore[assignment]
    return net


def probe_metrics(cfg: RunConfig, backbone: nn.Module, splits: Splits,
                  info: DistInfo) -> dict[str, float]:
    """kNN and linear-probe accuracy (%) of frozen features: fit on train, score on val."""
    _, train_plain, val, _ = downstream_datasets(cfg, splits)
    with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG
        tr_f, tr_y = extract_features(backbone, eval_loader(train_plain, cfg, info), info.device)
        va_f, va_y = extract_features(backbone, eval_loader(val, cfg, info), info.device)
        p = cfg.pretext
        knn = knn_accuracy(tr_f, tr_y, va_f, va_y, k=p.knn_k, temperature=p.knn_temperature)
        probe = linear_probe_accuracy(tr_f, tr_y, va_f, va_y, epochs=p.probe_epochs,
                                      lr=p.probe_lr, seed=cfg.seed)
    return {"knn_acc": 100.0 * knn, "probe_acc": 100.0 * probe}


def run_pretext(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, *,
                resume: bool = False, step_hook: StepHook | None = None) -> Path:
    """Train the SimCLR backbone; returns the path of ``pretext-final.pt``.

    Args:
        cfg: validated config (``pretext``, ``model``, ``augment`` sections).
        run: run directory (checkpoints, metrics).
        info: process placement (see :mod:`bissl.distributed`).
        splits: loaded datasets (pretext split + downstream train/val for monitoring).
        resume: continue from ``pretext.pt`` / skip if ``pretext-final.pt`` exists.
        step_hook: called as ``step_hook("pretext", step)`` after every step.
    """
    final = run.checkpoint(f"{STAGE}-final")
    if resume and final.exists():
        if info.is_main:
            print(f"[{STAGE}] already finished: {final}", flush=True)
        return final
    state = start_or_resume(run, STAGE, resume=resume)
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    p = cfg.pretext

    # Model, optimiser, schedule (global batch; each rank sees batch // world pairs per step).
    bare = prepare_simclr(build_simclr(cfg, splits.spec.in_channels), cfg, info)
    optimizer = LARS(lars_param_groups(bare, exclude_bias_and_norm=p.lars_exclude_bias_and_norm),
                     lr=p.effective_lr(), momentum=p.momentum, weight_decay=p.weight_decay,
                     trust_coefficient=p.trust_coefficient)
    steps_per_epoch = len(splits.pretext) // p.batch_size
    total = p.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, warmup_steps=p.warmup_epochs * steps_per_epoch,
                              total_steps=total, final_lr_ratio=p.final_lr_ratio)
    loss_fn = training_loss(cfg, bare)
    backbone_params = dict(bare.backbone.named_parameters())
    params = list(bare.parameters())

    step = 0
    if state is not None:
        step = restore_training(state, bare, optimizer, scheduler)
        run.drop_metrics_after(STAGE, step)
        if info.is_main:
            print(f"[{STAGE}] resumed from checkpoint at step {step}; continuing at step "
                  f"{step + 1} of {total}", flush=True)

    # Two augmented views per image; augmentation randomness seeded per (epoch, item).
    mean, std = normalization_stats(cfg.data.pretext_name)
    view1, view2 = simclr_views(cfg.data.image_size, in_channels=splits.spec.in_channels,
                                aspect_ratio_quirk=cfg.augment.aspect_ratio_quirk,
                                scale=cfg.augment.crop_scale, blur=cfg.augment.blur, hflip=cfg.augment.hflip,
                                mean=mean, std=std)
    pairs = TwoViewDataset(splits.pretext, view1, view2)

    def save(name: str) -> None:
        if info.is_main:
            save_checkpoint(run.checkpoint(name), training_state(bare, optimizer, scheduler, step))

    bar = tqdm(total=total, initial=step, desc=STAGE, disable=not info.is_main, dynamic_ncols=True)
    for epoch in range(step // steps_per_epoch, p.epochs):
        batches = epoch_batches(len(pairs), p.batch_size, epoch=epoch, seed=cfg.seed, info=info)
        batches = batches[step - epoch * steps_per_epoch:]
        bare.train()
        for x1, x2 in loader(SeededItems(pairs, seed=cfg.seed, epoch=epoch), batches, cfg, info):
            batch = (x1.to(info.device, non_blocking=True), x2.to(info.device, non_blocking=True))
            loss = loss_fn(backbone_params, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params, info)
            if p.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, p.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every_steps == 0 or step == total:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                run.log(STAGE, step, loss=loss.item(), lr=scheduler.get_last_lr()[0], epoch=epoch)
            if step % cfg.checkpoint_every_steps == 0:
                save(STAGE)
            if step_hook is not None:
                step_hook(STAGE, step)
        if (epoch + 1) % p.eval_every_epochs == 0 or epoch + 1 == p.epochs:
            metrics = on_main(info, lambda: probe_metrics(cfg, bare.backbone, splits, info))
            run.log(STAGE, step, **metrics)
            if info.is_main:
                bar.write(f"[{STAGE}] epoch {epoch + 1}/{p.epochs}: kNN {metrics['knn_acc']:.1f}% "
                          f"probe {metrics['probe_acc']:.1f}% (val)")
    bar.close()
    save(STAGE)
    if info.is_main:
        save_checkpoint(final, {"model": bare.state_dict(), "backbone": bare.backbone.state_dict(),
                                "step": step}, with_rng=False)
    barrier(info)
    return final


def pretext_backbone_state(run: RunDir) -> dict[str, Tensor]:
    """The backbone weights (and BN buffers) of ``pretext-final.pt``."""
    return load_checkpoint(run.checkpoint(f"{STAGE}-final"))["backbone"]
