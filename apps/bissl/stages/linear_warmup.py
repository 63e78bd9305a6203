"""Linear warm-up stage: train a new linear head on the frozen pretext backbone.

As in the reference, the backbone's weights are frozen but its BatchNorm layers stay in train
mode (``warmup.bn_train_mode``), so their running statistics adapt to the downstream data. The
learning rate is constant (the reference notes give no schedule for this stage). The result,
``checkpoints/warmup-final.pt`` ("last" = warmed-up classifier), is the starting point of the
BiSSL stage (part 2) and, with ``finetune.head_init: warmup``, of fine-tuning.
"""

from __future__ import annotations

from bissl.config import RunConfig
from bissl.distributed import DistInfo
from bissl.rundir import RunDir
from bissl.stages._common import Splits, StepHook, new_classifier, seed_everything
from bissl.stages.finetune import TrainResult, TrainSettings, train_classifier
from bissl.stages.pretext import pretext_backbone_state

STAGE = "warmup"


def run_linear_warmup(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, *,
                      resume: bool = False, step_hook: StepHook | None = None) -> TrainResult | None:
    """Train the head for ``warmup.epochs`` epochs (None when the stage is disabled)."""
    w = cfg.warmup
    if w.epochs == 0:
        return None
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    model = new_classifier(cfg, splits.spec)
    model.backbone.load_state_dict(pretext_backbone_state(run))
    settings = TrainSettings(lr=w.lr, weight_decay=w.weight_decay, momentum=w.momentum,
                             epochs=w.epochs, batch_size=w.batch_size, seed=cfg.seed,
                             schedule="constant", freeze_backbone=True,
                             bn_train_mode=w.bn_train_mode,
                             eval_every_epochs=max(1, w.epochs // 4))
    return train_classifier(cfg, run, info, splits, model, settings, name=STAGE, resume=resume,
                            step_hook=step_hook)
