"""Validated run configuration: pydantic models, YAML presets and ``--set a.b=value`` overrides.

A run is described by one :class:`RunConfig`. It is built from a preset name (a file
``bissl/presets/<name>.yaml``) or a YAML path, then ``--set`` overrides are applied to the raw
mapping, then everything is validated at once. Errors are raised as :class:`ConfigError` whose
message names each offending field, the value received and how to fix it — before any work.

Example:
    >>> from bissl.config import load_config
    >>> cfg = load_config("digits", ["pretext.epochs=2", "search.trials=1"])
    >>> cfg.pretext.epochs
    2
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem with field, value and fix."""


class _Section(BaseModel):
    """Base: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Datasets, image size and the held-out validation split."""

    dataset: str = Field("digits", description="downstream dataset (a key of bissl.data.DATASETS)")
    pretext_dataset: str | None = Field(None, description="pretext dataset; None = same as dataset")
    pretext_split: Literal["train", "unlabeled"] = Field(
        "train", description="split used for SimCLR (labels ignored); 'unlabeled' exists for stl10 only"
    )
    root: str | None = Field(None, description="dataset root folder (not needed for digits)")
    image_size: int = Field(16, ge=8, le=512, description="side in pixels the images are resized to")
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="fraction of the labelled training split held out for validation"
    )
    val_size: int | None = Field(
        None, ge=1, description="number of labelled training images held out for validation "
        "(replaces val_fraction; reference stl10: 1000 of 5000); None = use val_fraction")
    val_seed: int | None = Field(
        None, ge=0, description="seed of the train/val split; None = the run seed (a split per "
        "run seed); a number fixes one split for every run, as the reference's shipped list")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes (0 = main process)")

    train_per_class: int | None = Field(
        None, ge=1, description="downstream train split cut to this many labelled images per class "
        "(class-balanced, drawn with the run seed): a label-scarce downstream set; None = all")
    val_per_class: int | None = Field(
        None, ge=1, description="validation split cut to this many images per class; None = all")

    @property
    def pretext_name(self) -> str:
        """Name of the dataset used by the pretext stage."""
        return self.pretext_dataset or self.dataset


class ModelConfig(_Section):
    """Backbone and SimCLR projector."""

    arch: Literal["resnet18", "resnet-small"] = Field(
        "resnet-small", description="backbone: torchvision-style ResNet-18 or a narrow 4-stage ResNet"
    )
    small_images: bool = Field(True, description="3x3 stride-1 stem without max-pool (16-32 px)")
    width: int = Field(16, ge=1, le=512, description="base width of resnet-small (ignored by resnet18)")
    projector_hidden_dim: int = Field(256, ge=1, description="hidden width of the SimCLR projector MLP")
    projector_out_dim: int = Field(256, ge=1, description="output width of the projector (NT-Xent space)")
    sync_bn: bool = Field(True, description="SyncBN when distributed on GPU (pretext and fine-tuning); never in the BiSSL stage, whose HVPs need a double backward SyncBN lacks (as the reference)")


class AugmentConfig(_Section):
    """SimCLR and downstream augmentations."""

    aspect_ratio_quirk: bool = Field(
        True, description="reference quirk: crop 'min ratio 0.5' passed as aspect ratio (0.5, 1)"
    )
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="SimCLR crop area range")
    downstream_crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="fine-tuning crop area range"
    )
    blur: bool = Field(True, description="SimCLR Gaussian blur (off for digits: it erases 16 px images)")
    hflip: bool = Field(
        True, description="random horizontal flips (reference: on); off for digits, whose mirror images are other shapes"
    )
    downstream_interpolation: Literal["bilinear", "bicubic"] = Field(
        "bilinear", description="interpolation of the downstream crop (train) and resize (test); "
        "reference: bicubic (the SimCLR views are bicubic either way)")

    @model_validator(mode="after")
    def _check_scale(self) -> AugmentConfig:
        for name in ("crop_scale", "downstream_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(
                    f"augment.{name}: got {[lo, hi]}; need 0 < low <= high <= 1. "
                    f"Fix: e.g. --set augment.{name}=[0.08,1.0]"
                )
        return self


class PretextConfig(_Section):
    """SimCLR pretext training with LARS and warm-up + cosine schedule."""

    epochs: int = Field(30, ge=1, description="SimCLR training epochs")
    batch_size: int = Field(256, ge=2, description="global batch of image pairs")
    lr: float = Field(4.8, gt=0.0, description="LARS base learning rate (see lr_scaled_by_batch)")
    lr_scaled_by_batch: bool = Field(
        False, description="True: lr * batch_size / 256 (reference quirk 2: not scaled)"
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="LARS momentum")
    weight_decay: float = Field(1e-6, ge=0.0, description="LARS weight decay")
    trust_coefficient: float = Field(0.001, gt=0.0, description="LARS trust ratio coefficient (eta)")
    lars_exclude_bias_and_norm: bool = Field(
        True, description="no weight decay / LARS scaling on biases and norm layers (reference: false)"
    )
    temperature: float = Field(0.5, gt=0.0, description="NT-Xent temperature")
    view_passes: Literal["separate", "joint"] = Field(
        "separate",
        description="how the two SimCLR views go through backbone and projector: 'separate' "
        "forward passes (reference: BatchNorm statistics per view) or one 'joint' pass over "
        "both views (BatchNorm statistics over 2n images). The loss, and so its Hessian, differ; "
        "one field governs pretext training, the BiSSL lower steps and the BiSSL Hessian alike",
    )
    warmup_epochs: int = Field(10, ge=0, description="linear warm-up, in pretext epochs' steps")
    final_lr_ratio: float = Field(0.001, ge=0.0, le=1.0, description="cosine schedule ends at lr * this")
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient norm; None = no clipping")
    eval_every_epochs: int = Field(10, ge=1, description="kNN + linear probe every N epochs")
    knn_k: int = Field(20, ge=1, description="neighbours of the weighted kNN monitor")
    knn_temperature: float = Field(0.1, gt=0.0, description="temperature of the kNN monitor's similarity weights")
    probe_epochs: int = Field(100, ge=1, description="epochs of the full-batch linear probe monitor")
    probe_lr: float = Field(0.01, gt=0.0, description="Adam lr of the full-batch linear probe")

    @model_validator(mode="after")
    def _check_warmup(self) -> PretextConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"pretext.warmup_epochs: got {self.warmup_epochs} >= pretext.epochs={self.epochs}; "
                "the cosine phase needs at least one epoch. "
                f"Fix: --set pretext.warmup_epochs={max(self.epochs // 10, 0)}"
            )
        return self

    def effective_lr(self) -> float:
        """Base learning rate after the optional batch-size scaling."""
        return self.lr * self.batch_size / 256 if self.lr_scaled_by_batch else self.lr


class WarmupConfig(_Section):
    """Linear warm-up of a new head on the frozen pretext backbone."""

    epochs: int = Field(20, ge=0, description="0 disables the stage")
    batch_size: int = Field(256, ge=1, description="global batch size")
    lr: float = Field(0.015, gt=0.0, description="SGD learning rate (constant)")
    weight_decay: float = Field(0.01, ge=0.0, description="SGD weight decay")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    bn_train_mode: bool = Field(
        True, description="reference: BN stays in train mode while the backbone is frozen"
    )


class FinetuneConfig(_Section):
    """Fine-tuning of the whole backbone plus a linear head (SGD, cosine schedule)."""

    epochs: int = Field(400, ge=1, description="fine-tuning epochs (each search seed)")
    batch_size: int = Field(256, ge=1, description="global batch size")
    lr: float = Field(0.05, gt=0.0, description="used by `bissl finetune` (search picks its own)")
    weight_decay: float = Field(1e-4, ge=0.0, description="used by `bissl finetune` (search picks its own)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    final_lr_ratio: float = Field(0.001, ge=0.0, le=1.0, description="cosine schedule ends at lr * this")
    warmup_epochs: int = Field(0, ge=0, description="linear learning-rate warm-up epochs")
    head_init: Literal["new", "warmup"] = Field(
        "new", description="new linear head (reference) or the linear warm-up's head"
    )
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient norm; None = no clipping")
    eval_every_epochs: int = Field(1, ge=1, description="validation top-1 every N epochs")

    @model_validator(mode="after")
    def _check_warmup(self) -> FinetuneConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"finetune.warmup_epochs: got {self.warmup_epochs} >= finetune.epochs={self.epochs}. "
                "Fix: --set finetune.warmup_epochs=0"
            )
        return self


class SearchConfig(_Section):
    """Random search over fine-tuning (lr, wd), then several seeds at the best setting."""

    trials: int = Field(200, ge=1, description="random-search trials (Optuna, resumable)")
    lr_range: tuple[float, float] = Field((1e-4, 1.0), description="fine-tuning lr range, sampled log-uniformly")
    wd_range: tuple[float, float] = Field(
        (1e-5, 1e-2), description="fine-tuning weight-decay range, sampled log-uniformly"
    )
    seeds: int = Field(10, ge=1, description="seeds fine-tuned at the best setting (mean ± std reported)")
    seed_offset: int = Field(
        0, ge=0, description="skip this many seed runs: they are seed + 1 + seed_offset + i (i < seeds); "
        "the pretext, split and trial seed stay `seed` (new paired seeds, nothing else changed)")
    trial_epochs: int | None = Field(None, ge=1, description="None = finetune.epochs")
    sampler_seed: int | None = Field(None, description="None = the run seed")

    @model_validator(mode="after")
    def _check_ranges(self) -> SearchConfig:
        for name, (lo, hi) in (("lr_range", self.lr_range), ("wd_range", self.wd_range)):
            if not 0.0 < lo < hi:
                raise ValueError(
                    f"search.{name}: got {[lo, hi]}; need 0 < low < high (log-uniform). "
                    f"Fix: e.g. --set search.{name}=[{lo if lo > 0 else 1e-5},{max(hi, 2 * lo, 1e-3)}]"
                )
        return self


class EvalConfig(_Section):
    """Evaluation settings."""

    batch_size: int = Field(512, ge=1, description="evaluation batch size")
    topk: tuple[int, ...] = Field((1, 5), description="top-k accuracies reported")


SolverName = Literal["cg", "layerwise_cg", "minres", "neumann", "nystrom_pcg", "identity",
                     "mixed_refinement", "subsampled_refinement", "recycled_cg"]
REFINEMENT_SOLVERS = ("mixed_refinement", "subsampled_refinement")


class BiSSLConfig(_Section):
    r"""The BiSSL stage: alternating lower (pretext) and upper (downstream) steps.

    Lower: LARS steps on the pretext loss + (lam/2)||theta_P - theta_D||^2. Upper: SGD steps on
    the downstream loss with the implicit gradient x solving (I + H/(lam + delta)) x = v.
    """

    alternations: int = Field(500, ge=1, description="number of alternations (reference: 500)")
    lower_steps: int = Field(20, ge=1, description="lower (pretext) steps per alternation (reference: 20)")
    upper_steps: int = Field(8, ge=1, description="upper (downstream) steps per alternation (reference: 8)")
    lam: float = Field(0.001, gt=0.0, description="lambda: strength of the proximal term coupling theta_P to theta_D (reference: 0.001)")
    delta: float = Field(10.0, ge=0.0, description="damping delta of the solved system (I + H/(lam+delta)) x = v (reference: 10)")
    gamma: float = Field(0.01, ge=0.0, description="weight of the downstream loss at theta_D in the upper objective (reference v2: 0.01)")
    lower_batch_size: int = Field(1024, ge=2, description="global pretext batch of image pairs for the lower steps (reference: 1024)")
    lower_lr: float = Field(1.0, gt=0.0, description="LARS base learning rate of the lower steps (reference: 1.0)")
    lower_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="LARS momentum of the lower steps")
    lower_weight_decay: float = Field(1e-6, ge=0.0, description="LARS weight decay of the lower steps (reference: 1e-6)")
    lower_warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up of the lower schedule, in lower steps (reference stl10: 10 x 98 lower batches a pass = 980)")
    lower_warmup_first_step_full_lr: bool = Field(False, description="the released code's indexing of the lower schedule: the first lower step runs at the full lower_lr (a quirk), warm-up step t >= 1 at t / lower_warmup_steps; false: step t at (t + 1) / lower_warmup_steps. The cosine phase is the same")
    lower_final_lr_ratio: float = Field(0.001, ge=0.0, le=1.0, description="cosine end point of the lower schedule, as a fraction of lower_lr")
    lower_grad_clip: float | None = Field(10.0, gt=0.0, description="gradient-norm clipping of the lower steps (backbone + projector; reference: 10)")
    upper_batch_size: int = Field(256, ge=1, description="downstream batch of the upper steps (reference: 256)")
    upper_lr: float = Field(0.015, gt=0.0, description="SGD learning rate of the upper steps (reference: 0.015)")
    upper_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum of the upper steps")
    upper_weight_decay: float = Field(0.01, ge=0.0, description="SGD weight decay of the upper steps (reference: 0.01)")
    upper_final_lr_ratio: float = Field(0.001, ge=0.0, le=1.0, description="cosine end point of the upper schedule, as a fraction of upper_lr")
    upper_grad_clip: float | None = Field(10.0, gt=0.0, description="gradient-norm clipping of the upper steps (backbone + head; reference: 10)")
    solver: SolverName = Field("cg", description="IHVP solver: cg (default), layerwise_cg (reference), minres, neumann, nystrom_pcg (CG preconditioned with a Nystrom sketch of H), identity (x = v: the ablation), mixed_refinement (iterative refinement: CG corrections with low-precision HVPs, float32 residuals), subsampled_refinement (the same with the Hessian of a sub-batch as the corrections' operator), recycled_cg (CG from a Galerkin guess recycled from the alternation's earlier solves)")
    solver_iterations: int = Field(5, ge=0, description="solver iterations per upper step (reference: 5); each costs one HVP")
    solver_tol: float = Field(0.0, ge=0.0, description="relative residual tolerance; 0 runs exactly solver_iterations with no host synchronisation")
    nystrom_rank: int = Field(8, ge=1, description="sketch size of nystrom_pcg (HVPs spent once per alternation)")
    neumann_alpha: float = Field(1.0, gt=0.0, description="step size of the neumann solver (needs alpha < 2 / lambda_max of the damped operator)")
    refine_inner_iterations: list[int] = Field([2, 2], min_length=1, description="mixed_refinement / subsampled_refinement: inner CG iterations of each correction, one entry per correction (0: the product-free correction x += r); one full-precision HVP computes the residual between corrections, none after the last (solver_iterations is not used; solver_tol > 0 checks every correction's true residual)")
    refine_precision: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="mixed_refinement / subsampled_refinement: precision of the corrections' HVPs (torch.autocast; float16 is for GPUs)")
    refine_inner_pairs: int | None = Field(None, ge=1, description="subsampled_refinement: pretext pairs of the Hessian batch in the corrections' operator; None = half the Hessian batch")
    recycle_capacity: int = Field(32, ge=1, description="recycled_cg: search directions kept from the alternation's earlier solves (memory: 2 x capacity x backbone size)")
    recycle_deflate: bool = Field(False, description="recycled_cg: also precondition with the recycled basis (deflation; 2 passes over it per iteration)")
    hessian_batch_size: int | None = Field(None, ge=2, description="pretext pairs in the Hessian batch drawn once per alternation; None = lower_batch_size (reference)")
    hessian_batch_source: Literal["independent", "reference"] = Field("independent", description="images of the Hessian batch: 'independent' draws its own images each alternation (a stream of its own); 'reference' re-augments the current pass's first lower batch, as the released code (the same images recur until the lower stream starts a new pass)")
    reuse_graph: bool = Field(True, description="build the pretext gradient graph once per alternation and reuse it for every HVP; false rebuilds it per HVP as the reference")
    warm_start: bool = Field(False, description="start each solve from the previous upper step's solution (one extra HVP)")
    hvp_updates_bn: bool = Field(False, description="every HVP forward updates theta_P's BatchNorm running statistics (reference behaviour); false leaves them untouched")
    upper_init: Literal["pretext", "warmup"] = Field("pretext", description="theta_D's backbone at the start: the pretext backbone ('pretext') or the linear warm-up's whole model ('warmup', reference: its BN statistics adapted to the downstream data); phi_D comes from the warm-up either way")
    handover: Literal["lower", "upper"] = Field("lower", description="backbone handed to fine-tuning: theta_P ('lower', reference) or theta_D ('upper')")
    on_bad_solve: Literal["skip", "stop", "truncate"] = Field("skip", description="a non-finite or broken-down solve: 'skip' that upper step (logged), 'stop' the stage at the last checkpoint with an error, or 'truncate': use the iterate CG froze before non-positive curvature (Steihaug's rule; a non-finite solve is still skipped)")
    checkpoint_every_alternations: int = Field(1, ge=1, description="write the stage checkpoint every this many alternations")
    eval_every_alternations: int = Field(0, ge=0, description="validation accuracy of theta_P + head every this many alternations (0: only at the end)")

    @model_validator(mode="after")
    def _check_solver(self) -> BiSSLConfig:
        if self.solver == "identity" and self.warm_start:
            raise ValueError("bissl.warm_start: true has no effect with bissl.solver=identity. "
                             "Fix: --set bissl.warm_start=false")
        if any(k < 0 for k in self.refine_inner_iterations):
            raise ValueError(f"bissl.refine_inner_iterations: {self.refine_inner_iterations} has a negative entry. "
                             "Fix: --set bissl.refine_inner_iterations=[2,2]")
        if self.hessian_batch_source == "reference" and self.hessian_batch_size not in (None, self.lower_batch_size):
            raise ValueError(f"bissl.hessian_batch_size: got {self.hessian_batch_size} with "
                             "bissl.hessian_batch_source='reference', which re-uses a lower batch "
                             f"({self.lower_batch_size} pairs). Fix: --set bissl.hessian_batch_size=null, "
                             "or bissl.hessian_batch_source=independent")
        if self.lower_warmup_first_step_full_lr and self.lower_warmup_steps == 0:
            raise ValueError("bissl.lower_warmup_first_step_full_lr: true with bissl.lower_warmup_steps=0 "
                             "changes nothing (no warm-up). Fix: --set bissl.lower_warmup_first_step_full_lr=false")
        if self.lower_warmup_steps >= self.total_lower_steps:
            raise ValueError(f"bissl.lower_warmup_steps: got {self.lower_warmup_steps} >= the stage's "
                             f"{self.total_lower_steps} lower steps (alternations x lower_steps); the cosine "
                             f"phase needs at least one. Fix: --set bissl.lower_warmup_steps={self.total_lower_steps // 10}")
        if self.solver != "identity" and self.solver_iterations == 0:
            raise ValueError(f"bissl.solver_iterations: 0 with bissl.solver={self.solver!r} returns x = 0. "
                             "Fix: --set bissl.solver_iterations=5, or bissl.solver=identity for x = v")
        return self

    @property
    def hessian_batch(self) -> int:
        """Pairs in the Hessian batch."""
        return self.hessian_batch_size or self.lower_batch_size

    @property
    def total_lower_steps(self) -> int:
        """Lower steps of the whole stage (= the conventional arm's extra pretext steps)."""
        return self.alternations * self.lower_steps

    @property
    def total_upper_steps(self) -> int:
        """Upper steps of the whole stage (= the conventional+ arm's extra supervised steps)."""
        return self.alternations * self.upper_steps


ArmName = Literal["conventional", "conventional+", "bissl", "bissl-identity", "scratch"]


class RunConfig(_Section):
    """The whole run: one section per stage (``bissl:`` is the BiSSL stage)."""

    name: str = Field("digits", description="run name (prefix of the default run directory)")
    seed: int = Field(0, ge=0, description="seed of data splits, initialisation and sampling")
    deterministic: bool = Field(False, description="force deterministic torch kernels (slower)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    checkpoint_every_steps: int = Field(100, ge=1, description="atomic checkpoint every N optimiser steps")
    log_every_steps: int = Field(10, ge=1, description="metrics.jsonl line every N steps")
    data: DataConfig = Field(default_factory=DataConfig, description="datasets and splits")
    model: ModelConfig = Field(default_factory=ModelConfig, description="backbone and projector")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="augmentations")
    pretext: PretextConfig = Field(default_factory=PretextConfig, description="SimCLR pretext stage")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig, description="linear warm-up stage")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="fine-tuning stage")
    search: SearchConfig = Field(default_factory=SearchConfig, description="hyperparameter search stage")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    bissl: BiSSLConfig = Field(default_factory=BiSSLConfig, description="BiSSL stage (lower/upper alternation)")
    arms: tuple[ArmName, ...] = Field(
        ("conventional", "conventional+", "bissl", "bissl-identity"),
        description="arms `bissl run` compares, all from one shared pretext checkpoint: conventional "
        "(continued pretext training at the BiSSL stage's budget), conventional+ (that, then the "
        "stage's supervised steps), bissl, bissl-identity (x = v), scratch (random init)")

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        from bissl.data import DATASETS  # local import: config must load even while data is broken

        for field, name in (("data.dataset", self.data.dataset),
                            ("data.pretext_dataset", self.data.pretext_name)):
            if name not in DATASETS:
                close = difflib.get_close_matches(name, list(DATASETS), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"{field}: unknown dataset {name!r}; {hint}valid: {sorted(DATASETS)}. "
                    f"Fix: --set {field}=digits"
                )
        spec = DATASETS[self.data.pretext_name]
        if self.data.pretext_split == "unlabeled" and not spec.has_unlabeled:
            raise ValueError(
                f"data.pretext_split: 'unlabeled' but dataset {spec.name!r} has no unlabeled split. "
                "Fix: --set data.pretext_split=train"
            )
        if not self.model.small_images and self.data.image_size < 32:
            raise ValueError(
                f"model.small_images: false with data.image_size={self.data.image_size}: the "
                "ImageNet stem (7x7/2 conv + max-pool) shrinks such images to 1x1 maps. "
                "Fix: --set model.small_images=true or data.image_size>=32"
            )
        if self.bissl.upper_init == "warmup" and self.warmup.epochs == 0:
            raise ValueError("bissl.upper_init: 'warmup' with warmup.epochs=0 (no linear warm-up to start "
                             "theta_D from). Fix: --set warmup.epochs=20, or bissl.upper_init=pretext")
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms: got {list(self.arms)}; need a non-empty list without repeats. "
                             "Fix: --arms conventional,bissl")
        if max(self.eval.topk) < 1:
            raise ValueError(f"eval.topk: got {list(self.eval.topk)}; need ks >= 1. Fix: [1, 5]")
        return self

    @property
    def trial_epochs(self) -> int:
        """Fine-tuning epochs of one search trial."""
        return self.search.trial_epochs or self.finetune.epochs


# ---------------------------------------------------------------------------------------------
# Loading


def available_presets() -> list[str]:
    """Names of the presets shipped in ``bissl/presets``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(preset_or_path: str) -> dict[str, Any]:
    path = Path(preset_or_path)
    if preset_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--config: file {str(path)!r} does not exist. Fix: give an existing "
                              f"YAML file or a preset name ({', '.join(available_presets())})")
    else:
        path = PRESET_DIR / f"{preset_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"--config: unknown preset {preset_or_path!r}. "
                              f"Fix: use one of {available_presets()} or a path to a YAML file")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed with ``yaml.safe_load``) to a raw mapping.

    Args:
        raw: nested mapping as read from YAML; modified in place and returned.
        overrides: strings ``dotted.key=value``.
    Returns:
        The same mapping.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set pretext.epochs=5")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {item!r}: {where!r} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _field_names(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Valid field names of the section addressed by loc[:-1] (for 'did you mean')."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if p != "__root__"]
        field = ".".join(str(p) for p in loc) or "(config)"
        if err["type"] == "extra_forbidden":
            names = _field_names(RunConfig, loc)
            close = difflib.get_close_matches(str(loc[-1]), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(f"- {field}: unknown field; {hint}valid here: {names}. Fix: remove or rename it")
        elif err["type"] == "value_error":
            lines.append(f"- {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(
                f"- {field}: got {err.get('input')!r}; {err['msg']}. "
                f"Fix: --set {field}=<valid value>"
            )
    return "invalid configuration:\n" + "\n".join(lines)


def validate_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`, raising :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(preset_or_path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a preset (name) or YAML file, apply ``--set`` overrides and validate.

    Args:
        preset_or_path: preset name in ``bissl/presets`` (e.g. ``"digits"``) or a YAML path.
        overrides: ``dotted.key=value`` strings; values are parsed with ``yaml.safe_load``.
    Returns:
        The validated configuration.
    Raises:
        ConfigError: listing every invalid field with its value and a fix.
    """
    return validate_config(apply_overrides(_read_yaml(preset_or_path), overrides))


def config_to_yaml(cfg: RunConfig) -> str:
    """Resolved configuration as YAML text (round-trips through :func:`validate_config`)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def check_data_sizes(cfg: RunConfig, sizes: Mapping[str, int], world_size: int = 1) -> None:
    """Check batch sizes against dataset sizes and the world size (call before training).

    Args:
        cfg: validated config.
        sizes: number of items per split: keys "pretext", "train", "val" (others ignored).
        world_size: number of processes; global batches must divide evenly.
    Raises:
        ConfigError: naming the field, the value and a fix.
    """
    problems = []
    checks = [
        ("pretext.batch_size", cfg.pretext.batch_size, "pretext"),
        ("warmup.batch_size", cfg.warmup.batch_size if cfg.warmup.epochs else 0, "train"),
        ("finetune.batch_size", cfg.finetune.batch_size, "train"),
        ("bissl.lower_batch_size", cfg.bissl.lower_batch_size, "pretext"),
        ("bissl.hessian_batch_size", cfg.bissl.hessian_batch, "pretext"),
        ("bissl.upper_batch_size", cfg.bissl.upper_batch_size, "train"),
    ]
    for field, batch, split in checks:
        n = sizes.get(split)
        if n is not None and batch > n:
            problems.append(f"- {field}: got {batch}, larger than the {split} split ({n} items); "
                            f"with drop_last no step would run. Fix: --set {field}={max(n // 4, 1)}")
        if batch and batch % world_size:
            problems.append(f"- {field}: got {batch}, not divisible by world size {world_size}. "
                            f"Fix: --set {field}={batch - batch % world_size or world_size}")
    if sizes.get("val", 1) == 0:
        problems.append("- data.val_fraction: validation split is empty. Fix: increase it")
    if problems:
        raise ConfigError("invalid configuration for this data:\n" + "\n".join(problems))
