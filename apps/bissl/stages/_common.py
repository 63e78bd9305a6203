"""Helpers shared by the stages: seeding, data, loaders, models, evaluation, resume bookkeeping."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from bissl.augment import TransformedDataset, downstream_transforms, normalization_stats
from bissl.checkpoint import load_checkpoint, restore_rng_state
from bissl.config import ConfigError, RunConfig, check_data_sizes
from bissl.data import DATASETS, DatasetSpec, balanced_subset, load_split
from bissl.distributed import DistInfo
from bissl.metrics import topk_accuracy
from bissl.models import Classifier, LinearHead, build_backbone
from bissl.rundir import RunDir

StepHook = Callable[[str, int], None]
"""Called as ``hook(stage, step)`` after every optimisation step (tests use it to kill a run)."""


def seed_everything(seed: int, *, deterministic: bool) -> None:
    """Seed python, numpy and torch; in deterministic mode force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def seeded_item(base: Dataset, *, seed: int, epoch: int, index: int) -> Any:
    """``base[index]`` with the torch RNG seeded from (seed, epoch, index); the caller's RNG
    state is left untouched. Unique per (epoch, index) for epochs < 100_003."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(((seed * 100_003 + epoch) * len(base) + index) % 2**63)  # type: ignore[arg-type]
        return base[index]


def warmup_parts(run: RunDir) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone, head) state dicts of the linear warm-up's last weights (``warmup-final.pt``)."""
    last = load_checkpoint(run.checkpoint("warmup-final"))["last"]
    parts: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
    for key, value in last.items():
        child, _, name = key.partition(".")
        parts[0 if child == "backbone" else 1][name] = value
    return parts


class SeededItems(Dataset):
    """Runs ``base[i]`` with the torch RNG seeded from (seed, epoch, i).

    Random augmentations then depend only on the item and the epoch, not on loader workers or
    on where a run was resumed. The caller's RNG state is left untouched.
    """

    def __init__(self, base: Dataset, *, seed: int, epoch: int) -> None:
        self.base, self.seed, self.epoch = base, seed, epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return seeded_item(self.base, seed=self.seed, epoch=self.epoch, index=index)


def loader(dataset: Dataset, batches: Sequence[Sequence[int]], cfg: RunConfig,
           info: DistInfo) -> DataLoader:
    """DataLoader over explicit index batches (from :func:`bissl.distributed.epoch_batches`)."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=cfg.data.num_workers,
                      pin_memory=info.device.type == "cuda")


def eval_loader(dataset: Dataset, cfg: RunConfig, info: DistInfo) -> DataLoader:
    """Sequential, non-shuffled loader for evaluation."""
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda")


@dataclass(frozen=True)
class Splits:
    """Raw uint8 datasets of a run plus the downstream dataset's spec."""

    spec: DatasetSpec
    pretext: Dataset
    train: Dataset
    val: Dataset
    test: Dataset

    def sizes(self) -> dict[str, int]:
        """Number of items per split."""
        return {k: len(getattr(self, k)) for k in ("pretext", "train", "val", "test")}


def load_splits(cfg: RunConfig, info: DistInfo) -> Splits:
    """Load all splits (lazily where the loader allows) and check batch sizes against them."""
    d = cfg.data
    kw: dict[str, Any] = {"root": d.root, "val_fraction": d.val_fraction, "val_size": d.val_size,
                          "seed": cfg.seed if d.val_seed is None else d.val_seed}
    train, val = load_split(d.dataset, "train", **kw), load_split(d.dataset, "val", **kw)
    try:
        if d.train_per_class is not None:
            train = balanced_subset(train, d.train_per_class, cfg.seed, field="data.train_per_class")
        if d.val_per_class is not None:
            val = balanced_subset(val, d.val_per_class, cfg.seed + 1, field="data.val_per_class")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    splits = Splits(
        spec=DATASETS[d.dataset],
        pretext=load_split(d.pretext_name, d.pretext_split, **kw),
        train=train,
        val=val,
        test=load_split(d.dataset, "test", **kw),
    )
    check_data_sizes(cfg, splits.sizes(), info.world_size)
    pre_spec = DATASETS[d.pretext_name]
    if pre_spec.in_channels != splits.spec.in_channels:
        raise ConfigError(f"data.pretext_dataset {pre_spec.name!r} has {pre_spec.in_channels} channels "
                          f"but data.dataset {d.dataset!r} has {splits.spec.in_channels}. Fix: use "
                          "datasets with the same number of channels")
    return splits


def downstream_datasets(cfg: RunConfig, splits: Splits) -> tuple[Dataset, Dataset, Dataset, Dataset]:
    """(train with augmentation, train with test transform, val, test) as float tensors."""
    mean, std = normalization_stats(cfg.data.dataset)
    train_tf, test_tf = downstream_transforms(
        cfg.data.image_size, in_channels=splits.spec.in_channels,
        aspect_ratio_quirk=cfg.augment.aspect_ratio_quirk, mean=mean, std=std,
        scale=cfg.augment.downstream_crop_scale, hflip=cfg.augment.hflip,
        interpolation=cfg.augment.downstream_interpolation)
    return (TransformedDataset(splits.train, train_tf), TransformedDataset(splits.train, test_tf),
            TransformedDataset(splits.val, test_tf), TransformedDataset(splits.test, test_tf))


def new_backbone(cfg: RunConfig, in_channels: int) -> tuple[nn.Module, int]:
    """Backbone of the configured architecture (random init from the current torch RNG)."""
    m = cfg.model
    return build_backbone(m.arch, small_images=m.small_images, in_channels=in_channels, width=m.width)


def new_classifier(cfg: RunConfig, spec: DatasetSpec) -> Classifier:
    """Backbone + new linear head for ``spec``'s classes."""
    backbone, feat_dim = new_backbone(cfg, spec.in_channels)
    return Classifier(backbone, LinearHead(feat_dim, spec.num_classes))


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: DataLoader, device: torch.device,
                        topk: Sequence[int]) -> dict[str, float]:
    """Mean cross-entropy and top-k accuracies (in %) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in data:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    acc = topk_accuracy(all_logits, all_labels, ks=tuple(topk))
    out = {f"top{k}": 100.0 * float(v) for k, v in acc.items()}
    out["loss"] = float(nn.functional.cross_entropy(all_logits, all_labels))
    return out


def start_or_resume(run: RunDir, name: str, *, resume: bool) -> dict[str, Any] | None:
    """The in-progress checkpoint ``name`` when resuming, else None.

    Raises:
        ConfigError: a checkpoint exists but --resume was not given (refuse to overwrite).
    """
    path = run.checkpoint(name)
    if not resume:
        if path.exists() or run.checkpoint(f"{name}-final").exists():
            raise ConfigError(f"{run.path} already has checkpoints of stage {name!r}. "
                              "Fix: pass --resume to continue it, or use a new --run-dir")
        return None
    if not path.exists():
        return None
    return load_checkpoint(path)


def restore_training(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> int:
    """Load model/optimiser/scheduler/RNG from a checkpoint; returns the step reached."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return int(state["step"])


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
                   **extra: Any) -> dict[str, Any]:
    """Checkpoint payload (RNG states are added by save_checkpoint)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, **extra}


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copy of a state dict (parameters and BN buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
