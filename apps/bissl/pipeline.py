"""Pipelines behind the CLI sub-commands, the result table and the ``validate`` dry run.

``bissl run`` is the comparison of :mod:`bissl.compare` (BiSSL against the conventional
pipeline, paired by seed). The single stages are sub-commands of their own; the conventional
pipeline alone (:func:`run_conventional`)::

    pretext (SimCLR) -> linear warm-up -> fine-tuning search -> seeds at the best -> evaluate
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from bissl.augment import normalization_stats, simclr_views
from bissl.config import RunConfig, check_data_sizes
from bissl.data import DATASETS, DatasetNotFoundError
from bissl.distributed import DistInfo
from bissl.optim import LARS, lars_param_groups
from bissl.rundir import RunDir
from bissl.stages._common import Splits, StepHook, load_splits, new_classifier
from bissl.stages.bilevel import dry_run, run_bissl
from bissl.stages.evaluate import run_evaluate
from bissl.stages.finetune import run_finetune
from bissl.stages.linear_warmup import run_linear_warmup
from bissl.stages.pretext import build_simclr, run_pretext, training_loss
from bissl.stages.search import run_search


def pretrain(cfg: RunConfig, run: RunDir, info: DistInfo, *, resume: bool = False,
             step_hook: StepHook | None = None) -> None:
    """``bissl pretrain``: the SimCLR pretext stage only."""
    splits = load_splits(cfg, info)
    run_pretext(cfg, run, info, splits, resume=resume, step_hook=step_hook)
    run.write_plots()


def bilevel(cfg: RunConfig, run: RunDir, info: DistInfo, *, resume: bool = False,
            step_hook: StepHook | None = None) -> None:
    """``bissl bilevel``: the BiSSL stage on a run's pretext checkpoint (warm-up run if missing)."""
    splits = load_splits(cfg, info)
    _require_pretext(run)
    run_linear_warmup(cfg, run, info, splits, resume=True, step_hook=step_hook)
    run_bissl(cfg, run, info, splits, resume=resume, step_hook=step_hook)
    if info.is_main:
        run.write_plots()


def finetune_once(cfg: RunConfig, run: RunDir, info: DistInfo, *, resume: bool = False) -> None:
    """``bissl finetune``: warm-up, one fine-tuning run at finetune.lr/weight_decay, test."""
    splits = load_splits(cfg, info)
    _require_pretext(run)
    warm = run_linear_warmup(cfg, run, info, splits, resume=resume)
    ft = run_finetune(cfg, run, info, splits, lr=cfg.finetune.lr,
                      weight_decay=cfg.finetune.weight_decay, seed=cfg.seed, name="finetune",
                      resume=resume)
    ev = run_evaluate(cfg, run, info, splits, ["finetune"])
    _finish(cfg, run, info, {"warmup": warm, "finetune": ft, "evaluate": ev})


def search(cfg: RunConfig, run: RunDir, info: DistInfo, *, resume: bool = False) -> None:
    """``bissl search``: search + seeds on the run's pretext backbone, then test evaluation."""
    splits = load_splits(cfg, info)
    _require_pretext(run)
    warm = None
    if cfg.finetune.head_init == "warmup":
        warm = run_linear_warmup(cfg, run, info, splits, resume=resume)
    found = run_search(cfg, run, info, splits, resume=resume)
    ev = run_evaluate(cfg, run, info, splits, found.seed_names())
    _finish(cfg, run, info, {"warmup": warm, "search": found, "evaluate": ev})


def evaluate(cfg: RunConfig, run: RunDir, info: DistInfo, *, resume: bool = False) -> None:
    """``bissl evaluate``: test metrics of the run's seed runs (else of its single fine-tune)."""
    del resume  # evaluation has no state to resume
    splits = load_splits(cfg, info)
    finals = sorted(p.name.removesuffix("-final.pt") for p in run.path.glob("checkpoints/*-final.pt"))
    names = [n for n in finals if n.startswith("seed")] or [n for n in finals if n == "finetune"]
    ev = run_evaluate(cfg, run, info, splits, names)
    _finish(cfg, run, info, {"evaluate": ev})


def run(cfg: RunConfig, run: RunDir, info: DistInfo, *, resume: bool = False,
        step_hook: StepHook | None = None) -> dict[str, Any]:
    """``bissl run``: the comparison of BiSSL with the conventional pipeline (:mod:`bissl.compare`)."""
    from bissl.compare import run_comparison

    return run_comparison(cfg, run, info, resume=resume, step_hook=step_hook)


def run_conventional(cfg: RunConfig, run: RunDir, info: DistInfo, *, resume: bool = False,
                     step_hook: StepHook | None = None) -> dict[str, Any]:
    """The conventional pipeline alone: pretext -> linear warm-up -> search -> seeds -> evaluate."""
    start = time.perf_counter()
    splits = load_splits(cfg, info)
    run_pretext(cfg, run, info, splits, resume=resume, step_hook=step_hook)
    warm = run_linear_warmup(cfg, run, info, splits, resume=resume, step_hook=step_hook)
    found = run_search(cfg, run, info, splits, resume=resume, step_hook=step_hook)
    ev = run_evaluate(cfg, run, info, splits, found.seed_names())
    results = {"warmup": warm, "search": found, "evaluate": ev,
               "wall_s": time.perf_counter() - start}
    _finish(cfg, run, info, results)
    return results


def _require_pretext(run: RunDir) -> None:
    if not run.checkpoint("pretext-final").exists():
        raise FileNotFoundError(f"{run.checkpoint('pretext-final')} not found. Fix: run "
                                f"`bissl pretrain --run-dir {run.path}` first")


def _last_pretext_metrics(run: RunDir) -> dict[str, float]:
    out: dict[str, float] = {}
    for rec in run.read_metrics():
        if rec["stage"] == "pretext":
            out.update({k: rec[k] for k in ("knn_acc", "probe_acc", "loss") if k in rec})
    return out


def result_table(cfg: RunConfig, run: RunDir, results: dict[str, Any]) -> str:
    """Plain-text summary table of a pipeline's results (accuracies in %)."""
    rows: list[tuple[str, str, str]] = []
    pre = _last_pretext_metrics(run)
    if "knn_acc" in pre:
        rows += [("pretext (SimCLR)", "kNN val top-1", f"{pre['knn_acc']:.2f}"),
                 ("", "linear probe val top-1", f"{pre['probe_acc']:.2f}")]
    if results.get("warmup") is not None:
        rows.append(("linear warm-up (frozen)", "val top-1 (last)",
                     f"{results['warmup'].last_val_top1:.2f}"))
    if results.get("search") is not None:
        s = results["search"]
        rows.append((f"search ({s.trials} trial{'s' * (s.trials > 1)})", "best val top-1",
                     f"{s.best_trial_val_top1:.2f} (lr={s.lr:.2e}, wd={s.weight_decay:.2e})"))
    if results.get("finetune") is not None:
        rows.append(("fine-tune", "best val top-1", f"{results['finetune'].best_val_top1:.2f}"))
    ev = results.get("evaluate")
    if ev is not None:
        n = next(iter(ev["summary"].values()))["n"]
        for metric in sorted(k for k in ev["summary"] if k.startswith("top")):
            m = ev["summary"][metric]
            rows.append((f"fine-tuned, test ({n} seed{'s' * (n > 1)})", f"{metric}",
                         f"{m['mean']:.2f} ± {m['std']:.2f}"))
    w = [max(len(r[i]) for r in [("stage", "metric", "value"), *rows]) for i in range(3)]
    lines = [f"Results: {cfg.name} ({cfg.data.dataset}), run dir {run.path}",
             f"{'stage':<{w[0]}}  {'metric':<{w[1]}}  value", f"{'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}"]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in rows]
    if "wall_s" in results:
        lines.append(f"wall time: {results['wall_s']:.1f} s")
    return "\n".join(lines)


def _finish(cfg: RunConfig, run: RunDir, info: DistInfo, results: dict[str, Any]) -> None:
    if not info.is_main:
        return
    table = result_table(cfg, run, results)
    print("\n" + table, flush=True)
    (run.path / "results" / "table.txt").write_text(table + "\n")
    run.write_plots()


# ---------------------------------------------------------------------------------------------
# validate: dry run on random tensors


def validate(cfg: RunConfig, *, batch: int = 4) -> dict[str, Any]:
    """Build every model of ``cfg`` and run one training step of each on random tensors.

    Uses ``batch`` images of the preset's shape (channels of the dataset, ``data.image_size``
    pixels), so even the paper preset runs in seconds on a CPU. Also applies the SimCLR
    augmentation to one random image and, when the dataset files are present, checks the batch
    sizes against the split sizes.

    Returns:
        Losses and timings of the dry-run steps.
    """
    if batch < 2:
        raise ValueError(f"--batch: got {batch}; NT-Xent needs at least 2 pairs. Fix: --batch 4")
    spec = DATASETS[cfg.data.dataset]
    c, s = spec.in_channels, cfg.data.image_size
    print(f"config OK: {cfg.name} | {cfg.model.arch} ({'small' if cfg.model.small_images else 'ImageNet'}"
          f" stem) | {cfg.data.pretext_name}/{cfg.data.pretext_split} -> {cfg.data.dataset} | "
          f"{c}x{s}x{s} images")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out: dict[str, Any] = {}

    mean, std = normalization_stats(cfg.data.pretext_name)
    view1, view2 = simclr_views(s, in_channels=c, aspect_ratio_quirk=cfg.augment.aspect_ratio_quirk,
                                scale=cfg.augment.crop_scale, blur=cfg.augment.blur, hflip=cfg.augment.hflip, mean=mean, std=std)
    native = spec.native_size or s
    img = torch.randint(0, 256, (c, native, native), dtype=torch.uint8, generator=gen)
    shapes = {tuple(view1(img).shape), tuple(view2(img).shape)}
    if shapes != {(c, s, s)}:
        raise RuntimeError(f"augmentation produced shapes {shapes}, expected {(c, s, s)}")

    p = cfg.pretext
    t0 = time.perf_counter()
    net = build_simclr(cfg, c)
    opt = LARS(lars_param_groups(net, exclude_bias_and_norm=p.lars_exclude_bias_and_norm),
               lr=p.effective_lr(), momentum=p.momentum, weight_decay=p.weight_decay,
               trust_coefficient=p.trust_coefficient)
    x = torch.randn(2 * batch, c, s, s, generator=gen)
    loss = training_loss(cfg, net)(dict(net.backbone.named_parameters()), (x[:batch], x[batch:]))
    loss.backward()
    opt.step()
    out["pretext_loss"], out["pretext_step_s"] = loss.item(), time.perf_counter() - t0
    n_params = sum(q.numel() for q in net.backbone.parameters())

    t0 = time.perf_counter()
    clf = new_classifier(cfg, spec)
    sgd = torch.optim.SGD(clf.parameters(), lr=cfg.finetune.lr, momentum=cfg.finetune.momentum,
                          weight_decay=cfg.finetune.weight_decay)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen)
    ce = nn.functional.cross_entropy(clf(x[:batch]), y)
    ce.backward()
    sgd.step()
    out["finetune_loss"], out["finetune_step_s"] = ce.item(), time.perf_counter() - t0
    bissl = dry_run(cfg, spec, batch=batch, generator=gen)
    out.update({f"bissl_{k}": v for k, v in bissl.items()})
    b = cfg.bissl
    print(f"BiSSL dry run OK ({b.solver}, {int(bissl['hvp_per_solve'])} HVPs per solve): lower step "
          f"{bissl['lower_step_s']:.2f} s, HVP {bissl['hvp_s']:.2f} s, upper step {bissl['upper_step_s']:.2f} s "
          f"at batch {batch}; projected {bissl['projected_alternation_s']:.1f} s per alternation at batch "
          f"sizes lower {b.lower_batch_size} / Hessian {b.hessian_batch} / upper {b.upper_batch_size} "
          f"(linear in batch size, this machine), {b.alternations} alternations ~ "
          f"{bissl['projected_alternation_s'] * b.alternations / 3600:.1f} h"
          + (f"; peak GPU memory {bissl['peak_memory_bytes'] / 2**30:.1f} GiB at batch {batch}"
             if "peak_memory_bytes" in bissl else ""))
    for name, value in out.items():
        if not torch.isfinite(torch.tensor(value)):
            raise RuntimeError(f"dry run: {name} is not finite ({value})")
    print(f"dry run OK: backbone {n_params / 1e6:.2f} M parameters | pretext step (batch {batch} pairs) "
          f"loss {out['pretext_loss']:.3f} in {out['pretext_step_s']:.2f} s | fine-tune step loss "
          f"{out['finetune_loss']:.3f} in {out['finetune_step_s']:.2f} s")

    try:
        splits = load_splits(cfg, DistInfo())
    except DatasetNotFoundError as exc:
        print(f"data: not found (not needed for the dry run): {exc}")
    else:
        check_data_sizes(cfg, splits.sizes())
        print(f"data OK: {splits.sizes()}")
    return out


__all__ = [
    "Splits",
    "bilevel",
    "evaluate",
    "finetune_once",
    "pretrain",
    "result_table",
    "run",
    "run_conventional",
    "search",
    "validate",
]
